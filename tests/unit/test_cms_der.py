"""adapters/cms/der.py, sign.py, encrypt.py: the CMS the gateway writes is the DER asn1crypto
would write for the same structure.

The gateway writes its SignedData and EnvelopedData as octets around constants rather than
building asn1crypto objects per message. The oracles below build the same structures with
asn1crypto's encoder (as the gateway once did): RSA PKCS #1 v1.5 signatures are
deterministic, so signed output must be identical octet for octet; where the output draws
randomness (PSS salts, ECDSA, RSA encryption padding, ECDH ephemeral keys), everything but
those values must be identical, and the result must still verify or decrypt.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest
from asn1crypto import algos, cms, core
from asn1crypto import x509 as asn1_x509
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding
from cryptography.hazmat.primitives.serialization import Encoding

from adapters.base import Identity
from adapters.cms import der
from adapters.cms.ciphers import GcmParameters, cbc_encrypt, gcm_encrypt, tlv
from adapters.cms.encrypt import encrypt_content
from adapters.cms.envelope import open_envelope
from adapters.cms.sign import sign_content
from adapters.cms.verify import read_signed_data
from tests.support.smime_pki import NOW, SmimePki, fixed_random

CONTENT = b"Content-Type: text/plain\r\n\r\nCompte rendu.\r\n" * 20


@pytest.fixture(scope="module")
def pki() -> SmimePki:
    pki = SmimePki.create()
    pki.person("rsa@medecin.fr")
    pki.person("ec@medecin.fr", curve=ec.SECP256R1())
    return pki


# -- primitives -------------------------------------------------------------------------------

@pytest.mark.parametrize("value", [
    0, 1, 127, 128, 255, 256, 32767, 32768, -1, -128, -129, -32768, 2**159 - 1, 2**160,
])
def test_integer_is_asn1cryptos(value: int) -> None:
    assert der.joined(der.integer(value)) == core.Integer(value).dump()


@pytest.mark.parametrize("dotted", [
    "1.2.840.113549.1.7.2", "2.16.840.1.101.3.4.1.46", "1.3.132.1.11.1", "2.999.3", "0.39",
])
def test_object_identifier_is_asn1cryptos(dotted: str) -> None:
    assert der.object_identifier(dotted) == core.ObjectIdentifier(dotted).dump()


@pytest.mark.parametrize("size", [0, 1, 127, 128, 255, 256, 65535, 65536, 3 * 2**20])
def test_lengths_are_asn1cryptos(size: int) -> None:
    data = b"\x00" * size
    assert der.joined(der.octet_string(data)) == core.OctetString(data).dump()


@pytest.mark.parametrize("moment", [
    dt.datetime(2026, 5, 1, 12, 30, 15, tzinfo=dt.UTC),
    dt.datetime(2026, 5, 1, 12, 30, 15, 250000, tzinfo=dt.UTC),
    dt.datetime(2051, 1, 2, 3, 4, 5, tzinfo=dt.UTC),
    dt.datetime(2051, 1, 2, 3, 4, 5, 120000, tzinfo=dt.UTC),
    dt.datetime(1949, 12, 31, 23, 59, 59, tzinfo=dt.UTC),
    dt.datetime(2026, 5, 1, 14, 30, tzinfo=dt.timezone(dt.timedelta(hours=2))),
])
def test_signing_time_is_asn1cryptos(moment: dt.datetime) -> None:
    utc = moment.astimezone(dt.UTC)
    choice = "utc_time" if 1950 <= utc.year < 2050 else "generalized_time"
    assert der.signing_time(moment) == cms.Time({choice: utc}).dump()


def test_set_of_sorts_its_members() -> None:
    assert der.joined(der.set_of([b"\x02\x01\x05", b"\x02\x01\x01"])) == (
        b"\x31\x06\x02\x01\x01\x02\x01\x05"
    )


# -- SignedData -------------------------------------------------------------------------------

def _asn1(certificate: x509.Certificate) -> Any:
    return asn1_x509.Certificate.load(certificate.public_bytes(Encoding.DER))


def oracle_signed_attributes(content: bytes, now: dt.datetime) -> cms.CMSAttributes:
    digest = hashes.Hash(hashes.SHA256())
    digest.update(content)
    utc = now.astimezone(dt.UTC)
    time = (cms.Time({"utc_time": utc}) if 1950 <= now.year < 2050
            else cms.Time({"generalized_time": utc}))
    # smimeCapabilities (RFC 8551 §2.5.2), which asn1crypto does not model, by hand.
    capabilities = tlv(0x30, core.ObjectIdentifier("1.2.840.113549.1.9.15").dump() + tlv(
        0x31, tlv(0x30, b"".join(
            tlv(0x30, core.ObjectIdentifier(algos.EncryptionAlgorithmId.unmap(name)).dump())
            for name in ("aes256_gcm", "aes256_cbc", "aes128_gcm", "aes128_cbc")
        ))
    ))
    attributes = sorted([
        *(bytes(cms.CMSAttribute({"type": kind, "values": [value]}).dump())
          for kind, value in (("content_type", "data"), ("signing_time", time),
                              ("message_digest", digest.finalize()))),
        capabilities,
    ])
    return cms.CMSAttributes.load(der.joined(der.element(0x31, attributes)))


def oracle_signed_data(
    content: bytes, certificate: x509.Certificate, chain: tuple[x509.Certificate, ...],
    now: dt.datetime, detached: bool, algorithm: dict[str, Any], signature: bytes,
) -> bytes:
    own = _asn1(certificate)
    signer_info = cms.SignerInfo({
        "version": "v1",
        "sid": cms.SignerIdentifier({"issuer_and_serial_number": cms.IssuerAndSerialNumber({
            "issuer": own.issuer, "serial_number": own.serial_number,
        })}),
        "digest_algorithm": algos.DigestAlgorithm({"algorithm": "sha256"}),
        "signed_attrs": oracle_signed_attributes(content, now),
        "signature_algorithm": algos.SignedDigestAlgorithm(algorithm),
        "signature": signature,
    })
    encapsulated: dict[str, object] = {"content_type": "data"}
    if not detached:
        encapsulated["content"] = content
    return bytes(cms.ContentInfo({"content_type": "signed_data", "content": cms.SignedData({
        "version": "v1",
        "digest_algorithms": [algos.DigestAlgorithm({"algorithm": "sha256"})],
        "encap_content_info": encapsulated,
        "certificates": [own, *(_asn1(c) for c in chain)],
        "signer_infos": [signer_info],
    })}).dump())


def _signature_of(encoded: bytes) -> bytes:
    signed = cms.ContentInfo.load(encoded)["content"]
    return bytes(signed["signer_infos"][0]["signature"].native)


@pytest.mark.parametrize("detached", [True, False])
@pytest.mark.parametrize("now", [NOW, NOW.replace(microsecond=123456),
                                 dt.datetime(2051, 3, 1, 8, 0, 0, 500, tzinfo=dt.UTC)])
def test_rsa_signed_data_is_identical_to_asn1cryptos(
    pki: SmimePki, detached: bool, now: dt.datetime,
) -> None:
    person = pki.people["rsa@medecin.fr"]
    chain = (pki.intermediate.certificate, pki.root.certificate)
    made, micalg = sign_content(CONTENT, person.certificate, person.key, chain=chain, now=now,
                                detached=detached)
    expected = oracle_signed_data(CONTENT, person.certificate, chain, now, detached,
                                  {"algorithm": "rsassa_pkcs1v15"}, _signature_of(made))
    assert micalg == "sha-256"
    assert made == expected
    # And the signature is the one asn1crypto's signed attributes call for.
    attributes = oracle_signed_attributes(CONTENT, now).dump()
    signed_set = b"\x31" + attributes[1:]
    person.certificate.public_key().verify(  # type: ignore[call-arg, union-attr]
        _signature_of(made), signed_set, padding.PKCS1v15(), hashes.SHA256(),  # type: ignore[arg-type]
    )


@pytest.mark.parametrize(("address", "signature_padding", "algorithm"), [
    ("rsa@medecin.fr", "pss", {
        "algorithm": "rsassa_pss",
        "parameters": algos.RSASSAPSSParams({
            "hash_algorithm": {"algorithm": "sha256"},
            "mask_gen_algorithm": {"algorithm": "mgf1", "parameters": {"algorithm": "sha256"}},
            "salt_length": 32,
        }),
    }),
    ("ec@medecin.fr", "pkcs1", {"algorithm": "sha256_ecdsa"}),
])
def test_randomised_signatures_differ_from_asn1cryptos_only_by_the_signature(
    pki: SmimePki, address: str, signature_padding: str, algorithm: dict[str, Any],
) -> None:
    person = pki.people[address]
    made, _ = sign_content(CONTENT, person.certificate, person.key, now=NOW, detached=True,
                           chain=(pki.intermediate.certificate,),
                           signature_padding=signature_padding)  # type: ignore[arg-type]
    assert made == oracle_signed_data(CONTENT, person.certificate,
                                      (pki.intermediate.certificate,), NOW, True, algorithm,
                                      _signature_of(made))
    checked = read_signed_data(cms.ContentInfo.load(made)["content"], CONTENT)
    assert [check.valid for check in checked.signers] == [True]


# -- EnvelopedData ----------------------------------------------------------------------------

_RANDOMISED = {"encrypted_key", "public_key"}


def _without_randomness(value: Any) -> Any:
    """The native structure with RSA ciphertexts and ephemeral public keys blanked."""
    if isinstance(value, dict):
        return {key: (None if key in _RANDOMISED else _without_randomness(item))
                for key, item in value.items()}
    if isinstance(value, list):
        return [_without_randomness(item) for item in value]
    return value


def _recipient_order(native: Any) -> Any:
    # SET OF RecipientInfo is sorted by encodings, which contain the random key ciphertexts.
    content = native["content"]
    content["recipient_infos"] = sorted(content["recipient_infos"], key=repr)
    return native


@pytest.mark.parametrize("content_encryption", ["aes-256-cbc", "aes-256-gcm"])
@pytest.mark.parametrize("key_transport", ["rsa-pkcs1", "rsa-oaep"])
def test_enveloped_data_matches_asn1crypto_and_opens(
    pki: SmimePki, content_encryption: str, key_transport: str,
) -> None:
    rsa_person, ec_person = pki.people["rsa@medecin.fr"], pki.people["ec@medecin.fr"]
    made = encrypt_content(CONTENT, [rsa_person.certificate, ec_person.certificate],
                           random=fixed_random(3), content_encryption=content_encryption,  # type: ignore[arg-type]
                           key_transport=key_transport)  # type: ignore[arg-type]
    loaded = cms.ContentInfo.load(made)
    # Canonical DER: asn1crypto's own encoder, fed the parsed values, writes the same octets.
    assert loaded.dump(force=True) == made
    random = fixed_random(3)
    cek = random(32)
    authenticated = content_encryption == "aes-256-gcm"
    if authenticated:
        nonce = random(12)
        ciphertext, tag = gcm_encrypt(cek, nonce, CONTENT)
        content_info = {
            "content_type": "data",
            "content_encryption_algorithm": {
                "algorithm": "aes256_gcm",
                "parameters": GcmParameters({"aes_nonce": nonce, "aes_icvlen": 16}),
            },
            "encrypted_content": ciphertext,
        }
    else:
        iv = random(16)
        content_info = {
            "content_type": "data",
            "content_encryption_algorithm": {"algorithm": "aes256_cbc", "parameters": iv},
            "encrypted_content": cbc_encrypt(cek, iv, CONTENT),
        }
    parsed = cms.ContentInfo.load(made)["content"]
    infos = [cms.RecipientInfo.load(info.dump()) for info in parsed["recipient_infos"]]
    if authenticated:
        expected = cms.ContentInfo({
            "content_type": "authenticated_enveloped_data",
            "content": cms.AuthEnvelopedData({
                "version": "v0", "recipient_infos": infos,
                "auth_encrypted_content_info": content_info, "mac": tag,
            }),
        })
    else:
        expected = cms.ContentInfo({
            "content_type": "enveloped_data",
            "content": cms.EnvelopedData({
                "version": "v2", "recipient_infos": infos,
                "encrypted_content_info": content_info,
            }),
        })
    assert expected.dump() == made
    assert _without_randomness(_recipient_order(loaded.native)) == _without_randomness(
        _recipient_order(expected.native)
    )
    kinds = sorted(info.name for info in infos)
    assert kinds == ["kari", "ktri"]
    for person in (rsa_person, ec_person):
        me = Identity("me", certificate=person.certificate, private_key=person.key)
        kind = loaded["content_type"].native
        assert open_envelope(kind, loaded["content"], me).content == CONTENT


def test_enveloped_data_to_rsa_only_is_version_0(pki: SmimePki) -> None:
    person = pki.people["rsa@medecin.fr"]
    made = encrypt_content(CONTENT, [person.certificate], random=fixed_random())
    assert cms.ContentInfo.load(made)["content"]["version"].native == "v0"
