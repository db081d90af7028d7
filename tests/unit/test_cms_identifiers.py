"""adapters/cms/identifiers.py: a signer or recipient named by issuer and serial number is
found whether its issuer name comes with the certificate's own octets (the fast path) or in
another encoding of the same name (RFC 5280 §7.1), and never for another name."""

from __future__ import annotations

import base64
from typing import Any

import pytest
from asn1crypto import cms
from asn1crypto import x509 as asn1_x509
from cryptography.hazmat.primitives.serialization import Encoding

from adapters.base import Identity
from adapters.cms.encrypt import encrypt_content
from adapters.cms.identifiers import comparison_form, ids, same_name
from adapters.cms.sign import sign_content
from adapters.smime import SmimeAdapter
from gateway.errors import PermanentFailure, Reason
from tests.support.smime_pki import NOW, SmimePki, fixed_random, unwrap_context

ADAPTER = SmimeAdapter()
PART = b"Content-Type: text/plain\r\n\r\nCompte rendu.\r\n"
HEAD = (b"From: <alice@medecin.fr>\r\nTo: <bob@medecin.fr>\r\nSubject: CR\r\n"
        b"Date: " + NOW.strftime("%a, %d %b %Y %H:%M:%S +0000").encode() + b"\r\n"
        b"MIME-Version: 1.0\r\n")


@pytest.fixture(scope="module")
def pki() -> SmimePki:
    pki = SmimePki.create()
    pki.person("alice@medecin.fr")
    pki.person("bob@medecin.fr")
    return pki


def respelled(name: Any) -> asn1_x509.Name:
    """The same name (RFC 5280 §7.1: case-insensitive after RFC 4518 preparation) with its
    common and organisation names in lower case and as PrintableString: other octets."""
    rdns = []
    for rdn in name.chosen:
        values = []
        for item in rdn:
            value = item["value"]
            if item["type"].native in ("common_name", "organization_name"):
                value = asn1_x509.DirectoryString(name="printable_string",
                                                  value=value.native.lower())
            values.append(asn1_x509.NameTypeAndValue({"type": item["type"], "value": value}))
        rdns.append(asn1_x509.RelativeDistinguishedName(values))
    return asn1_x509.Name(name="", value=asn1_x509.RDNSequence(rdns))


def other_name() -> asn1_x509.Name:
    return asn1_x509.Name.build({"common_name": "TEST AC AUTRE", "country_name": "FR"})


def test_the_respelled_name_is_the_same_name_in_other_octets(pki: SmimePki) -> None:
    issuer = ids(pki.people["alice@medecin.fr"].certificate).issuer
    loaded = asn1_x509.Name.load(issuer)
    again = respelled(loaded)
    assert again.dump() != issuer
    assert same_name(again, issuer) and same_name(loaded, issuer)
    assert comparison_form(again.dump()) == comparison_form(issuer)
    assert not same_name(other_name(), issuer)


def test_ids_are_the_certificates_own(pki: SmimePki) -> None:
    certificate = pki.people["alice@medecin.fr"].certificate
    parsed = asn1_x509.Certificate.load(certificate.public_bytes(Encoding.DER))
    found = ids(certificate)
    assert found.issuer == parsed.issuer.dump()
    assert found.serial == certificate.serial_number
    assert found.issuer_and_serial == cms.IssuerAndSerialNumber(
        {"issuer": parsed.issuer, "serial_number": certificate.serial_number}
    ).dump()


def _b64(der: bytes) -> bytes:
    text = base64.b64encode(der)
    return b"".join(text[i: i + 64] + b"\r\n" for i in range(0, len(text), 64))


def _signed_with_sid_issuer(pki: SmimePki, issuer: asn1_x509.Name) -> bytes:
    alice = pki.people["alice@medecin.fr"]
    der, _ = sign_content(PART, alice.certificate, alice.key, now=NOW, detached=False,
                          chain=(pki.intermediate.certificate,))
    info = cms.ContentInfo.load(der)
    sid = info["content"]["signer_infos"][0]["sid"]
    serial = sid.chosen["serial_number"].native
    info["content"]["signer_infos"][0]["sid"] = cms.SignerIdentifier({
        "issuer_and_serial_number": {"issuer": issuer, "serial_number": serial},
    })
    return HEAD + (b"Content-Type: application/pkcs7-mime; smime-type=signed-data; "
                   b"name=smime.p7m\r\nContent-Transfer-Encoding: base64\r\n\r\n"
                   + _b64(info.dump(force=True)))


def test_signer_named_in_another_encoding_of_its_issuer_is_found(pki: SmimePki) -> None:
    issuer = asn1_x509.Name.load(ids(pki.people["alice@medecin.fr"].certificate).issuer)
    verdict = ADAPTER.unwrap(_signed_with_sid_issuer(pki, respelled(issuer)),
                             unwrap_context(pki)).signature
    assert verdict.result == "pass", verdict
    assert verdict.signer == "alice@medecin.fr"


def test_signer_named_with_its_serial_under_another_issuer_is_not_found(pki: SmimePki) -> None:
    verdict = ADAPTER.unwrap(_signed_with_sid_issuer(pki, other_name()),
                             unwrap_context(pki)).signature
    assert verdict.result == "fail"
    assert verdict.failure is Reason.UNTRUSTED_SIGNER
    assert verdict.reason == "signer certificate not found"


def _encrypted_with_rid_issuer(pki: SmimePki, issuer: asn1_x509.Name) -> bytes:
    bob = pki.people["bob@medecin.fr"]
    der = encrypt_content(HEAD + PART, [bob.certificate], random=fixed_random())
    info = cms.ContentInfo.load(der)
    recipient = info["content"]["recipient_infos"][0].chosen
    serial = recipient["rid"].chosen["serial_number"].native
    recipient["rid"] = cms.RecipientIdentifier({
        "issuer_and_serial_number": {"issuer": issuer, "serial_number": serial},
    })
    return HEAD + (b"Content-Type: application/pkcs7-mime; smime-type=enveloped-data; "
                   b"name=smime.p7m\r\nContent-Transfer-Encoding: base64\r\n\r\n"
                   + _b64(info.dump(force=True)))


def test_recipient_named_in_another_encoding_of_its_issuer_decrypts(pki: SmimePki) -> None:
    bob = pki.people["bob@medecin.fr"]
    issuer = asn1_x509.Name.load(ids(bob.certificate).issuer)
    out = ADAPTER.unwrap(_encrypted_with_rid_issuer(pki, respelled(issuer)),
                         unwrap_context(pki, me=bob))
    assert out.encrypted
    assert out.content.endswith(PART)


def test_recipient_named_with_its_serial_under_another_issuer_is_not_us(pki: SmimePki) -> None:
    bob = pki.people["bob@medecin.fr"]
    with pytest.raises(PermanentFailure) as caught:
        ADAPTER.unwrap(_encrypted_with_rid_issuer(pki, other_name()),
                       unwrap_context(pki, me=bob))
    assert caught.value.reason is Reason.NO_DECRYPTION_KEY


def test_identity_without_the_recipient_is_refused_the_same(pki: SmimePki) -> None:
    alice = pki.people["alice@medecin.fr"]
    bob = pki.people["bob@medecin.fr"]
    der = encrypt_content(HEAD + PART, [bob.certificate], random=fixed_random())
    raw = HEAD + (b"Content-Type: application/pkcs7-mime; smime-type=enveloped-data\r\n"
                  b"Content-Transfer-Encoding: base64\r\n\r\n" + _b64(der))
    context = unwrap_context(pki)
    context = type(context)(network=context.network, trust=context.trust,
                            directory=context.directory, now=context.now,
                            identity=Identity("x", alice.certificate, alice.key))
    with pytest.raises(PermanentFailure) as caught:
        ADAPTER.unwrap(raw, context)
    assert caught.value.reason is Reason.NO_DECRYPTION_KEY
