"""Loading CMS structures from received octets, and the failures this module family raises.

Followed: RFC 5652 (CMS ContentInfo, BER allowed on the wire: NSS and Thunderbird send
indefinite lengths and constructed OCTET STRINGs), RFC 8551 §3.2 (smime-type).

Untrusted input: the DER/BER octets of a `smime.p7m` / `smime.p7s` as the peer sent them.
asn1crypto parses lazily, so a structure that loads may still raise when a field is read:
callers read fields inside `guarded()`, which turns any parser exception into a
`PermanentFailure` 5.6.0 instead of letting it crash the worker.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from asn1crypto import cms, core
from cryptography import x509

from gateway.errors import GatewayError, PermanentFailure, Reason

__all__ = [
    "certificate_der",
    "crypto_failure",
    "guarded",
    "load_content_info",
    "malformed",
    "octets",
    "set_der",
    "unsupported",
]


def malformed(detail: str) -> PermanentFailure:
    return PermanentFailure(
        "The S/MIME structure of this message could not be read; the sender should send it "
        "again from a standard S/MIME client",
        enhanced="5.6.0", reason=Reason.MALFORMED, detail=detail,
    )


def unsupported(what: str) -> PermanentFailure:
    return PermanentFailure(
        f"This message uses a cryptographic algorithm the gateway does not accept ({what}); "
        "the sender should use AES with RSA or elliptic-curve keys",
        # RFC 3463 X.7.6: cryptographic algorithm not supported.
        enhanced="5.7.6", reason=Reason.UNSUPPORTED_ALGORITHM, detail=f"unsupported {what}",
    )


def crypto_failure(detail: str) -> PermanentFailure:
    # One sentence outward whatever went wrong inside the decryption (no padding oracle).
    return PermanentFailure(
        "This message could not be decrypted by the gateway; the sender should encrypt it "
        "again to the gateway's current certificate",
        enhanced="5.7.5", reason=Reason.DECRYPTION_FAILED, detail=detail,
    )


@contextmanager
def guarded(what: str) -> Iterator[None]:
    """Any exception but a GatewayError becomes a 5.6.0 malformed failure."""
    try:
        yield
    except GatewayError:
        raise
    except Exception as error:  # asn1crypto raises ValueError, TypeError, KeyError...
        raise malformed(f"{what}: {type(error).__name__}: {error}") from None


def load_content_info(data: bytes) -> Any:
    """A ContentInfo, fully parsed so that truncation is found here and not later."""
    with guarded("CMS ContentInfo"):
        if not data or data[0] != 0x30:
            raise ValueError("not a DER/BER SEQUENCE")
        # strict: trailing octets after the ContentInfo are refused. Loading finds the end of
        # every indefinite-length value, so truncation is caught here; the fields are parsed
        # lazily later (not all at once: NSS puts attributes in signerInfos that asn1crypto
        # cannot turn into Python values, and the gateway does not need them).
        info = cms.ContentInfo.load(data, strict=True)
        _ = info["content_type"].native, info["content"].contents
        return info


def octets(value: Any) -> bytes:
    """The octets of an OCTET STRING, whether primitive or constructed (BER)."""
    if isinstance(value, core.ParsableOctetString):
        # Constructed (BER) octet strings are joined by asn1crypto when `contents` is read.
        return bytes(value)
    native = value.native
    if isinstance(native, bytes):
        return native
    raise ValueError(f"expected octets, found {type(native).__name__}")


def set_der(attributes: Any) -> bytes:
    """The attribute set re-tagged as a universal SET (RFC 5652 §5.4, RFC 5083 §2.1).

    The signature is computed over the attributes with the SET OF tag in place of the
    [0] IMPLICIT tag. The received content octets are kept as they are (the signer hashed its
    own DER), only the tag and a definite length are written.
    """
    body = bytes(attributes.contents)
    length = len(body)
    if length < 0x80:
        header = bytes([length])
    else:
        size = length.to_bytes((length.bit_length() + 7) // 8, "big")
        header = bytes([0x80 | len(size)]) + size
    return b"\x31" + header + body


def certificate_der(choice: Any) -> x509.Certificate | None:
    """A cryptography Certificate from a CMS CertificateChoices, or None for other kinds."""
    if choice.name != "certificate":
        return None
    try:
        return x509.load_der_x509_certificate(choice.chosen.dump())
    except ValueError:
        return None
