"""Certificate path validation and CRL checking shared by every certificate the gateway judges:
S/MIME signers and recipients (adapters/cms/trust.py) and TLS peers (gateway/peers.py).

Followed: RFC 5280 §6 (path validation, done by cryptography's x509.verification) and §6.3
(CRL checking, done here for every link of the chain: the leaf and each intermediate);
DESIGN.md §10 "Revocation": a configured CRL that is stale (past nextUpdate, or without one) or
not signed by the CA it names refuses the certificate; a CA with no configured CRL is not
revocation-checked (`gateway check` warns about it).

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

from gateway.errors import Reason

__all__ = [
    "CertificateProblem",
    "build_path",
    "check_revocation",
    "complete_chain",
    "signed_by",
    "validity_problem",
]


class CertificateProblem(Exception):
    """Why a certificate is not acceptable: a closed-list reason and a short phrase."""

    def __init__(self, reason: Reason, phrase: str) -> None:
        super().__init__(phrase)
        self.reason = reason
        self.phrase = phrase


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


def check_revocation(
    chain: Sequence[x509.Certificate],
    crls: Sequence[x509.CertificateRevocationList],
    now: dt.datetime,
) -> None:
    """Every link of `chain` (leaf first) against the configured CRLs of its issuer."""
    for child, parent in itertools.pairwise(chain):
        relevant = [crl for crl in crls if crl.issuer == child.issuer]
        if not relevant:
            continue  # DESIGN.md §10: a CA with no configured CRL is not revocation-checked
        for crl in relevant:
            if not signed_by(crl, parent):
                raise CertificateProblem(Reason.REVOCATION_UNKNOWN, "CRL not signed by the issuer")
            next_update = crl.next_update_utc
            if next_update is None or next_update < now:
                raise CertificateProblem(Reason.REVOCATION_UNKNOWN,
                                         "CRL is stale (past nextUpdate)")
            if crl.get_revoked_certificate_by_serial_number(child.serial_number) is not None:
                which = "certificate" if child is chain[0] else "issuing CA certificate"
                raise CertificateProblem(Reason.REVOKED, f"{which} revoked")
