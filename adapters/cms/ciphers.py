"""Symmetric and key-agreement primitives shared by decryption and encryption.

Followed: RFC 3565 (AES-CBC in CMS, IV as the OCTET STRING parameter), RFC 5084 (AES-GCM in
CMS: GCMParameters, the ICV is AuthEnvelopedData.mac), RFC 5652 §6.3 (PKCS #7 padding),
RFC 5753 §3.1 and §7.2 (ECDH key agreement: ANSI X9.63 KDF over ECC-CMS-SharedInfo,
AES key wrap RFC 3394), RFC 8017 / RFC 4055 (RSAES-OAEP parameters).

Untrusted input: algorithm identifiers and parameters from received EnvelopedData.
"""

from __future__ import annotations

from typing import Any, ClassVar

from asn1crypto import core
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.x963kdf import X963KDF

__all__ = [
    "ECDH_SCHEMES",
    "HASHES",
    "GcmParameters",
    "cbc_decrypt",
    "cbc_encrypt",
    "content_algorithm",
    "ecdh_kek",
    "gcm_decrypt",
    "gcm_encrypt",
    "tlv",
]

HASHES: dict[str, type[hashes.HashAlgorithm]] = {
    "sha1": hashes.SHA1,
    "sha224": hashes.SHA224,
    "sha256": hashes.SHA256,
    "sha384": hashes.SHA384,
    "sha512": hashes.SHA512,
}

# RFC 5753 §7.1.4 / RFC 8418-era registrations: OID -> KDF hash. The cofactor variants give the
# same shared secret on the prime-order NIST curves (cofactor 1).
ECDH_SCHEMES: dict[str, str] = {
    "1.3.133.16.840.63.0.2": "sha1",  # dhSinglePass-stdDH-sha1kdf-scheme
    "1.3.132.1.11.0": "sha224",
    "1.3.132.1.11.1": "sha256",
    "1.3.132.1.11.2": "sha384",
    "1.3.132.1.11.3": "sha512",
    "1.3.133.16.840.63.0.3": "sha1",  # dhSinglePass-cofactorDH-sha1kdf-scheme
    "1.3.132.1.14.0": "sha224",
    "1.3.132.1.14.1": "sha256",
    "1.3.132.1.14.2": "sha384",
    "1.3.132.1.14.3": "sha512",
}


class GcmParameters(core.Sequence):  # type: ignore[misc]
    """RFC 5084 §3.2 GCMParameters (asn1crypto does not model it)."""

    _fields: ClassVar[list[tuple[Any, ...]]] = [
        ("aes_nonce", core.OctetString),
        ("aes_icvlen", core.Integer, {"default": 12}),
    ]


def tlv(tag: int, body: bytes) -> bytes:
    """One DER element (definite length)."""
    length = len(body)
    if length < 0x80:
        header = bytes([length])
    else:
        size = length.to_bytes((length.bit_length() + 7) // 8, "big")
        header = bytes([0x80 | len(size)]) + size
    return bytes([tag]) + header + body


def _aes(key: bytes) -> algorithms.AES:
    if len(key) not in (16, 24, 32):
        raise ValueError("AES key of a wrong length")
    return algorithms.AES(key)


def cbc_decrypt(key: bytes, iv: bytes, data: bytes) -> bytes:
    """AES-CBC with the PKCS #7 padding of RFC 5652 §6.3 checked; ValueError if wrong."""
    if len(iv) != 16 or not data or len(data) % 16:
        raise ValueError("CBC ciphertext or IV of a wrong length")
    decryptor = Cipher(_aes(key), modes.CBC(iv)).decryptor()
    padded = decryptor.update(data) + decryptor.finalize()
    pad = padded[-1]
    if not 1 <= pad <= 16 or padded[-pad:] != bytes([pad]) * pad:
        raise ValueError("bad padding")
    return padded[:-pad]


def cbc_encrypt(key: bytes, iv: bytes, data: bytes) -> bytes:
    pad = 16 - len(data) % 16
    encryptor = Cipher(_aes(key), modes.CBC(iv)).encryptor()
    return encryptor.update(data + bytes([pad]) * pad) + encryptor.finalize()


def gcm_decrypt(key: bytes, nonce: bytes, tag: bytes, data: bytes, aad: bytes) -> bytes:
    """AES-GCM; raises cryptography's InvalidTag when the content or attributes were altered."""
    if not 12 <= len(tag) <= 16:
        raise ValueError("GCM tag of a wrong length")
    decryptor = Cipher(_aes(key), modes.GCM(nonce, tag, min_tag_length=12)).decryptor()
    if aad:
        decryptor.authenticate_additional_data(aad)
    return decryptor.update(data) + decryptor.finalize()


def gcm_encrypt(key: bytes, nonce: bytes, data: bytes) -> tuple[bytes, bytes]:
    encryptor = Cipher(_aes(key), modes.GCM(nonce)).encryptor()
    ciphertext = encryptor.update(data) + encryptor.finalize()
    return ciphertext, encryptor.tag


def ecdh_kek(
    shared_secret: bytes, kdf_hash: str, wrap_oid: str, key_bytes: int, ukm: bytes | None
) -> bytes:
    """The key-encryption key of RFC 5753 §3.1.1: X9.63 KDF over ECC-CMS-SharedInfo."""
    key_info = tlv(0x30, core.ObjectIdentifier(wrap_oid).dump())  # parameters absent
    entity_info = tlv(0xA0, tlv(0x04, ukm)) if ukm is not None else b""
    supp_pub_info = tlv(0xA2, tlv(0x04, (key_bytes * 8).to_bytes(4, "big")))
    shared_info = tlv(0x30, key_info + entity_info + supp_pub_info)
    return X963KDF(
        algorithm=HASHES[kdf_hash](), length=key_bytes, sharedinfo=shared_info
    ).derive(shared_secret)


def content_algorithm(algorithm: Any) -> tuple[str, int]:
    """("cbc" | "gcm", key length in bytes) for an AES content-encryption AlgorithmIdentifier."""
    name = algorithm["algorithm"].native
    table = {
        "aes128_cbc": ("cbc", 16), "aes192_cbc": ("cbc", 24), "aes256_cbc": ("cbc", 32),
        "aes128_gcm": ("gcm", 16), "aes192_gcm": ("gcm", 24), "aes256_gcm": ("gcm", 32),
    }
    if name not in table:
        raise KeyError(name)
    return table[name]
