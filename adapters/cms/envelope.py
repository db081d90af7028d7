"""Opening CMS EnvelopedData and AuthEnvelopedData with one of the gateway's identities.

Followed: RFC 5652 §6 (EnvelopedData, KeyTransRecipientInfo, KeyAgreeRecipientInfo; the
recipient found by issuer and serial number or by subject key identifier), RFC 5083
(AuthEnvelopedData; authAttrs are authenticated as a DER SET), RFC 5084 (AES-GCM), RFC 3565
(AES-CBC), RFC 3560 / RFC 8017 (RSAES-OAEP), RFC 5753 (ECDH, ephemeral-static).

Every failure after the recipient was found reads the same outward ("could not be
decrypted"): which step failed goes to the audit detail only, so the reply is no padding or
key-unwrap oracle. cryptography's PKCS #1 v1.5 decryption applies implicit rejection.

Untrusted input: the EnvelopedData / AuthEnvelopedData structure and its ciphertexts.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import Any

from asn1crypto import cms
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.keywrap import InvalidUnwrap, aes_key_unwrap

from adapters.base import Identity
from adapters.cms.ciphers import (
    ECDH_SCHEMES,
    HASHES,
    GcmParameters,
    cbc_decrypt,
    content_algorithm,
    ecdh_kek,
    gcm_decrypt,
)
from adapters.cms.identifiers import ids, same_name, subject_key_identifier
from adapters.cms.parse import crypto_failure, octets, set_der, unsupported
from gateway.errors import PermanentFailure, Reason

__all__ = ["Opened", "open_envelope"]

_WRAP_LENGTHS = {"aes128_wrap": 16, "aes192_wrap": 24, "aes256_wrap": 32}


@dataclass(frozen=True)
class Opened:
    content: bytes
    content_algorithm: str  # "aes256_cbc", "aes256_gcm"...
    key_algorithm: str  # "rsaes_pkcs1v15", "rsaes_oaep/sha256", "ecdh/sha256"
    authenticated: bool  # AES-GCM: the ciphertext itself is integrity-protected


class _Identifier:
    """How a recipient identifier names our certificate (issuer+serial or SKI).

    The certificate's issuer, serial and key identifier are read once per certificate
    (identifiers.py); a received issuer name is compared by its octets first.
    """

    def __init__(self, certificate: x509.Certificate) -> None:
        self.certificate = certificate
        self.ids = ids(certificate)
        self.ski = subject_key_identifier(certificate)

    def matches_issuer_serial(self, value: Any) -> bool:
        return bool(value["serial_number"].native == self.ids.serial
                    and same_name(value["issuer"], self.ids.issuer))

    def matches_ski(self, value: bytes) -> bool:
        return self.ski is not None and hmac.compare_digest(self.ski, value)

    def matches(self, rid: Any) -> bool:
        if rid.name == "issuer_and_serial_number":
            return self.matches_issuer_serial(rid.chosen)
        if rid.name == "subject_key_identifier":
            return self.matches_ski(bytes(rid.chosen.native))
        if rid.name == "r_key_id":
            return self.matches_ski(bytes(rid.chosen["subjectKeyIdentifier"].native))
        return False


def _no_key(detail: str) -> PermanentFailure:
    return PermanentFailure(
        "The message is encrypted to a certificate this gateway does not hold; the sender "
        "should encrypt it to the gateway's current certificate",
        enhanced="5.7.5", reason=Reason.NO_DECRYPTION_KEY, detail=detail,
    )


def _key_transport(info: Any, private_key: Any) -> tuple[bytes, str]:
    algorithm = info["key_encryption_algorithm"]
    name = algorithm["algorithm"].native
    encrypted_key = bytes(info["encrypted_key"].native)
    if not isinstance(private_key, rsa.RSAPrivateKey):
        raise crypto_failure("key transport recipient but the identity key is not RSA")
    if name == "rsaes_pkcs1v15":
        try:
            return private_key.decrypt(encrypted_key, padding.PKCS1v15()), name
        except ValueError:
            raise crypto_failure("RSA PKCS#1 v1.5 key decryption failed") from None
    if name == "rsaes_oaep":
        params = algorithm["parameters"]
        hash_name = params["hash_algorithm"]["algorithm"].native
        mgf = params["mask_gen_algorithm"]
        mgf_hash = mgf["parameters"]["algorithm"].native
        label = bytes(params["p_source_algorithm"]["parameters"].native or b"")
        if (mgf["algorithm"].native != "mgf1" or hash_name not in HASHES
                or mgf_hash not in HASHES):
            raise unsupported(f"RSA-OAEP with {hash_name}/{mgf_hash}")
        oaep = padding.OAEP(
            mgf=padding.MGF1(HASHES[mgf_hash]()), algorithm=HASHES[hash_name](),
            label=label or None,
        )
        try:
            return private_key.decrypt(encrypted_key, oaep), f"rsaes_oaep/{hash_name}"
        except ValueError:
            raise crypto_failure("RSA-OAEP key decryption failed") from None
    raise unsupported(f"key transport {name}")


def _key_agreement(info: Any, encrypted_key: bytes, private_key: Any) -> tuple[bytes, str]:
    algorithm = info["key_encryption_algorithm"]
    scheme = algorithm["algorithm"].dotted
    if scheme not in ECDH_SCHEMES:
        raise unsupported(f"key agreement {scheme}")
    if not isinstance(private_key, ec.EllipticCurvePrivateKey):
        raise crypto_failure("key agreement recipient but the identity key is not EC")
    wrap = cms.KeyEncryptionAlgorithm.load(algorithm["parameters"].dump())
    wrap_name = wrap["algorithm"].native
    if wrap_name not in _WRAP_LENGTHS:
        raise unsupported(f"key wrap {wrap_name}")
    originator = info["originator"]
    if originator.name != "originator_key":
        raise unsupported("key agreement with a static originator key")
    point = bytes(originator.chosen["public_key"].native)
    try:
        ephemeral = ec.EllipticCurvePublicKey.from_encoded_point(private_key.curve, point)
        shared = private_key.exchange(ec.ECDH(), ephemeral)
    except ValueError:
        raise crypto_failure("ECDH with the originator's key failed") from None
    ukm = info["ukm"]
    ukm_bytes = bytes(ukm.native) if ukm.native is not None else None
    kek = ecdh_kek(
        shared, ECDH_SCHEMES[scheme], wrap["algorithm"].dotted, _WRAP_LENGTHS[wrap_name],
        ukm_bytes,
    )
    try:
        return aes_key_unwrap(kek, encrypted_key), f"ecdh/{ECDH_SCHEMES[scheme]}"
    except (InvalidUnwrap, ValueError):
        raise crypto_failure("ECDH key unwrap failed") from None


def _content_key(recipient_infos: Any, identity: Identity) -> tuple[bytes, str]:
    certificate, private_key = identity.certificate, identity.private_key
    if certificate is None or private_key is None:
        raise _no_key(f"identity {identity.name!r} has no certificate and key")
    ours = _Identifier(certificate)
    kinds: list[str] = []
    for recipient in recipient_infos:
        kinds.append(recipient.name)
        if recipient.name == "ktri" and ours.matches(recipient.chosen["rid"]):
            return _key_transport(recipient.chosen, private_key)
        if recipient.name == "kari":
            for encrypted_key in recipient.chosen["recipient_encrypted_keys"]:
                if ours.matches(encrypted_key["rid"]):
                    return _key_agreement(
                        recipient.chosen, bytes(encrypted_key["encrypted_key"].native),
                        private_key,
                    )
    raise _no_key(
        f"no recipient info for {certificate.subject.rfc4514_string()} serial "
        f"{certificate.serial_number:x} among {len(kinds)} ({', '.join(sorted(set(kinds)))})"
    )


def open_envelope(content_type: str, envelope: Any, identity: Identity | None) -> Opened:
    """The decrypted content of an EnvelopedData or AuthEnvelopedData."""
    if identity is None:
        raise _no_key("the network has no identity configured to decrypt with")
    key, key_algorithm = _content_key(envelope["recipient_infos"], identity)
    authenticated = content_type == "authenticated_enveloped_data"
    info = envelope["auth_encrypted_content_info" if authenticated else "encrypted_content_info"]
    algorithm = info["content_encryption_algorithm"]
    name = algorithm["algorithm"].native
    try:
        mode, key_length = content_algorithm(algorithm)
    except KeyError:
        raise unsupported(f"content encryption {name}") from None
    if (mode == "gcm") != authenticated:
        # CBC has no integrity: it belongs in EnvelopedData only, GCM in AuthEnvelopedData.
        raise unsupported(f"content encryption {name} in {content_type}")
    if len(key) != key_length:
        raise crypto_failure("content-encryption key of a wrong length")
    if info["encrypted_content"].native is None:
        raise crypto_failure("encrypted content is absent (detached)")
    ciphertext = octets(info["encrypted_content"])
    try:
        if mode == "cbc":
            plaintext = cbc_decrypt(key, bytes(algorithm["parameters"].native), ciphertext)
        else:
            params = GcmParameters.load(algorithm["parameters"].dump())
            attributes = envelope["auth_attrs"]
            aad = set_der(attributes) if attributes.contents else b""
            plaintext = gcm_decrypt(
                key, bytes(params["aes_nonce"].native), bytes(envelope["mac"].native),
                ciphertext, aad,
            )
    except PermanentFailure:
        raise
    except Exception as error:  # bad padding, bad tag, bad IV: one answer outward
        raise crypto_failure(f"content decryption failed: {type(error).__name__}") from None
    return Opened(
        content=plaintext, content_algorithm=name, key_algorithm=key_algorithm,
        authenticated=authenticated,
    )
