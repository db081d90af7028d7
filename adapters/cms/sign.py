"""Making CMS SignedData with one of the gateway's identities.

Followed: RFC 5652 §5 (SignedData version 1, signer by issuer and serial number, signed
attributes content-type, signing-time, message-digest, DER SET OF sorted), RFC 8551 §2.5.2
(SMIMECapabilities), RFC 5754 (SHA-256), RFC 4056 (RSASSA-PSS: SHA-256, MGF1-SHA-256, salt
32), RFC 5758 (ECDSA with SHA-256/384).

Untrusted input: none parsed here (the content is signed as handed in).
"""

from __future__ import annotations

import datetime as dt
from typing import Literal

from asn1crypto import algos, core
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

from adapters.cms.der import (
    Pieces,
    element,
    integer,
    joined,
    object_identifier,
    octet_string,
    sequence,
    set_of,
    signing_time,
)
from adapters.cms.identifiers import ids

__all__ = ["SignaturePadding", "sign_content"]

SignaturePadding = Literal["pkcs1", "pss"]

# Advertised to correspondents (RFC 8551 §2.5.2), strongest first.
_CAPABILITIES = ("aes256_gcm", "aes256_cbc", "aes128_gcm", "aes128_cbc")

# The fixed parts, encoded once by asn1crypto at import: the messages only add octets around
# them (building asn1crypto objects per message costs more than the RSA signature itself).
_DATA = object_identifier("1.2.840.113549.1.7.1")  # id-data
_SIGNED_DATA = object_identifier("1.2.840.113549.1.7.2")  # id-signedData
_SHA256 = bytes(algos.DigestAlgorithm({"algorithm": "sha256"}).dump())
_RSA_PKCS1 = bytes(algos.SignedDigestAlgorithm({"algorithm": "rsassa_pkcs1v15"}).dump())
_ECDSA_SHA256 = bytes(algos.SignedDigestAlgorithm({"algorithm": "sha256_ecdsa"}).dump())
_PSS_SALT = 32
_RSA_PSS = bytes(algos.SignedDigestAlgorithm({
    "algorithm": "rsassa_pss",
    "parameters": algos.RSASSAPSSParams({
        "hash_algorithm": {"algorithm": "sha256"},
        "mask_gen_algorithm": {"algorithm": "mgf1", "parameters": {"algorithm": "sha256"}},
        "salt_length": _PSS_SALT,
    }),
}).dump())


def _attribute(oid: str, value: bytes) -> bytes:
    """RFC 5652 §5.3 Attribute with one value: SEQUENCE { type, SET { value } }."""
    return joined(sequence([object_identifier(oid)], set_of([value])))


def _capabilities() -> bytes:
    encoded = [
        joined(sequence([core.ObjectIdentifier(algos.EncryptionAlgorithmId.unmap(name)).dump()]))
        for name in _CAPABILITIES
    ]
    # smimeCapabilities: SEQUENCE OF in order of preference (not a SET: no sorting).
    return _attribute("1.2.840.113549.1.9.15", joined(sequence(encoded)))


_CONTENT_TYPE_DATA = _attribute("1.2.840.113549.1.9.3", _DATA)
_SMIME_CAPABILITIES = _capabilities()


def sign_content(
    content: bytes,
    certificate: x509.Certificate,
    private_key: PrivateKeyTypes,
    *,
    chain: tuple[x509.Certificate, ...] = (),
    now: dt.datetime,
    detached: bool,
    signature_padding: SignaturePadding = "pkcs1",
) -> tuple[bytes, str]:
    """(DER ContentInfo of a SignedData over `content`, micalg) for this identity."""
    digest = hashes.Hash(hashes.SHA256())
    digest.update(content)
    attributes = [
        _CONTENT_TYPE_DATA,
        _attribute("1.2.840.113549.1.9.5", signing_time(now)),
        _attribute("1.2.840.113549.1.9.4", joined(octet_string(digest.finalize()))),
        _SMIME_CAPABILITIES,
    ]
    signed_set = joined(set_of(attributes))  # DER: a SET OF is sorted by its encodings
    if isinstance(private_key, rsa.RSAPrivateKey):
        if signature_padding == "pss":
            signature = private_key.sign(
                signed_set,
                padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=_PSS_SALT),
                hashes.SHA256(),
            )
            algorithm = _RSA_PSS
        else:
            signature = private_key.sign(signed_set, padding.PKCS1v15(), hashes.SHA256())
            algorithm = _RSA_PKCS1
    elif isinstance(private_key, ec.EllipticCurvePrivateKey):
        signature = private_key.sign(signed_set, ec.ECDSA(hashes.SHA256()))
        algorithm = _ECDSA_SHA256
    else:
        raise ValueError("the identity key is neither RSA nor EC")
    own = ids(certificate)
    signer_info = sequence(
        integer(1),  # v1: the signer is named by issuer and serial number
        [own.issuer_and_serial],
        [_SHA256],
        # signedAttrs [0] IMPLICIT: the same octets as the signed SET, tag replaced.
        [b"\xa0" + signed_set[1:]],
        [algorithm],
        octet_string(signature),
    )
    encapsulated: Pieces = [_DATA]
    if not detached:
        encapsulated += element(0xA0, octet_string(content))  # eContent [0] EXPLICIT
    certificates = [own.der, *(ids(c).der for c in chain)]
    signed_data = sequence(
        integer(1),
        set_of([_SHA256]),
        sequence(encapsulated),
        element(0xA0, sorted(certificates)),  # certificates [0] IMPLICIT SET OF
        set_of([joined(signer_info)]),
    )
    info = sequence([_SIGNED_DATA], element(0xA0, signed_data))  # content [0] EXPLICIT
    return joined(info), "sha-256"
