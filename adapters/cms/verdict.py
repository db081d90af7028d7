"""From a verified CMS signature to the gateway's Verdict: trust, From:, time.

The outermost signed layer over the plaintext speaks for the message; inner layers are
reported as notes only, so a message re-signed by Dave is never presented as signed by Alice
(Thunderbird's VERIFY_HEADER_MISMATCH rule). A signature over ciphertext only (encrypt-then-
sign) is at best neutral: it binds the signer to octets, not to the content (RFC 8551 §3.7);
adapters/smime.py says why in full.

Followed: RFC 8551 §3.7 and RFC 8550 §3 (the signer's certificate must name the From:
address, rfc822Name in subjectAltName or emailAddress in the subject, compared without case),
RFC 7281 (the Authentication-Results `smime` method: what the reason and signer say),
Thunderbird mimecms.cpp (a Date: more than one hour away from signingTime is a mismatch).

Untrusted input: the signed layer's certificates and attributes, the From: and Date: fields.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import email.utils
import functools
from dataclasses import dataclass

from cryptography import x509

from adapters.base import Verdict, VerdictResult, certificate_addresses
from adapters.cms.layers import SignedLayer
from adapters.cms.trust import TrustCache, TrustProblem, check_certificate, fingerprint
from adapters.cms.verify import SignatureCheck
from gateway.errors import Reason

__all__ = ["layer_note", "over_ciphertext", "signature_verdict"]

METHOD = "smime"
_TIME_SLACK = dt.timedelta(hours=1)


@dataclass(frozen=True)
class _Signer:
    addresses: frozenset[str]
    subject: str
    issuer: str
    serial: str
    fingerprint: str


@functools.lru_cache(maxsize=1024)
def _signer(certificate: x509.Certificate) -> _Signer:
    """What a verdict says about a signer certificate, read once per certificate."""
    return _Signer(
        addresses=certificate_addresses(certificate),
        subject=certificate.subject.rfc4514_string(),
        issuer=certificate.issuer.rfc4514_string(),
        serial=format(certificate.serial_number, "x"),
        fingerprint=fingerprint(certificate),
    )


def _verdict(
    result: VerdictResult, phrase: str, failure: Reason | None, check: SignatureCheck,
    from_address: str | None,
) -> Verdict:
    certificate = check.certificate
    if certificate is None:
        return Verdict(METHOD, result, phrase, failure=failure, algorithm=check.algorithm or None)
    known = _signer(certificate)
    addresses = known.addresses
    signer = from_address if from_address in addresses else (min(addresses) if addresses else None)
    return Verdict(
        METHOD, result, phrase, failure=failure,
        signer=signer,
        signer_subject=known.subject,
        signer_issuer=known.issuer,
        signer_serial=known.serial,
        fingerprints=(known.fingerprint,),
        algorithm=check.algorithm or None,
    )


def _date(value: str | None) -> dt.datetime | None:
    if not value:
        return None
    try:
        parsed = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=dt.UTC)


def signature_verdict(
    layer: SignedLayer,
    *,
    from_address: str | None,
    date_header: str | None,
    trust: TrustCache,
    now: dt.datetime,
) -> Verdict:
    checks = layer.signed.signers
    check = next((c for c in checks if c.valid), checks[0])
    if not check.valid:
        return _verdict("fail", check.phrase, check.reason, check, from_address)
    assert check.certificate is not None  # a valid check always names its certificate
    try:
        check_certificate(
            check.certificate, purpose="sign", cache=trust, carried=layer.signed.certificates,
            now=now, signing_time=check.signing_time,
        )
    except TrustProblem as problem:
        return _verdict("fail", problem.phrase, problem.reason, check, from_address)
    if from_address is None or from_address not in _signer(check.certificate).addresses:
        return _verdict(
            "fail", "signer does not match From", Reason.SIGNER_MISMATCH, check, from_address
        )
    sent = _date(date_header)
    if check.signing_time is not None and sent is not None:
        if abs(sent - check.signing_time) > _TIME_SLACK:
            # Thunderbird's VERIFY_TIME_MISMATCH: a replayed or back-dated signature.
            return _verdict(
                "fail", "time mismatch (Date: and signing time differ)",
                Reason.SIGNATURE_INVALID, check, from_address,
            )
    return _verdict("pass", "signature verified", None, check, from_address)


CIPHERTEXT_ONLY = "signature covers only the encrypted content"


def over_ciphertext(verdict: Verdict) -> Verdict:
    """The message's verdict when its only signature covers ciphertext: a signature that
    verifies is neutral, never a pass for the content, and names nobody (whoever signed
    ciphertext need not have written, nor read, what it decrypts to; the audit note of the
    layer keeps the signer). Its signer not matching From is then no fault either. Any other
    failure stays a failure, as the OpenPGP adapter judges the same shape."""
    if verdict.result == "pass" or verdict.failure is Reason.SIGNER_MISMATCH:
        return dataclasses.replace(
            verdict, result="neutral", reason=CIPHERTEXT_ONLY, failure=None, signer=None,
            signer_subject=None, signer_issuer=None, signer_serial=None,
        )
    return verdict


def layer_note(layer: SignedLayer, verdict: Verdict, *, covers_content: bool = True) -> str:
    """One line for the audit about a signed layer that is not the verdict (never content)."""
    where = "inner" if covers_content else "over-ciphertext"
    return (
        f"{where} smime layer (encryption depth {layer.depth}): {verdict.result} "
        f"({verdict.reason}); signer "
        f"{verdict.signer or verdict.signer_subject or 'unknown'}"
    )
