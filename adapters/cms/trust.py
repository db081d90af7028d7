"""Is this S/MIME certificate good for this use: chain, validity, purpose, revocation.

Used for signers of incoming mail and for recipients' certificates before encrypting to them
(DESIGN.md §10: recipient certificates are validated like signers').

Followed: RFC 5280 (path validation, by cryptography's x509.verification; CRL checks here),
RFC 8550 §4.4 (S/MIME certificate profile: if extendedKeyUsage is present it must allow
emailProtection; keyUsage digitalSignature/nonRepudiation to sign, keyEncipherment for RSA key
transport, keyAgreement for ECDH), DESIGN.md §10 "Revocation": a configured CRL that is stale
or badly signed refuses the certificate; a CA with no configured CRL is not checked.

Untrusted input: the end-entity certificate and the intermediates a message carries; the
trust anchors and CRLs are the operator's.
"""

from __future__ import annotations

import datetime as dt
import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509 import verification
from cryptography.x509.oid import ExtendedKeyUsageOID

from gateway.errors import Reason

__all__ = ["Purpose", "TrustProblem", "check_certificate", "fingerprint"]

Purpose = Literal["sign", "encrypt"]

_AGNOSTIC = verification.Criticality.AGNOSTIC


class TrustProblem(Exception):
    """Why a certificate is not acceptable: a closed-list reason and a short phrase."""

    def __init__(self, reason: Reason, phrase: str) -> None:
        super().__init__(phrase)
        self.reason = reason
        self.phrase = phrase


def fingerprint(certificate: x509.Certificate) -> str:
    return "sha256:" + certificate.fingerprint(hashes.SHA256()).hex()


def _email_eku(extension: x509.ExtendedKeyUsage | None) -> bool:
    if extension is None:
        return True
    return (ExtendedKeyUsageOID.EMAIL_PROTECTION in extension
            or ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE in extension)


def _purpose_problem(certificate: x509.Certificate, purpose: Purpose) -> str | None:
    """The end-entity profile of RFC 8550 §4.4, checked before path building for a clear
    reason (path building reports every failure alike)."""
    try:
        eku = certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        eku = None
    if not _email_eku(eku):
        return "certificate not for e-mail protection (extended key usage)"
    try:
        usage = certificate.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        return None
    if purpose == "sign":
        if not (usage.digital_signature or usage.content_commitment):
            return "certificate key usage does not allow signing"
        return None
    key = certificate.public_key()
    if isinstance(key, rsa.RSAPublicKey) and not usage.key_encipherment:
        return "certificate key usage does not allow key encipherment"
    if isinstance(key, ec.EllipticCurvePublicKey) and not usage.key_agreement:
        return "certificate key usage does not allow key agreement"
    return None


def _ca_key_usage(
    policy: verification.Policy, certificate: x509.Certificate, value: x509.KeyUsage | None
) -> None:
    if value is not None and not value.key_cert_sign:
        raise ValueError("CA key usage does not allow certificate signing")


def _ca_eku(
    policy: verification.Policy, certificate: x509.Certificate,
    value: x509.ExtendedKeyUsage | None,
) -> None:
    # A CA restricted to other purposes must not vouch for e-mail certificates.
    if not _email_eku(value):
        raise ValueError("CA not allowed for e-mail protection")


def _ee_eku(
    policy: verification.Policy, certificate: x509.Certificate,
    value: x509.ExtendedKeyUsage | None,
) -> None:
    if not _email_eku(value):
        raise ValueError("certificate not for e-mail protection")


def _verifier(anchors: Sequence[x509.Certificate], at: dt.datetime) -> verification.ClientVerifier:
    ca_policy = (
        verification.ExtensionPolicy.permit_all()
        .require_present(x509.BasicConstraints, _AGNOSTIC, None)
        .may_be_present(x509.KeyUsage, _AGNOSTIC, _ca_key_usage)
        .may_be_present(x509.ExtendedKeyUsage, _AGNOSTIC, _ca_eku)
    )
    # The client verifier would otherwise ask for clientAuth; S/MIME wants emailProtection.
    ee_policy = verification.ExtensionPolicy.permit_all().may_be_present(
        x509.ExtendedKeyUsage, _AGNOSTIC, _ee_eku
    )
    return (
        verification.PolicyBuilder()
        .store(verification.Store(list(anchors)))
        .time(at)
        .max_chain_depth(8)
        .extension_policies(ca_policy=ca_policy, ee_policy=ee_policy)
        .build_client_verifier()
    )


def _validity_problem(certificate: x509.Certificate, at: dt.datetime, label: str) -> str | None:
    if at < certificate.not_valid_before_utc:
        return f"certificate not yet valid at {label}"
    if at > certificate.not_valid_after_utc:
        return f"certificate expired at {label}"
    return None


@dataclass(frozen=True)
class _Revocation:
    crls: tuple[x509.CertificateRevocationList, ...]
    now: dt.datetime

    def check(self, certificate: x509.Certificate, issuer: x509.Certificate) -> None:
        relevant = [crl for crl in self.crls if crl.issuer == certificate.issuer]
        if not relevant:
            return  # DESIGN.md §10: a CA with no configured CRL is not revocation-checked
        for crl in relevant:
            try:
                signed_by_issuer = crl.is_signature_valid(issuer.public_key())  # type: ignore[arg-type]
            except (TypeError, ValueError):
                signed_by_issuer = False
            if not signed_by_issuer:
                raise TrustProblem(Reason.REVOCATION_UNKNOWN, "CRL not signed by the issuer")
            next_update = crl.next_update_utc
            if next_update is None or next_update < self.now:
                raise TrustProblem(Reason.REVOCATION_UNKNOWN, "CRL is stale (past nextUpdate)")
            if crl.get_revoked_certificate_by_serial_number(certificate.serial_number):
                raise TrustProblem(Reason.REVOKED, "certificate revoked")


def check_certificate(
    certificate: x509.Certificate,
    *,
    purpose: Purpose,
    anchors: Sequence[x509.Certificate],
    crls: Sequence[x509.CertificateRevocationList],
    intermediates: Iterable[x509.Certificate],
    now: dt.datetime,
    signing_time: dt.datetime | None = None,
) -> tuple[x509.Certificate, ...]:
    """The validated chain (leaf first), or TrustProblem saying why not.

    Checked at `now` and, for signatures, also at the claimed signing time: a signature made
    before the certificate's validity, or with a certificate that has expired since, fails.
    """
    problem = _purpose_problem(certificate, purpose)
    if problem:
        raise TrustProblem(Reason.UNTRUSTED_SIGNER, problem)
    times = [(now, "now")]
    if signing_time is not None:
        times.append((signing_time, "signing time"))
    for at, label in times:
        problem = _validity_problem(certificate, at, label)
        if problem:
            raise TrustProblem(Reason.EXPIRED, problem)
    if not anchors:
        raise TrustProblem(Reason.UNTRUSTED_SIGNER, "no trust anchors configured")
    pool = [c for c in intermediates if c != certificate]
    chain: list[x509.Certificate] = []
    for at, label in times:
        try:
            chain = _verifier(anchors, at).verify(certificate, pool).chain
        except verification.VerificationError as error:
            text = str(error)
            if "expired" in text or "not yet valid" in text or "validity" in text:
                raise TrustProblem(Reason.EXPIRED, f"CA certificate not valid at {label}") from None
            raise TrustProblem(
                Reason.UNTRUSTED_SIGNER, "certificate not issued by a trusted CA"
            ) from None
        except Exception:  # unsupported name types and the like: never a pass
            raise TrustProblem(
                Reason.UNTRUSTED_SIGNER, "certificate chain not verifiable"
            ) from None
    revocation = _Revocation(tuple(crls), now)
    for child, parent in itertools.pairwise(chain):
        revocation.check(child, parent)
    return tuple(chain)
