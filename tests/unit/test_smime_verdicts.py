"""smime unwrap: each way a signature can be wrong gives its own reason, never a pass.

Messages here are made with the adapter's own CMS signer (no openssl needed); the openssl
interop tests check the same verifier against an independent implementation.
"""

from __future__ import annotations

import base64
import datetime as dt
import re

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from adapters.base import TrustStore, Verdict
from adapters.cms.sign import sign_content
from adapters.smime import SmimeAdapter
from gateway.errors import PermanentFailure, Reason
from tests.support.smime_pki import NOW, SmimePki, unwrap_context
from tests.support.testpki import Issued, root

ADAPTER = SmimeAdapter()
PART = (
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"Content-Transfer-Encoding: quoted-printable\r\n\r\n"
    b"Compte rendu de consultation.\r\n"
)
HEAD = (
    b"From: Dr Martin <martin@medecin.fr>\r\nTo: bob@chu-test.fr\r\n"
    b"Subject: CR\r\nDate: " + NOW.strftime("%a, %d %b %Y %H:%M:%S +0000").encode() + b"\r\n"
    b"Message-ID: <1@medecin.fr>\r\nMIME-Version: 1.0\r\n"
)


@pytest.fixture(scope="module")
def pki() -> SmimePki:
    pki = SmimePki.create()
    pki.person("martin@medecin.fr")
    pki.person("gw@passerelle.test")
    return pki


def b64(der: bytes) -> bytes:
    text = base64.b64encode(der)
    return b"".join(text[i: i + 64] + b"\r\n" for i in range(0, len(text), 64))


def clear_signed(signer: Issued, part: bytes = PART, *, head: bytes = HEAD,
                 signed_part: bytes | None = None, when: dt.datetime = NOW,
                 der_edit: object = None) -> bytes:
    der, _ = sign_content(signed_part or part, signer.certificate, signer.key,
                          chain=(signer.issuer.certificate,) if signer.issuer else (),
                          now=when, detached=True)
    if callable(der_edit):
        der = der_edit(der)
    return (
        head + b'Content-Type: multipart/signed; protocol="application/pkcs7-signature"; '
        b'micalg=sha-256; boundary="b1"\r\n\r\n'
        b"--b1\r\n" + part + b"\r\n--b1\r\n"
        b"Content-Type: application/pkcs7-signature; name=smime.p7s\r\n"
        b"Content-Transfer-Encoding: base64\r\n\r\n" + b64(der) + b"--b1--\r\n"
    )


def opaque_signed(signer: Issued, part: bytes = PART, *, head: bytes = HEAD) -> bytes:
    der, _ = sign_content(part, signer.certificate, signer.key, now=NOW, detached=False,
                          chain=(signer.issuer.certificate,) if signer.issuer else ())
    return (
        head + b"Content-Type: application/pkcs7-mime; smime-type=signed-data; "
        b"name=smime.p7m\r\nContent-Transfer-Encoding: base64\r\n\r\n" + b64(der)
    )


def verdict(pki: SmimePki, raw: bytes, **kwargs: object) -> Verdict:
    return ADAPTER.unwrap(raw, unwrap_context(pki, **kwargs)).signature  # type: ignore[arg-type]


def assert_fail(v: Verdict, reason: Reason, phrase: str) -> None:
    assert v.result == "fail", v
    assert v.failure is reason, v
    assert phrase in v.reason, v


def test_good_clear_signed_passes_and_content_is_the_first_part(pki: SmimePki) -> None:
    raw = clear_signed(pki.people["martin@medecin.fr"])
    out = ADAPTER.unwrap(raw, unwrap_context(pki))
    assert out.signature.result == "pass", out.signature
    assert out.signature.reason == "signature verified"
    assert out.signature.signer == "martin@medecin.fr"
    assert out.signature.algorithm == "sha256WithRSAEncryption"
    assert out.signature.fingerprints and out.signature.signer_serial
    signer = pki.people["martin@medecin.fr"].certificate
    assert out.signature.signer_serial == format(signer.serial_number, "x")
    assert out.signature.signer_subject == signer.subject.rfc4514_string()
    assert out.signature.signer_issuer == signer.issuer.rfc4514_string()
    assert out.encrypted is False
    assert out.content == HEAD + PART
    assert out.signed_entity is not None and out.signed_entity.startswith(b"Content-Type: multi")


def test_good_opaque_signed_passes(pki: SmimePki) -> None:
    out = ADAPTER.unwrap(opaque_signed(pki.people["martin@medecin.fr"]), unwrap_context(pki))
    assert out.signature.result == "pass"
    assert out.content == HEAD + PART


def test_ec_signer_passes(pki: SmimePki) -> None:
    signer = pki.person("ec@medecin.fr", curve=ec.SECP384R1())
    head = HEAD.replace(b"martin@medecin.fr", b"ec@medecin.fr")
    v = verdict(pki, clear_signed(signer, head=head))
    assert v.result == "pass" and v.algorithm == "ecdsa-with-SHA256"


def test_unsigned_mail_is_not_refused_by_the_adapter(pki: SmimePki) -> None:
    raw = HEAD + PART
    out = ADAPTER.unwrap(raw, unwrap_context(pki))
    assert out.signature.result == "none" and out.signature.method == "smime"
    assert out.content == raw and out.signed_entity is None


def test_untrusted_ca(pki: SmimePki) -> None:
    other = SmimePki.create()
    stranger = other.person("martin@medecin.fr")
    assert_fail(verdict(pki, clear_signed(stranger)), Reason.UNTRUSTED_SIGNER, "trusted CA")


def test_expired_signer(pki: SmimePki) -> None:
    old = pki.person(
        "martin@medecin.fr", not_before=NOW - dt.timedelta(days=400),
        not_after=NOW - dt.timedelta(days=1),
    )
    assert_fail(verdict(pki, clear_signed(old, when=NOW - dt.timedelta(days=2))),
                Reason.EXPIRED, "expired")
    pki.person("martin@medecin.fr")


def test_signature_made_before_the_certificate_was_valid(pki: SmimePki) -> None:
    signer = pki.people["martin@medecin.fr"]
    raw = clear_signed(signer, when=NOW - dt.timedelta(days=30),
                       head=HEAD.replace(NOW.strftime("%d %b %Y").encode(), b"01 Jan 2020"))
    assert_fail(verdict(pki, raw), Reason.EXPIRED, "not yet valid at signing time")


def test_revoked_signer(pki: SmimePki) -> None:
    victim = pki.person("martin@medecin.fr")
    pki.intermediate.revoke(victim)
    try:
        assert_fail(verdict(pki, clear_signed(victim), trust=pki.trust(crls=True)),
                    Reason.REVOKED, "revoked")
    finally:
        pki.intermediate.revoked.clear()
        pki.person("martin@medecin.fr")


def test_stale_crl_is_a_failure_not_a_pass(pki: SmimePki) -> None:
    stale = pki.intermediate.crl(last_update=NOW - dt.timedelta(days=10),
                                 next_update=NOW - dt.timedelta(days=3))
    trust = TrustStore(anchors=(pki.root.certificate,), crls=(stale,))
    assert_fail(verdict(pki, clear_signed(pki.people["martin@medecin.fr"]), trust=trust),
                Reason.REVOCATION_UNKNOWN, "stale")


def _crl_holding(pki: SmimePki, serial: int, next_update: dt.datetime) -> TrustStore:
    """The intermediate's CRL listing `serial` as on hold (RFC 5280 certificateHold)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    entry = (x509.RevokedCertificateBuilder().serial_number(serial)
             .revocation_date(next_update - dt.timedelta(days=8))
             .add_extension(x509.CRLReason(x509.ReasonFlags.certificate_hold), critical=False)
             .build())
    crl = (x509.CertificateRevocationListBuilder()
           .issuer_name(pki.intermediate.certificate.subject)
           .last_update(next_update - dt.timedelta(days=7)).next_update(next_update)
           .add_revoked_certificate(entry).sign(pki.intermediate.key, hashes.SHA256()))
    return TrustStore(anchors=(pki.root.certificate,), crls=(crl,))


def test_certificate_on_hold_is_revoked_but_unknown_under_a_stale_crl(pki: SmimePki) -> None:
    signer = pki.people["martin@medecin.fr"]
    raw = clear_signed(signer)
    fresh = _crl_holding(pki, signer.certificate.serial_number, NOW + dt.timedelta(days=1))
    assert_fail(verdict(pki, raw, trust=fresh), Reason.REVOKED, "revoked")
    # The hold may have been lifted since a stale list was issued: not known, not revoked.
    old = _crl_holding(pki, signer.certificate.serial_number, NOW - dt.timedelta(days=1))
    assert_fail(verdict(pki, raw, trust=old), Reason.REVOCATION_UNKNOWN, "stale")


def test_revoked_signer_under_a_stale_crl_is_revoked(pki: SmimePki) -> None:
    victim = pki.person("martin@medecin.fr")
    pki.intermediate.revoke(victim)
    try:
        stale = pki.intermediate.crl(last_update=NOW - dt.timedelta(days=10),
                                     next_update=NOW - dt.timedelta(days=3))
    finally:
        pki.intermediate.revoked.clear()
    trust = TrustStore(anchors=(pki.root.certificate,), crls=(stale,))
    try:
        assert_fail(verdict(pki, clear_signed(victim), trust=trust), Reason.REVOKED, "revoked")
    finally:
        pki.person("martin@medecin.fr")


def test_badly_signed_crl_is_a_failure(pki: SmimePki) -> None:
    forged = pki.intermediate.crl(signer=root())
    trust = TrustStore(anchors=(pki.root.certificate,), crls=(forged,))
    assert_fail(verdict(pki, clear_signed(pki.people["martin@medecin.fr"]), trust=trust),
                Reason.REVOCATION_UNKNOWN, "CRL not signed")


def test_fresh_crl_without_the_signer_passes(pki: SmimePki) -> None:
    v = verdict(pki, clear_signed(pki.people["martin@medecin.fr"]), trust=pki.trust(crls=True))
    assert v.result == "pass"


def test_wrong_extended_key_usage(pki: SmimePki) -> None:
    server = pki.person("martin@medecin.fr", eku=[ExtendedKeyUsageOID.SERVER_AUTH])
    try:
        assert_fail(verdict(pki, clear_signed(server)), Reason.UNTRUSTED_SIGNER,
                    "not for e-mail protection")
    finally:
        pki.person("martin@medecin.fr")


def test_signer_key_usage_without_digital_signature(pki: SmimePki) -> None:
    encipher_only = pki.person("martin@medecin.fr", key_usage="encipherment")
    try:
        assert_fail(verdict(pki, clear_signed(encipher_only)), Reason.UNTRUSTED_SIGNER,
                    "key usage does not allow signing")
    finally:
        pki.person("martin@medecin.fr")


def test_tampered_body(pki: SmimePki) -> None:
    raw = clear_signed(pki.people["martin@medecin.fr"])
    raw = raw.replace(b"Compte rendu", b"Compte-rendu")
    assert_fail(verdict(pki, raw), Reason.SIGNATURE_INVALID, "message-digest mismatch")


def test_tampered_signed_attributes(pki: SmimePki) -> None:
    stamp = NOW.strftime("%y%m%d%H%M%SZ").encode()
    later = (NOW + dt.timedelta(minutes=1)).strftime("%y%m%d%H%M%SZ").encode()

    def edit(der: bytes) -> bytes:
        assert der.count(stamp) == 1
        return der.replace(stamp, later)

    raw = clear_signed(pki.people["martin@medecin.fr"], der_edit=edit)
    assert_fail(verdict(pki, raw), Reason.SIGNATURE_INVALID, "signature does not verify")


def test_signer_is_not_the_from_address(pki: SmimePki) -> None:
    raw = clear_signed(pki.people["gw@passerelle.test"])
    assert_fail(verdict(pki, raw), Reason.SIGNER_MISMATCH, "does not match From")


def test_date_far_from_signing_time(pki: SmimePki) -> None:
    raw = clear_signed(pki.people["martin@medecin.fr"], when=NOW - dt.timedelta(hours=3))
    assert_fail(verdict(pki, raw), Reason.SIGNATURE_INVALID, "time mismatch")


def test_unknown_digest_algorithm(pki: SmimePki) -> None:
    from asn1crypto import core

    sha256 = core.ObjectIdentifier("2.16.840.1.101.3.4.2.1").dump()
    sha3 = core.ObjectIdentifier("2.16.840.1.101.3.4.2.8").dump()
    raw = clear_signed(pki.people["martin@medecin.fr"],
                       der_edit=lambda der: der.replace(sha256, sha3))
    assert_fail(verdict(pki, raw), Reason.UNSUPPORTED_ALGORITHM, "not accepted")


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "trailing", "base64"])
def test_broken_cms_is_malformed_never_a_crash(pki: SmimePki, damage: str) -> None:
    raw = opaque_signed(pki.people["martin@medecin.fr"])
    head, body = raw.split(b"\r\n\r\n", 1)
    der = base64.b64decode(re.sub(rb"\s", b"", body))
    broken = {
        "truncated": der[: len(der) // 2],
        "garbage": b"\x30\x82\xff\xff" + bytes(range(256)) * 3,
        "empty": b"",
        "trailing": der + b"\x00\x01",
        "base64": None,
    }[damage]
    body = b"@@@not base64@@@\r\n" if broken is None else b64(broken)
    with pytest.raises(PermanentFailure) as caught:
        ADAPTER.unwrap(head + b"\r\n\r\n" + body, unwrap_context(pki))
    assert caught.value.enhanced == "5.6.0" and caught.value.reason is Reason.MALFORMED


def test_multipart_signed_without_signature_part_is_malformed(pki: SmimePki) -> None:
    raw = HEAD + (b'Content-Type: multipart/signed; protocol="application/pkcs7-signature"; '
                  b'boundary="b1"\r\n\r\n--b1\r\n' + PART + b"\r\n--b1--\r\n")
    with pytest.raises(PermanentFailure) as caught:
        ADAPTER.unwrap(raw, unwrap_context(pki))
    assert caught.value.reason is Reason.MALFORMED


def test_fuzzed_bytes_never_escape_as_other_exceptions(pki: SmimePki) -> None:
    import random

    raw = clear_signed(pki.people["martin@medecin.fr"])
    generator = random.Random(5)
    for _ in range(150):
        data = bytearray(raw)
        for _ in range(generator.randint(1, 8)):
            data[generator.randrange(len(data))] = generator.randrange(256)
        try:
            out = ADAPTER.unwrap(bytes(data), unwrap_context(pki))
        except PermanentFailure:
            continue
        if out.signature.result == "pass":
            # Only bytes outside what the signature covers may have changed.
            assert out.content.endswith(PART)

