"""smime wrap without openssl: options, recipient certificate choice, 7-bit preparation,
and the adapter's own decryptor against its own output (openssl checks the same output in
tests/interop/test_smime_openssl.py)."""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import re

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

import adapters
from adapters.base import Unwrapped, Verdict
from adapters.cms.entity import decode_body, multipart_parts, parse_entity, seven_bit
from adapters.smime import SmimeAdapter
from gateway.errors import PermanentFailure, Reason
from tests.support.smime_pki import NOW, SmimePki, unwrap_context, wrap_context

ADAPTER = SmimeAdapter()
CONTENT = (
    b"From: cardio@chu-test.fr\r\nTo: bob@medecin.fr\r\nSubject: CR\r\n"
    b"Date: Mon, 23 Nov 2026 10:00:00 +0000\r\nMessage-ID: <1@chu-test.fr>\r\n"
    b"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=iso-8859-1\r\n"
    b"Content-Transfer-Encoding: 8bit\r\n\r\nR\xe9sultats normaux.\r\n"
)
MESSAGE = Unwrapped(content=CONTENT, signature=Verdict.unsigned(), source_format="mime")


@pytest.fixture(scope="module")
def pki() -> SmimePki:
    pki = SmimePki.create()
    pki.person("gw@passerelle.test")
    pki.person("bob@medecin.fr")
    pki.person("carol@medecin.fr", curve=ec.SECP256R1())
    return pki


def test_registered() -> None:
    assert adapters.get("smime").method == "smime"


def test_option_problems() -> None:
    assert ADAPTER.option_problems({
        "signature": "multipart", "content_encryption": "aes-256-gcm",
        "key_transport": "rsa-oaep", "signature_padding": "pss",
    }) == []
    problems = ADAPTER.option_problems({"signature": "detached", "colour": "blue"})
    assert len(problems) == 2
    assert any("'signature' must be one of multipart, opaque" in p for p in problems)
    assert any("'colour' is not known" in p for p in problems)


@pytest.mark.parametrize("options", [{}, {"content_encryption": "aes-256-gcm"}])
def test_own_output_opens_with_the_recipients_identity(
    pki: SmimePki, options: dict[str, object]
) -> None:
    for recipient in ("bob@medecin.fr", "carol@medecin.fr"):
        wrapped = ADAPTER.wrap(MESSAGE, wrap_context(pki, pki.people["gw@passerelle.test"],
                                                     (recipient,), options=options))
        out = ADAPTER.unwrap(wrapped.content,
                             unwrap_context(pki, me=pki.people[recipient]))
        assert out.encrypted is True
        # Signed by the gateway's identity, not by the From: address: reported as such.
        assert out.signature.result == "fail"
        assert out.signature.failure is Reason.SIGNER_MISMATCH
        assert out.signature.signer == "gw@passerelle.test"
        body = parse_entity(out.content)
        assert decode_body(body) == "Résultats normaux.\r\n".encode("iso-8859-1")
        assert body.get("content-transfer-encoding") == "base64"


def test_tampered_gcm_ciphertext_is_a_decryption_failure(pki: SmimePki) -> None:
    wrapped = ADAPTER.wrap(MESSAGE, wrap_context(
        pki, pki.people["gw@passerelle.test"], ("bob@medecin.fr",),
        options={"content_encryption": "aes-256-gcm"},
    ))
    head, body = wrapped.content.split(b"\r\n\r\n", 1)
    der = bytearray(base64.b64decode(re.sub(rb"\s", b"", body)))
    der[-40] ^= 1  # inside the encrypted content, before the 16-octet tag
    tampered = head + b"\r\n\r\n" + base64.encodebytes(bytes(der))
    with pytest.raises(PermanentFailure) as caught:
        ADAPTER.unwrap(tampered, unwrap_context(pki, me=pki.people["bob@medecin.fr"]))
    assert caught.value.reason is Reason.DECRYPTION_FAILED
    assert caught.value.enhanced == "5.7.5"


def test_encrypted_mail_without_identity_is_no_decryption_key(pki: SmimePki) -> None:
    wrapped = ADAPTER.wrap(MESSAGE, wrap_context(
        pki, pki.people["gw@passerelle.test"], ("bob@medecin.fr",)))
    with pytest.raises(PermanentFailure) as caught:
        ADAPTER.unwrap(wrapped.content, unwrap_context(pki))
    assert caught.value.reason is Reason.NO_DECRYPTION_KEY


def test_invalid_option_at_wrap_time_is_a_wrap_failure(pki: SmimePki) -> None:
    context = wrap_context(pki, pki.people["gw@passerelle.test"], ("bob@medecin.fr",),
                           options={"content_encryption": "des3"})
    with pytest.raises(PermanentFailure) as caught:
        ADAPTER.wrap(MESSAGE, context)
    assert caught.value.reason is Reason.WRAP_FAILED


def test_wrap_without_identity_is_a_wrap_failure(pki: SmimePki) -> None:
    context = dataclasses.replace(
        wrap_context(pki, pki.people["gw@passerelle.test"], ("bob@medecin.fr",)), identity=None
    )
    with pytest.raises(PermanentFailure) as caught:
        ADAPTER.wrap(MESSAGE, context)
    assert caught.value.reason is Reason.WRAP_FAILED


def test_invalid_recipient_certificates_are_refused_never_plaintext(pki: SmimePki) -> None:
    expired = pki.intermediate.issue(
        pki.people["bob@medecin.fr"].certificate.subject, emails=["old@medecin.fr"],
        not_before=NOW - dt.timedelta(days=30), not_after=NOW - dt.timedelta(days=1),
    )
    signing_only = pki.intermediate.issue(
        pki.people["bob@medecin.fr"].certificate.subject, emails=["sig@medecin.fr"],
        key=pki.people["bob@medecin.fr"].key, key_usage="signature",
    )
    revoked = pki.intermediate.issue(
        pki.people["bob@medecin.fr"].certificate.subject, emails=["rev@medecin.fr"],
    )
    pki.intermediate.revoke(revoked)
    try:
        directory = dataclasses.replace(pki.directory(), x509=(
            pki.intermediate.certificate, expired.certificate, signing_only.certificate,
            revoked.certificate, pki.people["bob@medecin.fr"].certificate,
        ))
        context = wrap_context(
            pki, pki.people["gw@passerelle.test"],
            ("old@medecin.fr", "sig@medecin.fr", "rev@medecin.fr", "bob@medecin.fr"),
            directory=directory, trust=pki.trust(crls=True),
        )
        wrapped = ADAPTER.wrap(MESSAGE, context)
    finally:
        pki.intermediate.revoked.clear()
    assert set(wrapped.refused) == {"old@medecin.fr", "sig@medecin.fr", "rev@medecin.fr"}
    details = {a: f.detail for a, f in wrapped.refused.items()}
    assert "expired" in details["old@medecin.fr"]
    assert "key encipherment" in details["sig@medecin.fr"]
    assert "revoked" in details["rev@medecin.fr"]
    for failure in wrapped.refused.values():
        assert failure.reason is Reason.NO_RECIPIENT_KEY
        assert "ask the recipient for their certificate" in failure.advice
    assert list(wrapped.recipient_keys) == ["bob@medecin.fr"]
    assert b"sultats" not in wrapped.content


def test_newest_valid_certificate_is_chosen(pki: SmimePki) -> None:
    bob = pki.people["bob@medecin.fr"]
    newer = pki.intermediate.issue(bob.certificate.subject, emails=["bob@medecin.fr"],
                                   key=bob.key, not_before=NOW - dt.timedelta(hours=1))
    directory = dataclasses.replace(pki.directory(), x509=(
        pki.intermediate.certificate, bob.certificate, newer.certificate,
    ))
    wrapped = ADAPTER.wrap(MESSAGE, wrap_context(
        pki, pki.people["gw@passerelle.test"], ("bob@medecin.fr",), directory=directory))
    from adapters.cms.trust import fingerprint

    assert wrapped.recipient_keys["bob@medecin.fr"] == fingerprint(newer.certificate)


def test_seven_bit_keeps_decoded_bytes_and_structure() -> None:
    raw = (
        b"Subject: x\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\npreamble\r\n"
        b"--b\r\nContent-Type: text/plain\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
        b"\xe9t\xe9\nbare LF\r\n"
        b"--b\r\nContent-Type: text/plain\r\n\r\nclean ascii\r\n"
        b"--b\r\nContent-Type: application/octet-stream\r\nContent-Transfer-Encoding: binary\r\n"
        b"\r\n\x00\x01\xff\r\n"
        b"--b--\r\n"
    )
    out = seven_bit(raw)
    assert all(byte < 128 for byte in out)
    assert re.search(rb"(?<!\r)\n", out) is None
    entity = parse_entity(out)
    _, parts, _ = multipart_parts(entity.body, "b")
    originals = multipart_parts(parse_entity(raw).body, "b")[1]
    assert [decode_body(parse_entity(p)) for p in parts] == [
        parse_entity(p).body for p in originals
    ]
    assert parts[1] == originals[1]  # a clean part is untouched
