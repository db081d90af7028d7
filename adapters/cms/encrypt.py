"""Making CMS EnvelopedData / AuthEnvelopedData for a set of recipient certificates.

One content-encryption key for all recipients of a network (RFC 5652 §6: one RecipientInfo
per recipient). The key and IV/nonce come from the `random` the caller hands in; RSA padding
and the ECDH ephemeral key are drawn by cryptography from the operating system, as they
must be fresh per operation anyway.

Followed: RFC 5652 §6.1 (EnvelopedData versions), RFC 5083 (AuthEnvelopedData), RFC 3565
(AES-CBC), RFC 5084 (AES-GCM, 16-octet ICV), RFC 3370 §4.2.1 (rsaEncryption key transport),
RFC 3560 (RSAES-OAEP with SHA-256 and MGF1-SHA-256), RFC 5753 §3.1 (ECDH ephemeral-static,
dhSinglePass-stdDH-sha256kdf-scheme, AES-256 key wrap).

Untrusted input: none parsed here (recipient certificates were validated by trust.py).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

from asn1crypto import algos, cms, keys
from asn1crypto import x509 as asn1_x509
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.keywrap import aes_key_wrap
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from adapters.cms.ciphers import GcmParameters, cbc_encrypt, ecdh_kek, gcm_encrypt

__all__ = ["ContentEncryption", "KeyTransport", "encrypt_content"]

ContentEncryption = Literal["aes-256-cbc", "aes-256-gcm"]
KeyTransport = Literal["rsa-pkcs1", "rsa-oaep"]

_ECDH_SHA256 = "1.3.132.1.11.1"  # dhSinglePass-stdDH-sha256kdf-scheme
_AES256_WRAP = "2.16.840.1.101.3.4.1.45"


def _issuer_and_serial(certificate: x509.Certificate) -> cms.IssuerAndSerialNumber:
    parsed = asn1_x509.Certificate.load(certificate.public_bytes(Encoding.DER))
    return cms.IssuerAndSerialNumber(
        {"issuer": parsed.issuer, "serial_number": parsed.serial_number}
    )


def _key_transport(
    certificate: x509.Certificate, key: rsa.RSAPublicKey, cek: bytes, transport: KeyTransport
) -> cms.RecipientInfo:
    if transport == "rsa-oaep":
        encrypted = key.encrypt(cek, padding.OAEP(
            mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None,
        ))
        algorithm = cms.KeyEncryptionAlgorithm({
            "algorithm": "rsaes_oaep",
            "parameters": algos.RSAESOAEPParams({
                "hash_algorithm": {"algorithm": "sha256"},
                "mask_gen_algorithm": {"algorithm": "mgf1", "parameters": {"algorithm": "sha256"}},
            }),
        })
    else:
        encrypted = key.encrypt(cek, padding.PKCS1v15())
        algorithm = cms.KeyEncryptionAlgorithm({"algorithm": "rsaes_pkcs1v15"})
    return cms.RecipientInfo({"ktri": cms.KeyTransRecipientInfo({
        "version": "v0",
        "rid": cms.RecipientIdentifier(
            {"issuer_and_serial_number": _issuer_and_serial(certificate)}
        ),
        "key_encryption_algorithm": algorithm,
        "encrypted_key": encrypted,
    })})


def _key_agreement(
    certificate: x509.Certificate, key: ec.EllipticCurvePublicKey, cek: bytes
) -> cms.RecipientInfo:
    ephemeral = ec.generate_private_key(key.curve)
    kek = ecdh_kek(ephemeral.exchange(ec.ECDH(), key), "sha256", _AES256_WRAP, 32, None)
    originator = keys.PublicKeyInfo.load(
        ephemeral.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    )
    wrap_algorithm = cms.KeyEncryptionAlgorithm({"algorithm": "aes256_wrap"})
    return cms.RecipientInfo({"kari": cms.KeyAgreeRecipientInfo({
        "version": "v3",
        "originator": cms.OriginatorIdentifierOrKey({"originator_key": originator}),
        "key_encryption_algorithm": {"algorithm": _ECDH_SHA256, "parameters": wrap_algorithm},
        "recipient_encrypted_keys": [{
            "rid": cms.KeyAgreementRecipientIdentifier(
                {"issuer_and_serial_number": _issuer_and_serial(certificate)}
            ),
            "encrypted_key": aes_key_wrap(kek, cek),
        }],
    })})


def encrypt_content(
    content: bytes,
    recipients: Sequence[x509.Certificate],
    *,
    random: Callable[[int], bytes],
    content_encryption: ContentEncryption = "aes-256-cbc",
    key_transport: KeyTransport = "rsa-pkcs1",
) -> bytes:
    """DER ContentInfo of an EnvelopedData (CBC) or AuthEnvelopedData (GCM)."""
    if not recipients:
        raise ValueError("no recipient to encrypt to")
    cek = random(32)
    if len(cek) != 32:
        raise ValueError("the random source returned too few octets")
    infos: list[cms.RecipientInfo] = []
    for certificate in recipients:
        public_key = certificate.public_key()
        if isinstance(public_key, rsa.RSAPublicKey):
            infos.append(_key_transport(certificate, public_key, cek, key_transport))
        elif isinstance(public_key, ec.EllipticCurvePublicKey):
            infos.append(_key_agreement(certificate, public_key, cek))
        else:
            raise ValueError("recipient key is neither RSA nor EC")
    if content_encryption == "aes-256-gcm":
        nonce = random(12)
        ciphertext, tag = gcm_encrypt(cek, nonce, content)
        parameters = GcmParameters({"aes_nonce": nonce, "aes_icvlen": len(tag)})
        auth_enveloped = cms.AuthEnvelopedData({
            "version": "v0",
            "recipient_infos": infos,
            "auth_encrypted_content_info": {
                "content_type": "data",
                "content_encryption_algorithm": {"algorithm": "aes256_gcm",
                                                 "parameters": parameters},
                "encrypted_content": ciphertext,
            },
            "mac": tag,
        })
        return bytes(cms.ContentInfo({
            "content_type": "authenticated_enveloped_data", "content": auth_enveloped,
        }).dump())
    iv = random(16)
    enveloped = cms.EnvelopedData({
        # RFC 5652 §6.1: version 2 as soon as a RecipientInfo is not version 0 (kari is v3).
        "version": "v2" if any(info.name == "kari" for info in infos) else "v0",
        "recipient_infos": infos,
        "encrypted_content_info": {
            "content_type": "data",
            "content_encryption_algorithm": {"algorithm": "aes256_cbc", "parameters": iv},
            "encrypted_content": cbc_encrypt(cek, iv, content),
        },
    })
    return bytes(cms.ContentInfo({"content_type": "enveloped_data", "content": enveloped}).dump())
