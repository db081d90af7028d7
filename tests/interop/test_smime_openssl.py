"""smime against `openssl cms`, the independent peer, both ways.

openssl → gateway: messages openssl signs and/or encrypts, with every algorithm it can make
here, unwrap with the right verdict. gateway → openssl: what the adapter wraps decrypts with
the *recipient's* key, verifies against the CA, and its parts decode to the sender's bytes.
"""

from __future__ import annotations

import email
import email.message
import email.policy
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from adapters.base import Unwrapped, Verdict
from adapters.smime import SmimeAdapter
from gateway.errors import PermanentFailure, Reason
from tests.support.smime_pki import (
    NOW,
    SmimePki,
    openssl,
    unwrap_context,
    wrap_context,
)

pytestmark = [
    pytest.mark.interop,
]

ADAPTER = SmimeAdapter()
DATE = NOW.strftime("%a, %d %b %Y %H:%M:%S +0000").encode()
PART = (
    b"Content-Type: text/plain; charset=utf-8\r\n\r\n"
    b"Compte rendu de consultation du patient.\r\nLigne 2.\r\n"
)
# What a hospital sends: 8-bit text (gets a 7-bit encoding when signed) and an attachment.
HOSPITAL = (
    b"From: Service Cardiologie <cardio@chu-test.fr>\r\n"
    b"To: bob@medecin.fr, carol@medecin.fr\r\n"
    b"Subject: =?utf-8?q?R=C3=A9sultats?=\r\n"
    b"Date: " + DATE + b"\r\n"
    b"Message-ID: <cr-1@chu-test.fr>\r\n"
    b"MIME-Version: 1.0\r\n"
    b'Content-Type: multipart/mixed; boundary="mix"\r\n'
    b"\r\n"
    b"--mix\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"Content-Transfer-Encoding: 8bit\r\n\r\n"
    b"R\xc3\xa9sultats de l'\xc3\xa9chographie : normaux.\r\n"
    b"--mix\r\n"
    b'Content-Type: application/octet-stream; name="cr.hprim"\r\n'
    b"Content-Transfer-Encoding: base64\r\n\r\n"
    b"AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8gISIjJCUmJygpKissLS4v\r\n"
    b"--mix--\r\n"
)


@pytest.fixture(scope="module")
def pki() -> SmimePki:
    pki = SmimePki.create()
    pki.person("alice@medecin.fr")
    pki.person("gw@passerelle.test")
    pki.person("bob@medecin.fr")
    pki.person("carol@medecin.fr", curve=ec.SECP256R1())
    pki.person("dan@medecin.fr", curve=ec.SECP384R1())
    pki.person("gwec@passerelle.test", curve=ec.SECP256R1())
    return pki


@pytest.fixture(scope="module")
def files(pki: SmimePki, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    directory = tmp_path_factory.mktemp("smime-pki")
    paths = pki.write(directory)
    paths["dir"] = directory
    (directory / "part.txt").write_bytes(PART)
    return paths


def sign(files: dict[str, Path], signer: str, *extra: str, source: Path | None = None) -> bytes:
    out = openssl(
        "cms", "-sign", "-in", source or files["dir"] / "part.txt",
        "-signer", files[f"{signer}.cert"], "-inkey", files[f"{signer}.key"],
        "-certfile", files["inter"], "-md", "sha256", "-crlfeol",
        "-from", signer, "-to", "gw@passerelle.test", "-subject", "CR", *extra,
    )
    return b"Date: " + DATE + b"\r\n" + out


def encrypt(files: dict[str, Path], source: Path, recipient: str, *extra: str) -> bytes:
    # -keyopt applies to the -recip before it, so cipher options go first.
    split = extra.index("-keyopt") if "-keyopt" in extra else len(extra)
    return openssl(
        "cms", "-encrypt", "-in", source, "-crlfeol", "-from", "alice@medecin.fr",
        "-to", recipient, "-subject", "CR", *extra[:split],
        "-recip", files[f"{recipient}.cert"], *extra[split:],
    )


def write(files: dict[str, Path], name: str, data: bytes) -> Path:
    path = files["dir"] / name
    path.write_bytes(data)
    return path


# -- openssl → gateway ----------------------------------------------------------------------

@pytest.mark.parametrize(("signer", "extra", "algorithm"), [
    ("alice@medecin.fr", (), "sha256WithRSAEncryption"),
    ("alice@medecin.fr", ("-md", "sha384"), "sha384WithRSAEncryption"),
    ("alice@medecin.fr", ("-md", "sha512"), "sha512WithRSAEncryption"),
    ("alice@medecin.fr", ("-keyopt", "rsa_padding_mode:pss"), "RSASSA-PSS/sha256"),
    ("alice@medecin.fr", ("-nodetach",), "sha256WithRSAEncryption"),
    ("alice@medecin.fr", ("-nodetach", "-stream"), "sha256WithRSAEncryption"),
    ("alice@medecin.fr", ("-stream",), "sha256WithRSAEncryption"),
    ("alice@medecin.fr", ("-nodetach", "-keyid"), "sha256WithRSAEncryption"),
    ("dan@medecin.fr", (), "ecdsa-with-SHA256"),
    ("dan@medecin.fr", ("-nodetach", "-md", "sha384"), "ecdsa-with-SHA384"),
], ids=["rsa", "sha384", "sha512", "pss", "opaque", "opaque-ber", "detached-stream",
        "ski-signer", "ec-p384", "ec-opaque"])
def test_openssl_signed_mail_passes(
    pki: SmimePki, files: dict[str, Path], signer: str, extra: tuple[str, ...], algorithm: str
) -> None:
    raw = sign(files, signer, *extra)
    out = ADAPTER.unwrap(raw, unwrap_context(pki))
    assert out.signature.result == "pass", out.signature
    assert out.signature.signer == signer
    assert out.signature.algorithm == algorithm
    assert out.content.endswith(PART)
    assert b"From: " + signer.encode() in out.content and b"Date: " in out.content


def test_openssl_sha1_signature_fails_by_policy(pki: SmimePki, files: dict[str, Path]) -> None:
    raw = sign(files, "alice@medecin.fr", "-md", "sha1")
    v = ADAPTER.unwrap(raw, unwrap_context(pki)).signature
    assert v.result == "fail" and v.failure is Reason.WEAK_ALGORITHM and v.reason == (
        "weak digest SHA-1"
    )


def test_openssl_signature_over_altered_part_fails(pki: SmimePki, files: dict[str, Path]) -> None:
    raw = sign(files, "alice@medecin.fr").replace(b"Ligne 2.", b"Ligne 3.")
    v = ADAPTER.unwrap(raw, unwrap_context(pki)).signature
    assert v.result == "fail" and v.reason == "message-digest mismatch"


@pytest.mark.parametrize(("identity", "extra", "algorithm", "key_algorithm"), [
    ("gw@passerelle.test", ("-aes128",), "aes128_cbc", "rsaes_pkcs1v15"),
    ("gw@passerelle.test", ("-aes192",), "aes192_cbc", "rsaes_pkcs1v15"),
    ("gw@passerelle.test", ("-aes256",), "aes256_cbc", "rsaes_pkcs1v15"),
    ("gw@passerelle.test", ("-aes-256-gcm",), "aes256_gcm", "rsaes_pkcs1v15"),
    ("gw@passerelle.test", ("-aes-128-gcm",), "aes128_gcm", "rsaes_pkcs1v15"),
    ("gw@passerelle.test", ("-aes256", "-keyopt", "rsa_padding_mode:oaep"),
     "aes256_cbc", "rsaes_oaep/sha1"),
    ("gw@passerelle.test", ("-aes256", "-keyopt", "rsa_padding_mode:oaep",
                            "-keyopt", "rsa_oaep_md:sha256"), "aes256_cbc", "rsaes_oaep/sha256"),
    ("gwec@passerelle.test", ("-aes256",), "aes256_cbc", "ecdh/sha1"),
    ("gwec@passerelle.test", ("-aes-256-gcm", "-keyopt", "ecdh_kdf_md:sha256"),
     "aes256_gcm", "ecdh/sha256"),
    ("dan@medecin.fr", ("-aes128", "-keyopt", "ecdh_kdf_md:sha384"), "aes128_cbc", "ecdh/sha384"),
    ("gw@passerelle.test", ("-aes256", "-keyid"), "aes256_cbc", "rsaes_pkcs1v15"),
    # BER indefinite lengths and constructed OCTET STRINGs, as NSS streams them.
    ("gw@passerelle.test", ("-aes256", "-stream"), "aes256_cbc", "rsaes_pkcs1v15"),
    ("gwec@passerelle.test", ("-aes-256-gcm", "-stream"), "aes256_gcm", "ecdh/sha1"),
], ids=["aes128", "aes192", "aes256", "gcm", "gcm128", "oaep-sha1", "oaep-sha256", "ecdh-p256",
        "ecdh-gcm", "ecdh-p384", "ski-recipient", "ber-cbc", "ber-gcm-ecdh"])
def test_openssl_encrypted_mail_decrypts(
    pki: SmimePki, files: dict[str, Path], identity: str, extra: tuple[str, ...],
    algorithm: str, key_algorithm: str,
) -> None:
    signed = write(files, "signed.eml", sign(files, "alice@medecin.fr"))
    raw = encrypt(files, signed, identity, *extra)
    me = pki.people[identity]
    out = ADAPTER.unwrap(raw, unwrap_context(pki, me=me))
    assert out.encrypted is True
    assert out.decryption_keys and out.decryption_keys[0].startswith("sha256:")
    assert f"decrypted {algorithm} with {key_algorithm}" in out.notes
    assert out.signature.result == "pass", out.signature  # sign-then-encrypt
    assert out.signature.signer == "alice@medecin.fr"
    assert out.content.endswith(PART)


def encrypt_then_sign(files: dict[str, Path], signer: str = "alice@medecin.fr") -> bytes:
    """PART encrypted to the gateway by openssl, then signed (opaque) around the ciphertext."""
    encrypted = encrypt(files, files["dir"] / "part.txt", "gw@passerelle.test", "-aes256")
    source = write(files, "encrypted.eml", encrypted.replace(
        b"From: alice@medecin.fr\r\n", b""))
    return sign(files, signer, "-nodetach", source=source)


def sign_encrypt_sign(files: dict[str, Path], outer_signer: str) -> bytes:
    """RFC 2634 triple wrapping by openssl: Alice signs PART (multipart/signed), encrypts it
    to the gateway, then `outer_signer` signs (opaque) around the ciphertext."""
    signed = write(files, "set-signed.eml", sign(files, "alice@medecin.fr"))
    encrypted = write(files, "set-encrypted.eml",
                      encrypt(files, signed, "gw@passerelle.test", "-aes256"))
    return sign(files, outer_signer, "-nodetach", source=encrypted)


def test_encrypt_then_sign_is_neutral_never_a_pass(pki: SmimePki, files: dict[str, Path]) -> None:
    # The signature covers the ciphertext, not the content (RFC 8551 §3.7): it verifies, but
    # it is no evidence that Alice wrote what the gateway decrypted.
    out = ADAPTER.unwrap(encrypt_then_sign(files),
                         unwrap_context(pki, me=pki.people["gw@passerelle.test"]))
    assert out.encrypted is True
    assert out.signature.result == "neutral", out.signature
    assert out.signature.reason == "signature covers only the encrypted content"
    assert out.signature.failure is None
    assert out.signed_entity is None  # the ciphertext is never passed on
    assert any(note.startswith("over-ciphertext smime layer (encryption depth 0): pass")
               and "alice@medecin.fr" in note for note in out.notes)
    assert out.content.endswith(PART)


def test_encrypt_then_sign_wraps_the_content_not_the_ciphertext(
    pki: SmimePki, files: dict[str, Path]
) -> None:
    unwrapped = ADAPTER.unwrap(encrypt_then_sign(files),
                               unwrap_context(pki, me=pki.people["gw@passerelle.test"]))
    wrapped = ADAPTER.wrap(unwrapped, wrap_context(
        pki, pki.people["gw@passerelle.test"], ("bob@medecin.fr",)))
    inner = open_as(files, wrapped.content, "bob@medecin.fr")
    # Bob gets the content under the gateway's signature: no CMS blob inside that only the
    # gateway's key could open.
    assert b"pkcs7" not in inner.lower()
    assert decoded_parts(inner) == decoded_parts(PART)
    assert b"From: alice@medecin.fr" in inner


def test_sign_encrypt_sign_is_the_inner_authors_verdict(
    pki: SmimePki, files: dict[str, Path]
) -> None:
    out = ADAPTER.unwrap(sign_encrypt_sign(files, "dan@medecin.fr"),
                         unwrap_context(pki, me=pki.people["gw@passerelle.test"]))
    assert out.encrypted is True
    assert out.signature.result == "pass", out.signature
    assert out.signature.signer == "alice@medecin.fr"
    assert out.signed_entity is not None
    assert out.signed_entity.startswith(b"Content-Type: multipart/signed")
    # The outer (hop) signature is an audit note only; Dan signed the ciphertext.
    assert any(note.startswith("over-ciphertext smime layer (encryption depth 0):")
               and "dan@medecin.fr" in note for note in out.notes)
    # One From: the one under Alice's signature (every openssl layer carries a copy).
    assert out.content.count(b"\r\nFrom: ") + out.content.startswith(b"From: ") == 1
    assert out.content.endswith(PART)


def test_sign_encrypt_sign_keeps_the_authors_signature_for_the_recipient(
    pki: SmimePki, files: dict[str, Path]
) -> None:
    unwrapped = ADAPTER.unwrap(sign_encrypt_sign(files, "alice@medecin.fr"),
                               unwrap_context(pki, me=pki.people["gw@passerelle.test"]))
    assert unwrapped.signature.result == "pass" and unwrapped.signed_entity
    wrapped = ADAPTER.wrap(unwrapped, wrap_context(
        pki, pki.people["gw@passerelle.test"], ("bob@medecin.fr",)))
    inner = open_as(files, wrapped.content, "bob@medecin.fr")
    assert b"application/pkcs7-mime" not in inner  # no envelope only the gateway can open
    assert b"multipart/signed" in inner and b"From: alice@medecin.fr" in inner
    author = write(files, "set-author.eml", inner)
    assert openssl("cms", "-verify", "-in", author, "-CAfile", files["ca"]) == PART


def test_unsigned_encrypted_mail_is_encrypted_without_signature(
    pki: SmimePki, files: dict[str, Path]
) -> None:
    raw = encrypt(files, files["dir"] / "part.txt", "gw@passerelle.test", "-aes256")
    out = ADAPTER.unwrap(raw, unwrap_context(pki, me=pki.people["gw@passerelle.test"]))
    assert out.encrypted is True and out.signature.result == "none"


def test_mail_encrypted_to_someone_else_is_no_decryption_key(
    pki: SmimePki, files: dict[str, Path]
) -> None:
    raw = encrypt(files, files["dir"] / "part.txt", "bob@medecin.fr", "-aes256")
    with pytest.raises(PermanentFailure) as caught:
        ADAPTER.unwrap(raw, unwrap_context(pki, me=pki.people["gw@passerelle.test"]))
    assert caught.value.reason is Reason.NO_DECRYPTION_KEY
    assert caught.value.enhanced == "5.7.5"
    assert "does not hold" in caught.value.advice


def test_unsupported_content_cipher_is_refused(pki: SmimePki, files: dict[str, Path]) -> None:
    raw = encrypt(files, files["dir"] / "part.txt", "gw@passerelle.test", "-des3")
    with pytest.raises(PermanentFailure) as caught:
        ADAPTER.unwrap(raw, unwrap_context(pki, me=pki.people["gw@passerelle.test"]))
    assert caught.value.reason is Reason.UNSUPPORTED_ALGORITHM
    assert caught.value.enhanced == "5.7.6"


def test_tampered_ciphertext_fails_to_decrypt(pki: SmimePki, files: dict[str, Path]) -> None:
    raw = encrypt(files, files["dir"] / "part.txt", "gw@passerelle.test", "-aes-256-gcm")
    head, body = raw.split(b"\r\n\r\n", 1)
    lines = body.split(b"\r\n")
    middle = len(lines) - 3
    lines[middle] = lines[middle][:10] + (b"A" if lines[middle][10:11] != b"A" else b"B") + (
        lines[middle][11:])
    with pytest.raises(PermanentFailure) as caught:
        ADAPTER.unwrap(head + b"\r\n\r\n" + b"\r\n".join(lines),
                       unwrap_context(pki, me=pki.people["gw@passerelle.test"]))
    assert caught.value.reason in (Reason.DECRYPTION_FAILED, Reason.MALFORMED)


# -- gateway → openssl ----------------------------------------------------------------------

def decoded_parts(message: bytes) -> list[tuple[str, bytes]]:
    parsed = email.message_from_bytes(message, policy=email.policy.compat32)
    out: list[tuple[str, bytes]] = []
    for part in parsed.walk():
        if part.is_multipart():
            continue
        payload = part.get_payload(decode=True)
        assert isinstance(payload, bytes)
        out.append((part.get_content_type(), payload))
    return out


def open_as(files: dict[str, Path], wrapped: bytes, recipient: str) -> bytes:
    """Decrypt with the recipient's key, verify against the CA: the signed content."""
    encrypted = write(files, "wrapped.eml", wrapped)
    decrypted = openssl("cms", "-decrypt", "-in", encrypted,
                        "-recip", files[f"{recipient}.cert"], "-inkey", files[f"{recipient}.key"])
    signed = write(files, "decrypted.eml", decrypted)
    return openssl("cms", "-verify", "-in", signed, "-CAfile", files["ca"])


@pytest.mark.parametrize("options", [
    {},
    {"content_encryption": "aes-256-gcm"},
    {"key_transport": "rsa-oaep"},
    {"signature_padding": "pss", "signature": "opaque"},
    {"signature": "opaque", "content_encryption": "aes-256-gcm", "key_transport": "rsa-oaep"},
], ids=["default", "gcm", "oaep", "pss-opaque", "all-options"])
@pytest.mark.parametrize("gateway", ["gw@passerelle.test", "gwec@passerelle.test"],
                         ids=["rsa-identity", "ec-identity"])
def test_wrapped_mail_opens_with_each_recipients_key(
    pki: SmimePki, files: dict[str, Path], options: dict[str, object], gateway: str
) -> None:
    recipients = ("bob@medecin.fr", "carol@medecin.fr", "dan@medecin.fr", "nobody@medecin.fr")
    context = wrap_context(pki, pki.people[gateway], recipients, options=options)
    message = Unwrapped(content=HOSPITAL, signature=Verdict.unsigned(), source_format="mime")
    wrapped = ADAPTER.wrap(message, context)
    assert set(wrapped.refused) == {"nobody@medecin.fr"}
    refusal = wrapped.refused["nobody@medecin.fr"]
    assert refusal.reason is Reason.NO_RECIPIENT_KEY and refusal.enhanced == "5.7.1"
    assert set(wrapped.recipient_keys) == {"bob@medecin.fr", "carol@medecin.fr", "dan@medecin.fr"}
    outer = email.message_from_bytes(wrapped.content)
    smime_type = "authEnveloped-data" if options.get("content_encryption") else "enveloped-data"
    assert outer.get_content_type() == "application/pkcs7-mime"
    assert outer.get_param("smime-type") == smime_type
    assert outer["From"] == "Service Cardiologie <cardio@chu-test.fr>"
    assert outer["Message-ID"] == "<cr-1@chu-test.fr>"
    assert b"\xc3\xa9chographie" not in wrapped.content and b"chographie" not in wrapped.content
    # One envelope for all three (RSA, ECDH P-256, ECDH P-384), each opens it with their key.
    for recipient in ("bob@medecin.fr", "carol@medecin.fr", "dan@medecin.fr"):
        inner = open_as(files, wrapped.content, recipient)
        assert decoded_parts(inner) == decoded_parts(HOSPITAL)
        assert inner.startswith(HOSPITAL.split(b"MIME-Version")[0])


def test_nothing_is_sent_when_no_recipient_has_a_certificate(pki: SmimePki) -> None:
    context = wrap_context(pki, pki.people["gw@passerelle.test"], ("nobody@medecin.fr",))
    message = Unwrapped(content=HOSPITAL, signature=Verdict.unsigned(), source_format="mime")
    wrapped = ADAPTER.wrap(message, context)
    assert wrapped.content == b"" and list(wrapped.refused) == ["nobody@medecin.fr"]


@pytest.mark.parametrize("part", [
    PART,
    # 8-bit text the author signed as is: the gateway must not re-encode it.
    b"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
    b"R\xc3\xa9sultats normaux.\r\n",
], ids=["7bit", "8bit"])
def test_author_signature_is_kept_inside_the_gateway_signature(
    pki: SmimePki, files: dict[str, Path], part: bytes
) -> None:
    raw = sign(files, "alice@medecin.fr", source=write(files, "author-part.txt", part))
    unwrapped = ADAPTER.unwrap(raw, unwrap_context(pki))
    assert unwrapped.signature.result == "pass" and unwrapped.signed_entity
    context = wrap_context(pki, pki.people["gw@passerelle.test"], ("bob@medecin.fr",))
    wrapped = ADAPTER.wrap(unwrapped, context)
    inner = open_as(files, wrapped.content, "bob@medecin.fr")
    assert b"multipart/signed" in inner and b"From: alice@medecin.fr" in inner
    # The author's own signature still verifies with openssl, over the author's bytes.
    author = write(files, "author.eml", inner)
    assert openssl("cms", "-verify", "-in", author, "-CAfile", files["ca"]) == part
