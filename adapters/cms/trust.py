"""Is this S/MIME certificate good for this use: chain, validity, purpose, revocation.

Used for signers of incoming mail and for recipients' certificates before encrypting to them
(DESIGN.md §10: recipient certificates are validated like signers').

Followed: RFC 5280 (path validation, by cryptography's x509.verification; CRL checks here),
RFC 8550 §4.4 (S/MIME certificate profile: if extendedKeyUsage is present it must allow
emailProtection; keyUsage digitalSignature/nonRepudiation to sign, keyEncipherment for RSA key
transport, keyAgreement for ECDH), DESIGN.md §10 "Revocation": a configured CRL that is stale
or badly signed refuses the certificate; a CA with no configured CRL is not checked. Path
building and CRL checks are gateway.revocation's, shared with the TLS peer checks.

What does not depend on the time is kept between messages in a `TrustCache`, one per
TrustStore and directory (so per loaded configuration: a reload or a new CRL is a new
TrustStore): built paths (reused only where no certificate's validity changes, see
gateway.revocation.PathCache), CRL signatures and serial numbers, the end-entity profile
answer. The validity of the certificate at `now` and at the signing time, and the staleness
of every CRL, are checked at every call.

Untrusted input: the end-entity certificate and the intermediates a message carries; the
trust anchors and CRLs are the operator's.
"""

from __future__ import annotations

import datetime as dt
import functools
from collections.abc import Sequence
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509 import verification
from cryptography.x509.oid import ExtendedKeyUsageOID

from adapters.base import Directory, TrustStore
from gateway.errors import Reason
from gateway.revocation import (
    CertificateProblem,
    PathCache,
    RevocationIndex,
    check_revocation,
    validity_problem,
)

__all__ = ["Purpose", "TrustCache", "TrustProblem", "check_certificate", "fingerprint",
           "trust_cache"]

Purpose = Literal["sign", "encrypt"]

_AGNOSTIC = verification.Criticality.AGNOSTIC


# One exception for every certificate the gateway judges; the S/MIME name is kept for callers.
TrustProblem = CertificateProblem


@functools.lru_cache(maxsize=4096)
def fingerprint(certificate: x509.Certificate) -> str:
    return "sha256:" + certificate.fingerprint(hashes.SHA256()).hex()


def _email_eku(extension: x509.ExtendedKeyUsage | None) -> bool:
    if extension is None:
        return True
    return (ExtendedKeyUsageOID.EMAIL_PROTECTION in extension
            or ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE in extension)


@functools.lru_cache(maxsize=4096)
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


def _policies() -> tuple[verification.ExtensionPolicy, verification.ExtensionPolicy]:
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
    return ca_policy, ee_policy


class TrustCache:
    """Checking certificates against one TrustStore, with one directory's certificates as
    the intermediates always available: what can be kept between messages (see above)."""

    def __init__(self, trust: TrustStore, directory: Sequence[x509.Certificate]) -> None:
        self.trust = trust
        self.directory = tuple(directory)
        ca_policy, ee_policy = _policies()
        self.paths = PathCache(trust.anchors, self.directory, ca_policy=ca_policy,
                               ee_policy=ee_policy)
        self.revocation = RevocationIndex(trust.crls)


_MEMO_KEY = "smime.trust"
# A Runtime has one TrustStore; more are kept only for contexts made by hand (tests, tools).
_TRUST_STORES_KEPT = 4


def trust_cache(trust: TrustStore, directory: Directory) -> TrustCache:
    """The TrustCache of this TrustStore and directory, made on first use and kept with the
    directory (both belong to one loaded configuration)."""
    kept = directory.memo.get(_MEMO_KEY)
    if not isinstance(kept, dict):
        kept = {}
        directory.memo[_MEMO_KEY] = kept
    cache = kept.get(id(trust))
    # The cache holds the TrustStore, so its id cannot be reused while the entry exists.
    if isinstance(cache, TrustCache) and cache.trust is trust:
        return cache
    cache = TrustCache(trust, directory.x509)
    if len(kept) >= _TRUST_STORES_KEPT:
        kept.clear()
    kept[id(trust)] = cache
    return cache


def check_certificate(
    certificate: x509.Certificate,
    *,
    purpose: Purpose,
    cache: TrustCache,
    carried: Sequence[x509.Certificate] = (),
    now: dt.datetime,
    signing_time: dt.datetime | None = None,
) -> tuple[x509.Certificate, ...]:
    """The validated chain (leaf first), or TrustProblem saying why not.

    The intermediates are those a message `carried`, then the cache's directory. Checked at
    `now` and, for signatures, also at the claimed signing time: a signature made before the
    certificate's validity, or with a certificate that has expired since, fails.
    """
    problem = _purpose_problem(certificate, purpose)
    if problem:
        raise TrustProblem(Reason.UNTRUSTED_SIGNER, problem)
    times = [(now, "now")]
    if signing_time is not None:
        times.append((signing_time, "signing time"))
    for at, label in times:
        problem = validity_problem(certificate, at, label)
        if problem:
            raise TrustProblem(Reason.EXPIRED, problem)
    chain: list[x509.Certificate] = []
    for at, label in times:
        chain = cache.paths.build_path(certificate, carried=carried, at=at, label=label)
    check_revocation(cache.paths.complete_chain(chain), cache.trust.crls, now,
                     cache.revocation)
    return tuple(chain)
