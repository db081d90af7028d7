"""Certificate path validation and CRL checking shared by every certificate the gateway judges:
S/MIME signers and recipients (adapters/cms/trust.py) and TLS peers (gateway/peers.py).

Followed: RFC 5280 §6 (path validation, done by cryptography's x509.verification) and §6.3
(CRL checking, done here for every link of the chain: the leaf and each intermediate);
DESIGN.md §10 "Revocation": a configured CRL that is stale (past nextUpdate, or without one) or
not signed by the CA it names refuses the certificate; a CA with no configured CRL is not
revocation-checked (`gateway check` warns about it). Refusing for a stale or badly signed CRL
means deferring (4.7.5, `revocation_unknown`): both are the operator's to fix by installing a
fresh CRL from the CA, the sender can do nothing about them, and a bounce would lose mail
over a cron job that did not run. A badly signed CRL is most likely a wrong or corrupted
download or a CA key rollover not yet in trust.anchors; forging one takes write access to
the operator's files, and deferring never lets the certificate pass either.

When a configured anchor is an intermediate CA (IGC-Santé operators often list the
"ORGANISATIONS" CA beside the root), path building stops at it; the chain is then continued
through the other anchors up to the root, so that the root's CRL still covers the intermediate.

Untrusted input: the end-entity certificate and the intermediates a peer or a message carries;
the anchors and CRLs are the operator's.
"""

from __future__ import annotations

import datetime as dt
import itertools
from collections.abc import Iterable, Sequence

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.x509 import verification

from gateway.errors import Reason, TemporaryFailure

__all__ = [
    "CertificateProblem",
    "build_path",
    "check_revocation",
    "complete_chain",
    "revocation_unknown",
    "signed_by",
    "validity_problem",
]


class CertificateProblem(Exception):
    """Why a certificate is not acceptable: a closed-list reason and a short phrase."""

    def __init__(self, reason: Reason, phrase: str) -> None:
        super().__init__(phrase)
        self.reason = reason
        self.phrase = phrase


def revocation_unknown(detail: str) -> TemporaryFailure:
    """The deferral for a certificate whose revocation status the configured CRLs cannot tell
    (stale or badly signed CRL). The operator fixes it by refreshing the CRL; the message
    waits in the queue meanwhile and is bounced only at the retry give-up time."""
    return TemporaryFailure(
        "The revocation status of a certificate this message depends on cannot be checked "
        "now; the gateway will try again later",
        smtp_code=451, enhanced="4.7.5", reason=Reason.REVOCATION_UNKNOWN, detail=detail,
    )


def validity_problem(certificate: x509.Certificate, at: dt.datetime, label: str) -> str | None:
    if at < certificate.not_valid_before_utc:
        return f"certificate not yet valid at {label}"
    if at > certificate.not_valid_after_utc:
        return f"certificate expired at {label}"
    return None


def signed_by(subject: x509.Certificate | x509.CertificateRevocationList,
              issuer: x509.Certificate) -> bool:
    """Whether `issuer`'s key verifies the signature on `subject` (a certificate or a CRL)."""
    try:
        if isinstance(subject, x509.CertificateRevocationList):
            return subject.is_signature_valid(issuer.public_key())  # type: ignore[arg-type]
        subject.verify_directly_issued_by(issuer)
        return True
    except (TypeError, ValueError, InvalidSignature):
        return False
    except Exception:  # an unsupported key type and the like: not signed, as far as we know
        return False


def build_path(
    certificate: x509.Certificate,
    *,
    anchors: Sequence[x509.Certificate],
    intermediates: Iterable[x509.Certificate],
    at: dt.datetime,
    label: str,
    ca_policy: verification.ExtensionPolicy,
    ee_policy: verification.ExtensionPolicy,
) -> list[x509.Certificate]:
    """The chain from `certificate` to an anchor (leaf first), or CertificateProblem."""
    if not anchors:
        raise CertificateProblem(Reason.UNTRUSTED_SIGNER, "no trust anchors configured")
    pool = [c for c in intermediates if c != certificate]
    verifier = (
        verification.PolicyBuilder()
        .store(verification.Store(list(anchors)))
        .time(at)
        .max_chain_depth(8)
        .extension_policies(ca_policy=ca_policy, ee_policy=ee_policy)
        .build_client_verifier()  # the client verifier checks no host name; callers do
    )
    try:
        return list(verifier.verify(certificate, pool).chain)
    except verification.VerificationError as error:
        text = str(error)
        if "expired" in text or "not yet valid" in text or "validity" in text:
            raise CertificateProblem(Reason.EXPIRED, f"CA certificate not valid at {label}") \
                from None
        raise CertificateProblem(
            Reason.UNTRUSTED_SIGNER, "certificate not issued by a trusted CA"
        ) from None
    except Exception:  # unsupported name types and the like: never a pass
        raise CertificateProblem(
            Reason.UNTRUSTED_SIGNER, "certificate chain not verifiable"
        ) from None


def complete_chain(
    chain: Sequence[x509.Certificate], anchors: Sequence[x509.Certificate]
) -> list[x509.Certificate]:
    """`chain` continued through the anchors up to a self-signed root when it stopped at an
    anchor that is an intermediate CA, so that the CRL of the CA above still applies."""
    out = list(chain)
    while out and len(out) < 16:
        top = out[-1]
        if top.issuer == top.subject and signed_by(top, top):
            break
        parent = next(
            (a for a in anchors if a.subject == top.issuer and a not in out and signed_by(top, a)),
            None,
        )
        if parent is None:
            break
        out.append(parent)
    return out


def _on_hold(entry: x509.RevokedCertificate) -> bool:
    try:
        reason = entry.extensions.get_extension_for_class(x509.CRLReason).value.reason
    except x509.ExtensionNotFound:
        return False
    return reason is x509.ReasonFlags.certificate_hold


def check_revocation(
    chain: Sequence[x509.Certificate],
    crls: Sequence[x509.CertificateRevocationList],
    now: dt.datetime,
) -> None:
    """Every link of `chain` (leaf first) against the configured CRLs of its issuer.

    REVOKED when a CRL signed by the issuer lists the certificate, stale or not (a revocation
    is not undone by the list ageing); otherwise REVOCATION_UNKNOWN when any configured CRL of
    an issuer in the chain is stale or not signed by it. The unknown case is the operator's to
    fix (fetch a fresh CRL): callers treat it as temporary, never as a pass and never as a
    final verdict on the certificate. The whole chain is looked at before answering, so a
    revoked CA above a stale CRL is still reported as revoked.
    """
    unknown: str | None = None
    for child, parent in itertools.pairwise(chain):
        relevant = [crl for crl in crls if crl.issuer == child.issuer]
        # DESIGN.md §10: a CA with no configured CRL is not revocation-checked.
        for crl in relevant:
            if not signed_by(crl, parent):
                unknown = unknown or "CRL not signed by the issuer"
                continue
            next_update = crl.next_update_utc
            stale = next_update is None or next_update < now
            entry = crl.get_revoked_certificate_by_serial_number(child.serial_number)
            # A hold (RFC 5280 §5.3.1 certificateHold) may have been released since a stale
            # list was issued: only then is a listed certificate "unknown" rather than revoked.
            if entry is not None and not (stale and _on_hold(entry)):
                which = "certificate" if child is chain[0] else "issuing CA certificate"
                raise CertificateProblem(Reason.REVOKED, f"{which} revoked")
            if stale:
                unknown = unknown or "CRL is stale (past nextUpdate)"
    if unknown is not None:
        raise CertificateProblem(Reason.REVOCATION_UNKNOWN, unknown)
