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

from asn1crypto import algos, cms, core
from asn1crypto import x509 as asn1_x509
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.hazmat.primitives.serialization import Encoding

from adapters.cms.ciphers import tlv

__all__ = ["SignaturePadding", "sign_content"]

SignaturePadding = Literal["pkcs1", "pss"]

# Advertised to correspondents (RFC 8551 §2.5.2), strongest first.
_CAPABILITIES = ("aes256_gcm", "aes256_cbc", "aes128_gcm", "aes128_cbc")


def _attribute(kind: str, value: object) -> bytes:
    return bytes(cms.CMSAttribute({"type": kind, "values": [value]}).dump())


def _capabilities() -> bytes:
    encoded = b"".join(
        tlv(0x30, core.ObjectIdentifier(algos.EncryptionAlgorithmId.unmap(name)).dump())
        for name in _CAPABILITIES
    )
    oid = core.ObjectIdentifier("1.2.840.113549.1.9.15").dump()  # smimeCapabilities
    return tlv(0x30, oid + tlv(0x31, tlv(0x30, encoded)))


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
    attributes = sorted([  # DER: a SET OF is sorted by its elements' encodings
        _attribute("content_type", "data"),
        _attribute("signing_time", cms.Time({"utc_time": now.astimezone(dt.UTC)})
                   if 1950 <= now.year < 2050
                   else cms.Time({"generalized_time": now.astimezone(dt.UTC)})),
        _attribute("message_digest", digest.finalize()),
        _capabilities(),
    ])
    signed_set = tlv(0x31, b"".join(attributes))
    signed_attributes = cms.CMSAttributes.load(signed_set)
    if isinstance(private_key, rsa.RSAPrivateKey):
        if signature_padding == "pss":
            salt = 32
            signature = private_key.sign(
                signed_set,
                padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=salt),
                hashes.SHA256(),
            )
            algorithm = algos.SignedDigestAlgorithm({
                "algorithm": "rsassa_pss",
                "parameters": algos.RSASSAPSSParams({
                    "hash_algorithm": {"algorithm": "sha256"},
                    "mask_gen_algorithm": {
                        "algorithm": "mgf1", "parameters": {"algorithm": "sha256"},
                    },
                    "salt_length": salt,
                }),
            })
        else:
            signature = private_key.sign(signed_set, padding.PKCS1v15(), hashes.SHA256())
            algorithm = algos.SignedDigestAlgorithm({"algorithm": "rsassa_pkcs1v15"})
    elif isinstance(private_key, ec.EllipticCurvePrivateKey):
        signature = private_key.sign(signed_set, ec.ECDSA(hashes.SHA256()))
        algorithm = algos.SignedDigestAlgorithm({"algorithm": "sha256_ecdsa"})
    else:
        raise ValueError("the identity key is neither RSA nor EC")
    own = asn1_x509.Certificate.load(certificate.public_bytes(Encoding.DER))
    signer_info = cms.SignerInfo({
        "version": "v1",
        "sid": cms.SignerIdentifier({
            "issuer_and_serial_number": cms.IssuerAndSerialNumber({
                "issuer": own.issuer, "serial_number": own.serial_number,
            }),
        }),
        "digest_algorithm": algos.DigestAlgorithm({"algorithm": "sha256"}),
        "signed_attrs": signed_attributes,
        "signature_algorithm": algorithm,
        "signature": signature,
    })
    certificates = [own] + [
        asn1_x509.Certificate.load(c.public_bytes(Encoding.DER)) for c in chain
    ]
    encapsulated: dict[str, object] = {"content_type": "data"}
    if not detached:
        encapsulated["content"] = content
    signed_data = cms.SignedData({
        "version": "v1",
        "digest_algorithms": [algos.DigestAlgorithm({"algorithm": "sha256"})],
        "encap_content_info": encapsulated,
        "certificates": certificates,
        "signer_infos": [signer_info],
    })
    info = cms.ContentInfo({"content_type": "signed_data", "content": signed_data})
    return bytes(info.dump()), "sha-256"
