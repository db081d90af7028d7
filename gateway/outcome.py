"""What became of each recipient in one delivery attempt: what the deliver stage hands back to
the queue manager, which records it, tries a deferred recipient again later and reports a
bounced one in a DSN (RFC 3464).

Every outcome carries an SMTP reply code and an RFC 3463 enhanced status code: the next hop's,
or one the gateway chose for a failure of its own (`outcome_from_error`).

Untrusted input: none is parsed here. The text of a next hop's reply is reduced to one
printable line before it becomes an outcome (`gateway.smtp_wire.reply_text`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from gateway.errors import GatewayError, Reason

__all__ = ["Kind", "Outcome", "outcome_from_error"]

Kind = Literal["delivered", "deferred", "bounced"]


@dataclass(frozen=True)
class Outcome:
    """What became of one recipient in one delivery attempt."""

    address: str
    kind: Kind
    code: int  # the SMTP reply code, the remote's or one the gateway chose
    enhanced: str  # RFC 3463 code, from the reply or inferred
    text: str  # the remote reply's text, or the gateway's own sentence
    reason: Reason | None  # None when delivered
    remote_mta: str | None = None  # the next hop that answered, for the DSN's Remote-MTA


def outcome_from_error(address: str, error: GatewayError, remote: str | None) -> Outcome:
    """`address` was not delivered because of `error`: deferred if it is temporary, bounced if
    permanent, with its codes and its sentence for the sender."""
    return Outcome(
        address=address,
        kind="bounced" if error.permanent else "deferred",
        code=error.smtp_code,
        enhanced=error.enhanced,
        text=error.advice,
        reason=error.reason,
        remote_mta=remote,
    )
