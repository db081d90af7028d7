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

from asn1crypto import algos, cms
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.keywrap import aes_key_wrap
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from adapters.cms.ciphers import cbc_encrypt, ecdh_kek, gcm_encrypt
from adapters.cms.der import (
    element,
    integer,
    joined,
    object_identifier,
    octet_string,
    sequence,
    set_of,
)
from adapters.cms.identifiers import ids

__all__ = ["ContentEncryption", "KeyTransport", "encrypt_content"]

ContentEncryption = Literal["aes-256-cbc", "aes-256-gcm"]
KeyTransport = Literal["rsa-pkcs1", "rsa-oaep"]

_ECDH_SHA256 = "1.3.132.1.11.1"  # dhSinglePass-stdDH-sha256kdf-scheme
_AES256_WRAP = "2.16.840.1.101.3.4.1.45"

# The fixed parts, encoded once by asn1crypto at import (see sign.py for why).
_DATA = object_identifier("1.2.840.113549.1.7.1")  # id-data
_ENVELOPED_DATA = object_identifier("1.2.840.113549.1.7.3")
_AUTH_ENVELOPED_DATA = object_identifier("1.2.840.113549.1.9.16.1.23")  # RFC 5083
_AES256_CBC = object_identifier("2.16.840.1.101.3.4.1.42")
_AES256_GCM = object_identifier("2.16.840.1.101.3.4.1.46")
_RSA_PKCS1 = bytes(cms.KeyEncryptionAlgorithm({"algorithm": "rsaes_pkcs1v15"}).dump())
_RSA_OAEP = bytes(cms.KeyEncryptionAlgorithm({
    "algorithm": "rsaes_oaep",
    "parameters": algos.RSAESOAEPParams({
        "hash_algorithm": {"algorithm": "sha256"},
        "mask_gen_algorithm": {"algorithm": "mgf1", "parameters": {"algorithm": "sha256"}},
    }),
}).dump())
# keyEncryptionAlgorithm of ECDH: the scheme, with the key wrap algorithm as its parameters.
_ECDH_AES256_WRAP = joined(sequence(
    [object_identifier(_ECDH_SHA256)],
    [bytes(cms.KeyEncryptionAlgorithm({"algorithm": "aes256_wrap"}).dump())],
))


def _key_transport(
    certificate: x509.Certificate, key: rsa.RSAPublicKey, cek: bytes, transport: KeyTransport
) -> bytes:
    """RFC 5652 §6.2.1 KeyTransRecipientInfo (version 0: issuer and serial number)."""
    if transport == "rsa-oaep":
        encrypted = key.encrypt(cek, padding.OAEP(
            mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None,
        ))
        algorithm = _RSA_OAEP
    else:
        encrypted = key.encrypt(cek, padding.PKCS1v15())
        algorithm = _RSA_PKCS1
    return joined(sequence(
        integer(0), [ids(certificate).issuer_and_serial], [algorithm], octet_string(encrypted),
    ))


def _key_agreement(
    certificate: x509.Certificate, key: ec.EllipticCurvePublicKey, cek: bytes
) -> bytes:
    """RFC 5652 §6.2.2 KeyAgreeRecipientInfo [1], version 3, with an ephemeral originator key
    (RFC 5753 §3.1.1)."""
    ephemeral = ec.generate_private_key(key.curve)
    kek = ecdh_kek(ephemeral.exchange(ec.ECDH(), key), "sha256", _AES256_WRAP, 32, None)
    spki = ephemeral.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    # originator [0] EXPLICIT, holding originatorKey [1] IMPLICIT OriginatorPublicKey: the
    # SubjectPublicKeyInfo's own fields under the context tag.
    originator = element(0xA0, [_retagged(0xA1, spki)])
    recipient_encrypted_keys = sequence(sequence(
        [ids(certificate).issuer_and_serial], octet_string(aes_key_wrap(kek, cek)),
    ))
    return joined(element(0xA1, [
        *integer(3), *originator, _ECDH_AES256_WRAP, *recipient_encrypted_keys,
    ]))


def _retagged(tag: int, encoded: bytes) -> bytes:
    """A DER element with its identifier octet replaced (IMPLICIT tagging of a SEQUENCE)."""
    return bytes([tag]) + encoded[1:]


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
    infos: list[bytes] = []
    agreement = False
    for certificate in recipients:
        public_key = certificate.public_key()
        if isinstance(public_key, rsa.RSAPublicKey):
            infos.append(_key_transport(certificate, public_key, cek, key_transport))
        elif isinstance(public_key, ec.EllipticCurvePublicKey):
            infos.append(_key_agreement(certificate, public_key, cek))
            agreement = True
        else:
            raise ValueError("recipient key is neither RSA nor EC")
    if content_encryption == "aes-256-gcm":
        nonce = random(12)
        ciphertext, tag = gcm_encrypt(cek, nonce, content)
        parameters = sequence(octet_string(nonce), integer(len(tag)))  # RFC 5084 §3.2
        auth_enveloped = sequence(
            integer(0),
            set_of(infos),
            sequence(
                [_DATA],
                sequence([_AES256_GCM], parameters),
                element(0x80, [ciphertext]),  # encryptedContent [0] IMPLICIT OCTET STRING
            ),
            octet_string(tag),  # mac
        )
        return joined(sequence([_AUTH_ENVELOPED_DATA], element(0xA0, auth_enveloped)))
    iv = random(16)
    enveloped = sequence(
        # RFC 5652 §6.1: version 2 as soon as a RecipientInfo is not version 0 (kari is v3).
        integer(2 if agreement else 0),
        set_of(infos),
        sequence(
            [_DATA],
            sequence([_AES256_CBC], octet_string(iv)),
            element(0x80, [cbc_encrypt(cek, iv, content)]),
        ),
    )
    return joined(sequence([_ENVELOPED_DATA], element(0xA0, enveloped)))
