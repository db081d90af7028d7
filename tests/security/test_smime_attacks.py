"""Security regressions of the S/MIME adapter, one named test per attack, on the adapter itself
(sans-I/O: messages made in memory with the adapter's own CMS signer and encryptor).

Two families:
- forged authorship: a signature over ciphertext, or a second From: field, must never let a
  signer be reported (or a signed entity be passed on) for content they did not sign;
- algorithmic complexity: inputs of a few MiB shaped to hit super-linear code (a header
  folded over a million lines, half a million MIME parts, thousands of SignerInfos). They take
  minutes with quadratic code; here they must simply finish (no timing assertion: a
  regression shows as a hang) and give the right answer.
"""

from __future__ import annotations

import base64
import os

import pytest
from asn1crypto import cms
from asn1crypto import x509 as asn1_x509
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from adapters.base import Unwrapped, Verdict
from adapters.cms.encrypt import encrypt_content
from adapters.cms.entity import MAX_CONTENT_TYPE, decode_body, multipart_parts, parse_entity
from adapters.cms.sign import sign_content
from adapters.cms.verify import MAX_SIGNERS
from adapters.smime import SmimeAdapter
from gateway.config import NetworkSettings, PeerRule, Requirements
from gateway.errors import PermanentFailure, Reason
from gateway.pipeline import enforce
from tests.support.smime_pki import NOW, SmimePki, unwrap_context, wrap_context
from tests.support.testpki import Issued

ADAPTER = SmimeAdapter()
DATE = NOW.strftime("%a, %d %b %Y %H:%M:%S +0000").encode()
PART = b"Content-Type: text/plain; charset=utf-8\r\n\r\nCompte rendu de consultation.\r\n"
MiB = 1024 * 1024


@pytest.fixture(scope="module")
def pki() -> SmimePki:
    pki = SmimePki.create()
    pki.person("alice@medecin.fr")
    pki.person("mallory@medecin.fr")
    pki.person("gw@passerelle.test")
    pki.person("bob@medecin.fr")
    return pki


def b64(der: bytes) -> bytes:
    text = base64.b64encode(der)
    return b"".join(text[i: i + 76] + b"\r\n" for i in range(0, len(text), 76))


def head(sender: str) -> bytes:
    return (f"From: {sender}\r\nTo: dr.martin@chu-test.fr\r\nSubject: CR\r\n".encode()
            + b"Date: " + DATE + b"\r\nMIME-Version: 1.0\r\n")


def opaque(signer: Issued, content: bytes) -> bytes:
    """An opaque signed-data entity (Content-* fields and body) over `content`."""
    der, _ = sign_content(content, signer.certificate, signer.key, now=NOW, detached=False,
                          chain=(signer.issuer.certificate,) if signer.issuer else ())
    return (b"Content-Type: application/pkcs7-mime; smime-type=signed-data; name=smime.p7m\r\n"
            b"Content-Transfer-Encoding: base64\r\n\r\n" + b64(der))


def clear_signed(signer: Issued, part: bytes) -> bytes:
    """A multipart/signed entity over `part`."""
    der, _ = sign_content(part, signer.certificate, signer.key, now=NOW, detached=True,
                          chain=(signer.issuer.certificate,) if signer.issuer else ())
    return (b'Content-Type: multipart/signed; protocol="application/pkcs7-signature"; '
            b'micalg=sha-256; boundary="s1"\r\n\r\n--s1\r\n' + part + b"\r\n--s1\r\n"
            b"Content-Type: application/pkcs7-signature; name=smime.p7s\r\n"
            b"Content-Transfer-Encoding: base64\r\n\r\n" + b64(der) + b"--s1--\r\n")


def enveloped(content: bytes, recipient: Issued) -> bytes:
    der = encrypt_content(content, [recipient.certificate], random=os.urandom)
    return (b"Content-Type: application/pkcs7-mime; smime-type=enveloped-data; "
            b"name=smime.p7m\r\nContent-Transfer-Encoding: base64\r\n\r\n" + b64(der))


def decoy_certificate(signer: Issued) -> cms.CertificateChoices:
    """A certificate with the signer's serial number under another issuer's name."""
    key = ec.generate_private_key(ec.SECP256R1())
    certificate = (
        x509.CertificateBuilder()
        .subject_name(signer.certificate.subject)
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "DECOY CA")]))
        .public_key(key.public_key())
        .serial_number(signer.certificate.serial_number)
        .not_valid_before(signer.certificate.not_valid_before_utc)
        .not_valid_after(signer.certificate.not_valid_after_utc)
        .sign(key, hashes.SHA256())
    )
    return cms.CertificateChoices({"certificate": asn1_x509.Certificate.load(
        certificate.public_bytes(Encoding.DER))})


def signed_data_with(signer: Issued, *, signer_infos: int, certificates: int) -> bytes:
    """An opaque signed-data message whose SignerInfo is repeated and which carries many
    decoys of the signer's certificate: only an index, not a scan of the certificates for
    each SignerInfo, keeps finding the signer cheap."""
    der, _ = sign_content(PART, signer.certificate, signer.key, now=NOW, detached=False,
                          chain=(signer.issuer.certificate,) if signer.issuer else ())
    signed = cms.ContentInfo.load(der)["content"]
    rebuilt = cms.SignedData({
        "version": "v1",
        "digest_algorithms": signed["digest_algorithms"],
        "encap_content_info": signed["encap_content_info"],
        "certificates": [decoy_certificate(signer)] * certificates + list(signed["certificates"]),
        "signer_infos": [signed["signer_infos"][0]] * signer_infos,
    })
    blob = cms.ContentInfo({"content_type": "signed_data", "content": rebuilt}).dump()
    return head("alice@medecin.fr") + (
        b"Content-Type: application/pkcs7-mime; smime-type=signed-data; name=smime.p7m\r\n"
        b"Content-Transfer-Encoding: base64\r\n\r\n" + b64(blob)
    )


def wrap_for_bob(pki: SmimePki, message: Unwrapped) -> bytes:
    wrapped = ADAPTER.wrap(message, wrap_context(
        pki, pki.people["gw@passerelle.test"], ("bob@medecin.fr",)))
    assert list(wrapped.recipient_keys) == ["bob@medecin.fr"]
    return wrapped.content


# -- forged authorship -------------------------------------------------------------------------


def test_ciphertext_resigned_by_an_eavesdropper_is_not_attributed_to_them(
    pki: SmimePki,
) -> None:
    # Mallory copies Alice's mail encrypted to the gateway and signs the ciphertext as his
    # own, without ever reading it: RFC 8551 §3.7, such a signature binds no one to the
    # content. It verifies, so it is neutral, never a pass, and a network that requires
    # signatures refuses it.
    # Alice's client encrypted the bare MIME entity (her header fields are outside).
    alices = enveloped(PART, pki.people["gw@passerelle.test"])
    raw = head("mallory@medecin.fr") + opaque(pki.people["mallory@medecin.fr"], alices)
    out = ADAPTER.unwrap(raw, unwrap_context(pki, me=pki.people["gw@passerelle.test"]))
    assert out.signature.result == "neutral", out.signature
    assert out.signed_entity is None
    with pytest.raises(PermanentFailure) as caught:
        enforce(_network(), Requirements(signature=True), out)
    assert caught.value.reason is Reason.SIGNATURE_MISSING
    assert "covers only the encrypted content" in caught.value.advice
    assert out.signature.signer is None and out.signature.signer_subject is None
    # With her header fields encrypted too, her From: (under the encryption) wins. Mallory's
    # certificate does not match it, but his signature claims nothing about her content
    # anyway: still neutral, naming nobody (the OpenPGP adapter judges the same shape alike);
    # the audit note of the layer keeps who signed.
    alices = enveloped(head("alice@medecin.fr") + PART, pki.people["gw@passerelle.test"])
    raw = head("mallory@medecin.fr") + opaque(pki.people["mallory@medecin.fr"], alices)
    out = ADAPTER.unwrap(raw, unwrap_context(pki, me=pki.people["gw@passerelle.test"]))
    assert out.signature.result == "neutral" and out.signature.failure is None
    assert out.signature.signer is None and out.signed_entity is None
    assert any("over-ciphertext" in note and "mallory" in note for note in out.notes)


def test_signature_over_ciphertext_is_never_forwarded_as_the_authors(pki: SmimePki) -> None:
    # Encrypt-then-sign by Alice herself: what she signed is a blob only the gateway can
    # open; passing it on would give Bob ciphertext he cannot read under a valid signature.
    raw = head("alice@medecin.fr") + opaque(
        pki.people["alice@medecin.fr"], enveloped(PART, pki.people["gw@passerelle.test"]))
    out = ADAPTER.unwrap(raw, unwrap_context(pki, me=pki.people["gw@passerelle.test"]))
    assert out.signature.result == "neutral" and out.signed_entity is None
    sealed = wrap_for_bob(pki, out)
    seen = ADAPTER.unwrap(sealed, unwrap_context(pki, me=pki.people["bob@medecin.fr"]))
    assert b"pkcs7" not in seen.content.lower()
    assert seen.content.endswith(PART)


def test_second_from_field_inside_a_layer_cannot_ride_on_the_outer_signature(
    pki: SmimePki,
) -> None:
    # Mallory signs around an entity that claims "From: alice" (and holds Alice's genuine
    # signed part): with two From: fields, one would be checked against Mallory's
    # certificate while a reader may show the other. The one under the signatures wins and
    # there is only one.
    inner = b"From: alice@medecin.fr\r\n" + clear_signed(pki.people["alice@medecin.fr"], PART)
    raw = head("mallory@medecin.fr") + opaque(pki.people["mallory@medecin.fr"], inner)
    out = ADAPTER.unwrap(raw, unwrap_context(pki))
    entity = parse_entity(out.content)
    assert [value for name, value in entity.fields if name == "from"] == ["alice@medecin.fr"]
    assert out.signature.result == "fail"
    assert out.signature.failure is Reason.SIGNER_MISMATCH
    assert out.signed_entity is None


def test_relabelled_encapsulated_content_type_fails(pki: SmimePki) -> None:
    # RFC 5652 §11.1: the signed content-type attribute binds eContentType; relabelling the
    # content as another type after signing must not verify.
    alice = pki.people["alice@medecin.fr"]
    der, _ = sign_content(PART, alice.certificate, alice.key, now=NOW, detached=False,
                          chain=(pki.intermediate.certificate,))
    info = cms.ContentInfo.load(der)
    info["content"]["encap_content_info"]["content_type"] = "1.3.6.1.4.1.99999.1"
    relabelled = info.dump(force=True)
    raw = head("alice@medecin.fr") + (
        b"Content-Type: application/pkcs7-mime; smime-type=signed-data; name=smime.p7m\r\n"
        b"Content-Transfer-Encoding: base64\r\n\r\n" + b64(relabelled))
    out = ADAPTER.unwrap(raw, unwrap_context(pki))
    assert out.signature.result == "fail"
    assert out.signature.failure is Reason.SIGNATURE_INVALID
    assert out.signature.reason == "content-type attribute mismatch"
    assert out.signed_entity is None


def _network() -> NetworkSettings:
    return NetworkSettings(name="medecin", adapter="smime", domains=("medecin.fr",),
                           peers=PeerRule())


# -- algorithmic complexity ----------------------------------------------------------------------


def test_header_folded_over_a_million_lines(pki: SmimePki) -> None:
    lines = 3 * MiB // 4
    raw = head("cardio@chu-test.fr") + b"X-Note: start\r\n" + b" x\r\n" * lines + b"\r\nBonjour.\r\n"
    unwrapped = ADAPTER.unwrap(raw, unwrap_context(pki))
    assert parse_entity(unwrapped.content).get("x-note") == "start" + " x" * lines
    sealed = wrap_for_bob(pki, Unwrapped(raw, Verdict.unsigned(), "mime"))
    seen = ADAPTER.unwrap(sealed, unwrap_context(pki, me=pki.people["bob@medecin.fr"]))
    assert seen.content.endswith(b"\r\n\r\nBonjour.\r\n")


def test_half_a_million_mime_parts(pki: SmimePki) -> None:
    parts = 6 * MiB // 10
    raw = head("cardio@chu-test.fr") + (
        b"Content-Type: multipart/mixed; boundary=b\r\n\r\n"
        + b"--b\r\n\r\nx\r\n" * parts + b"--b--\r\n"
    )
    sealed = wrap_for_bob(pki, Unwrapped(raw, Verdict.unsigned(), "mime"))
    seen = ADAPTER.unwrap(sealed, unwrap_context(pki, me=pki.people["bob@medecin.fr"]))
    assert seen.content.count(b"--b\r\n\r\nx\r\n") == parts


def test_content_type_with_a_million_semicolons_is_refused(pki: SmimePki) -> None:
    # email's parameter parser is quadratic in the number of ';' inside quotes.
    field = b'Content-Type: text/plain; name="' + b";" * MiB + b'"\r\n'
    raw = head("cardio@chu-test.fr") + field + b"\r\nBonjour.\r\n"
    assert len(field) > MAX_CONTENT_TYPE
    with pytest.raises(PermanentFailure) as caught:
        ADAPTER.wrap(Unwrapped(raw, Verdict.unsigned(), "mime"), wrap_context(
            pki, pki.people["gw@passerelle.test"], ("bob@medecin.fr",)))
    assert caught.value.enhanced == "5.6.0"
    signed = head("alice@medecin.fr") + b'Content-Type: multipart/signed; boundary="' + (
        b";" * MiB) + b'"\r\n\r\n'
    with pytest.raises(PermanentFailure) as caught:
        ADAPTER.unwrap(signed, unwrap_context(pki))
    assert caught.value.reason is Reason.MALFORMED


def test_thousands_of_signer_infos_are_refused_not_verified_one_by_one(pki: SmimePki) -> None:
    raw = signed_data_with(pki.people["alice@medecin.fr"], signer_infos=2000, certificates=2000)
    assert len(raw) > 2 * MiB
    with pytest.raises(PermanentFailure) as caught:
        ADAPTER.unwrap(raw, unwrap_context(pki))
    assert caught.value.reason is Reason.MALFORMED
    assert "SignerInfos" in caught.value.detail


def test_thousands_of_certificates_with_the_signers_serial_number(pki: SmimePki) -> None:
    raw = signed_data_with(pki.people["alice@medecin.fr"], signer_infos=MAX_SIGNERS,
                           certificates=4000)
    out = ADAPTER.unwrap(raw, unwrap_context(pki))
    assert out.signature.result == "pass", out.signature
    assert out.signature.signer == "alice@medecin.fr"


def test_mime_nested_deeper_than_any_client_is_refused(pki: SmimePki) -> None:
    entity = b"Content-Type: text/plain\r\n\r\nx\r\n"
    for level in range(200):
        entity = (b"Content-Type: multipart/mixed; boundary=n%d\r\n\r\n--n%d\r\n" % (level, level)
                  + entity + b"\r\n--n%d--\r\n" % level)
    raw = head("cardio@chu-test.fr") + entity
    with pytest.raises(PermanentFailure) as caught:
        ADAPTER.wrap(Unwrapped(raw, Verdict.unsigned(), "mime"), wrap_context(
            pki, pki.people["gw@passerelle.test"], ("bob@medecin.fr",)))
    assert caught.value.enhanced == "5.6.0" and "nested deeper" in caught.value.detail


def test_decoded_parts_survive_in_the_linear_rewrite(pki: SmimePki) -> None:
    # The rewrite for linearity must not change a byte of what a recipient decodes.
    raw = head("cardio@chu-test.fr") + (
        b"Content-Type: multipart/mixed; boundary=b\r\n\r\n"
        b"--b\r\nContent-Type: text/plain; charset=iso-8859-1\r\n"
        b"Content-Transfer-Encoding: 8bit\r\n\r\nR\xe9sultats\r\n"
        b"--b\r\nContent-Type: application/octet-stream\r\nContent-Transfer-Encoding: binary\r\n"
        b"\r\n\x00\x01\xff\r\n--b--\r\n"
    )
    sealed = wrap_for_bob(pki, Unwrapped(raw, Verdict.unsigned(), "mime"))
    seen = ADAPTER.unwrap(sealed, unwrap_context(pki, me=pki.people["bob@medecin.fr"]))
    _, parts, _ = multipart_parts(parse_entity(seen.content).body, "b")
    assert [decode_body(parse_entity(part)) for part in parts] == [
        b"R\xe9sultats", b"\x00\x01\xff"
    ]
