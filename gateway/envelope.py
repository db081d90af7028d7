"""What passes between the stages: the SMTP envelope and each recipient's delivery state.

The envelope is fixed once the message is accepted (it is spooled with the message); the
delivery state changes with every attempt and is spooled beside it. Both serialise to JSON so a
queue file can be read by an operator's tools as well as by the gateway.
"""

from __future__ import annotations

import enum
import json
from dataclasses import asdict, dataclass, field, replace
from typing import Any

__all__ = [
    "DeliveryState",
    "Envelope",
    "Peer",
    "Recipient",
    "RecipientState",
    "Status",
]


@dataclass(frozen=True)
class Peer:
    """Who handed us the message."""

    address: str
    port: int = 0
    helo: str = ""
    tls: bool = False
    certificate_subject: str | None = None  # RFC 4514 string of the client certificate


@dataclass(frozen=True)
class Recipient:
    """One RCPT TO, already resolved to its destination network at RCPT time."""

    address: str
    network: str
    orcpt: str | None = None  # RFC 3461 ORCPT, "type;address" as received
    notify: tuple[str, ...] = ()  # RFC 3461 NOTIFY values; () means the default FAILURE,DELAY

    def wants(self, event: str) -> bool:
        """Whether this recipient's NOTIFY asks for a DSN on `event` (SUCCESS/FAILURE/DELAY)."""
        if not self.notify:
            return event in ("FAILURE", "DELAY")
        return event in self.notify


@dataclass(frozen=True)
class Envelope:
    queue_id: str
    sender: str  # "" is the null sender <>
    recipients: tuple[Recipient, ...]
    source_network: str
    peer: Peer
    received_at: float  # Unix time of the 250
    size: int
    message_id: str | None = None  # for the audit trail and DSNs, never interpreted
    ret: str | None = None  # RFC 3461 RET=FULL|HDRS
    envid: str | None = None  # RFC 3461 ENVID
    generated: bool = False  # a DSN/MDN made by the gateway itself: bypasses `routes:`

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":"), sort_keys=True).encode()

    @staticmethod
    def from_json(data: bytes) -> Envelope:
        raw: dict[str, Any] = json.loads(data)
        raw["peer"] = Peer(**raw["peer"])
        raw["recipients"] = tuple(
            Recipient(**{**r, "notify": tuple(r.get("notify", ()))}) for r in raw["recipients"]
        )
        return Envelope(**raw)


class Status(enum.StrEnum):
    PENDING = "pending"  # not tried yet, or due now
    DEFERRED = "deferred"  # a temporary failure; `next_attempt` says when
    DELIVERED = "delivered"
    BOUNCED = "bounced"  # permanently failed; a DSN was queued if one was due

    @property
    def final(self) -> bool:
        return self in (Status.DELIVERED, Status.BOUNCED)


@dataclass(frozen=True)
class RecipientState:
    address: str
    status: Status = Status.PENDING
    attempts: int = 0
    next_attempt: float = 0.0  # Unix time
    last_reply: str = ""  # the last SMTP reply or the reason, for queue tools and DSNs
    enhanced: str = ""  # the last enhanced status code
    reason: str = ""  # closed-list Reason value of the last failure
    delay_notified: bool = False  # a "delayed" DSN was already sent


@dataclass(frozen=True)
class DeliveryState:
    recipients: tuple[RecipientState, ...] = field(default_factory=tuple)

    @staticmethod
    def initial(envelope: Envelope) -> DeliveryState:
        return DeliveryState(tuple(RecipientState(r.address) for r in envelope.recipients))

    @property
    def done(self) -> bool:
        return all(r.status.final for r in self.recipients)

    def next_attempt(self) -> float | None:
        """When the earliest unfinished recipient is due, or None if all are final."""
        times = [r.next_attempt for r in self.recipients if not r.status.final]
        return min(times) if times else None

    def update(self, address: str, **changes: Any) -> DeliveryState:
        return DeliveryState(
            tuple(replace(r, **changes) if r.address == address else r for r in self.recipients)
        )

    def get(self, address: str) -> RecipientState:
        for r in self.recipients:
            if r.address == address:
                return r
        raise KeyError(address)

    def to_json(self) -> bytes:
        return json.dumps(
            [asdict(r) for r in self.recipients], separators=(",", ":"), sort_keys=True
        ).encode()

    @staticmethod
    def from_json(data: bytes) -> DeliveryState:
        rows: list[dict[str, Any]] = json.loads(data)
        return DeliveryState(
            tuple(RecipientState(**{**r, "status": Status(r["status"])}) for r in rows)
        )
