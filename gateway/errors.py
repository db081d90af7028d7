"""The gateway's error tree: every failure carries the SMTP reply and DSN status it maps to.

    GatewayError
     ├── TemporaryFailure   4xx: the message stays queued and is retried
     └── PermanentFailure   5xx: the sender gets a DSN (after 250) or a 5xx reply (before)

A failure names one `Reason` from a closed list. The reason is what metrics count
(`gateway_messages_failed_total{route,reason}`) and what the audit trail records; `detail` is the
operator-facing explanation (audit, logs); `advice` is the one sentence the sender reads in a DSN
or an SMTP reply. Peers only ever see `advice`, never `detail`, so a failed verification does not
become an oracle for the attacker (the pyca/cryptography habit of one opaque error outward).
"""

from __future__ import annotations

import enum

__all__ = [
    "GatewayError",
    "PermanentFailure",
    "Reason",
    "TemporaryFailure",
]


class Reason(enum.StrEnum):
    """Closed list of failure reasons, used as the `reason` metric label."""

    UNKNOWN_DOMAIN = "unknown_domain"
    ROUTE_DENIED = "route_denied"
    SENDER_NOT_ALLOWED = "sender_not_allowed"
    PEER_NOT_AUTHENTICATED = "peer_not_authenticated"
    TOO_LARGE = "too_large"
    MALFORMED = "malformed"
    SMUGGLING = "smuggling"
    PEER_TOO_SLOW = "peer_too_slow"
    SPOOL_UNAVAILABLE = "spool_unavailable"
    AUDIT_UNAVAILABLE = "audit_unavailable"
    SIGNATURE_MISSING = "signature_missing"
    SIGNATURE_INVALID = "signature_invalid"
    UNTRUSTED_SIGNER = "untrusted_signer"
    SIGNER_MISMATCH = "signer_mismatch"
    REVOKED = "revoked"
    EXPIRED = "expired"
    REVOCATION_UNKNOWN = "revocation_unknown"
    WEAK_ALGORITHM = "weak_algorithm"
    UNSUPPORTED_ALGORITHM = "unsupported_algorithm"
    ENCRYPTION_MISSING = "encryption_missing"
    DECRYPTION_FAILED = "decryption_failed"
    NO_DECRYPTION_KEY = "no_decryption_key"
    NO_RECIPIENT_KEY = "no_recipient_key"
    WRAP_FAILED = "wrap_failed"
    NEXT_HOP_UNAVAILABLE = "next_hop_unavailable"
    NEXT_HOP_UNTRUSTED = "next_hop_untrusted"
    DESTINATION_REFUSED = "destination_refused"
    GAVE_UP = "gave_up"
    INTERNAL = "internal"


class GatewayError(Exception):
    """Base of all failures the gateway reports to a peer or a sender."""

    smtp_code: int = 451
    enhanced: str = "4.3.0"
    reason: Reason = Reason.INTERNAL

    def __init__(
        self,
        advice: str,
        *,
        detail: str | None = None,
        enhanced: str | None = None,
        smtp_code: int | None = None,
        reason: Reason | None = None,
    ) -> None:
        super().__init__(advice)
        self.advice = advice
        self.detail = detail or advice
        if enhanced is not None:
            self.enhanced = enhanced
        if smtp_code is not None:
            self.smtp_code = smtp_code
        if reason is not None:
            self.reason = reason

    @property
    def smtp_reply(self) -> str:
        """The reply line sent to an SMTP peer (never includes `detail`)."""
        return f"{self.smtp_code} {self.enhanced} {self.advice}"

    @property
    def permanent(self) -> bool:
        return self.smtp_code >= 500

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.enhanced} {self.reason.value}: {self.detail})"


class TemporaryFailure(GatewayError):
    """4xx: try again later; the message stays in the queue."""

    smtp_code = 451
    enhanced = "4.3.0"


class PermanentFailure(GatewayError):
    """5xx: will not succeed as is; the sender must change something."""

    smtp_code = 550
    enhanced = "5.7.1"
