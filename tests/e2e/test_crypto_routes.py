"""Crypto networks end to end over SMTP: openssl and gpg make and check what crosses the gateway.

- hospital (plain MIME) -> @medecin (S/MIME): the doctor decrypts with *their* key using
  `openssl cms -decrypt` and verifies the gateway's signature with `openssl cms -verify`.
- @medecin (S/MIME signed + encrypted by openssl) -> hospital: plain MIME with
  Authentication-Results smime=pass.
- @medecin unsigned -> refused by `require: signature`, and the DSN goes back into the S/MIME
  network signed and encrypted to the sender.
- Apicrypt GP (gpg, inline signed + encrypted HPRIM, LF or CRLF) -> hospital: the text part's
  decoded octets are the GP's, labelled ISO-8859-1 (the network is v1), and
  Authentication-Results names the GP's address and key: x-apicrypt=pass.
- hospital -> Apicrypt GP: gpg decrypts body and .apz attachment with the GP's key and finds
  the hospital's text converted to ISO-8859-1, and the attachment, octet for octet, signed by
  the gateway's key.
"""

from __future__ import annotations

import base64
import email
import email.policy
import email.utils
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.e2e.conftest import Running, start
from tests.e2e.test_relay import split_trace
from tests.support.crypto_world import DOCTOR, GATEWAY_PGP, GP, CryptoWorld, build_crypto_world

pytestmark = [pytest.mark.e2e, pytest.mark.interop]

HPRIM_TEXT = (
    "H.P.R.I.M.\n"
    "DUPONT\nJEAN\n12 RUE DES LILAS\n\n75011 PARIS\n01/02/1950\n\n"
    "123456\n23/11/2026\nDr GP\nLABO TEST\n"
    "Hémoglobine normale.\n"
    "****LAB****\n"
    "RES|Hémoglobine|HB|N|14.2|g/dl|13.0|17.0|N|F|\n"
    "****FIN****\n"
    "****FINFICHIER****\n"
)
HPRIM = HPRIM_TEXT.encode("iso-8859-1")


def trace_fields(trace: list[bytes]) -> list[str]:
    """The gateway's trace header fields, unfolded (RFC 5322 §2.2.3)."""
    fields: list[str] = []
    for line in trace:
        text = line.decode("ascii")
        if text[:1] in (" ", "\t"):
            fields[-1] += " " + text.lstrip(" \t")
        else:
            fields.append(text)
    return fields


def openssl(*args: str | Path, data: bytes | None = None) -> bytes:
    done = subprocess.run(["openssl", *map(str, args)], input=data, capture_output=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr.decode()
    return done.stdout


@pytest.fixture
async def crypto(tmp_path: Path) -> AsyncIterator[tuple[CryptoWorld, Running]]:
    built = build_crypto_world(tmp_path)
    try:
        async with start(built.world) as running:
            yield built, running
    finally:
        built.gpg.close()


def letter(sender: str, recipient: str, body: str = "Lettre de sortie.\r\n") -> bytes:
    # Date: now, since the S/MIME adapter compares it with the signing time.
    date = email.utils.formatdate(localtime=True)
    return (
        f"From: <{sender}>\r\nTo: <{recipient}>\r\nSubject: Lettre de sortie\r\n"
        f"Message-ID: <lettre-1@chu-test.fr>\r\nDate: {date}\r\n"
        "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
        f"Content-Transfer-Encoding: 8bit\r\n\r\n{body}"
    ).encode()


async def test_hospital_to_smime_network_decrypts_with_the_recipients_key(
    crypto: tuple[CryptoWorld, Running],
) -> None:
    built, running = crypto
    world = built.world
    original = letter("dr.martin@chu-test.fr", DOCTOR, "Compte rendu opératoire.\r\n")
    await running.send("dr.martin@chu-test.fr", [DOCTOR], original, client=world.hospital_client)
    [got] = await world.sinks["medecin"].wait(timeout=30)
    assert b"application/pkcs7-mime" in got.data.split(b"\r\n\r\n", 1)[0]
    assert b"Compte rendu" not in got.data  # encrypted on the wire
    sealed = built.write("received.eml", got.data)
    work = world.root / "work"
    signed = openssl("cms", "-decrypt", "-in", sealed, "-recip", work / "doctor.pem",
                     "-inkey", work / "doctor.key")
    inner = openssl("cms", "-verify", "-in", built.write("signed.eml", signed),
                    "-CAfile", world.anchor)
    # The inner message is the sender's below our trace headers: same header fields, and the
    # body's decoded bytes identical (signing may give it a 7-bit transfer encoding, §4).
    trace, rest = split_trace(inner.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n"))
    assert any(t.startswith(b"Authentication-Results: passerelle.test; none") for t in trace)
    sent = email.message_from_bytes(original, policy=email.policy.compat32)
    got_message = email.message_from_bytes(rest, policy=email.policy.compat32)
    for field in ("From", "To", "Subject", "Message-ID", "Date"):
        assert got_message[field] == sent[field]
    assert got_message.get_payload(decode=True) == sent.get_payload(decode=True)


async def test_smime_signed_and_encrypted_by_openssl_reaches_the_hospital(
    crypto: tuple[CryptoWorld, Running],
) -> None:
    built, running = crypto
    world = built.world
    work = world.root / "work"
    content = letter(DOCTOR, "dr.martin@chu-test.fr", "Avis spécialisé joint.\r\n")
    signed = openssl("cms", "-sign", "-in", built.write("plain.eml", content), "-signer",
                     work / "doctor.pem", "-inkey", work / "doctor.key", "-md", "sha256",
                     "-binary")
    encrypted = openssl("cms", "-encrypt", "-in", built.write("signed.eml", signed),
                        "-aes-256-cbc", "-from", DOCTOR, "-to", "dr.martin@chu-test.fr",
                        "-subject", "Avis", world.root / "pki" / "medecin.pem")
    data = encrypted.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    await running.send(DOCTOR, ["dr.martin@chu-test.fr"], data, client=built.medecin_mta)
    [got] = await world.sinks["hospital"].wait(timeout=30)
    trace, rest = split_trace(got.data)
    results = b"\r\n".join(t for t in trace if not t.startswith(b"Received"))
    assert b"smime=pass" in results
    assert DOCTOR.encode() in results
    assert "Avis spécialisé joint.".encode() in rest
    assert b"application/pkcs7" not in rest.split(b"\r\n\r\n", 1)[0].lower() or b"signed" in rest


async def test_unsigned_mail_from_smime_network_bounces_with_an_encrypted_dsn(
    crypto: tuple[CryptoWorld, Running],
) -> None:
    built, running = crypto
    world = built.world
    work = world.root / "work"
    content = letter(DOCTOR, "dr.martin@chu-test.fr", "Pas de signature.\r\n")
    encrypted = openssl("cms", "-encrypt", "-in", built.write("plain.eml", content),
                        "-aes-256-cbc", "-from", DOCTOR, "-to", "dr.martin@chu-test.fr",
                        world.root / "pki" / "medecin.pem")
    data = encrypted.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    await running.send(DOCTOR, ["dr.martin@chu-test.fr"], data, client=built.medecin_mta)
    [dsn] = await world.sinks["medecin"].wait(timeout=30)
    assert world.sinks["hospital"].messages == []  # never delivered as if verified
    assert dsn.sender == "<>" and dsn.recipients == [DOCTOR]
    signed = openssl("cms", "-decrypt", "-in", built.write("dsn.eml", dsn.data), "-recip",
                     work / "doctor.pem", "-inkey", work / "doctor.key")
    report = openssl("cms", "-verify", "-in", built.write("dsn-signed.eml", signed),
                     "-CAfile", world.anchor)
    assert b"multipart/report" in report
    assert b"Status: 5.7.1" in report
    assert b"requires a valid signature" in report


@pytest.mark.parametrize("line_end", ["\n", "\r\n"], ids=["lf", "crlf"])
async def test_apicrypt_gp_sends_hprim_report_to_the_hospital(
    crypto: tuple[CryptoWorld, Running], line_end: str,
) -> None:
    built, running = crypto
    world = built.world
    written = HPRIM.replace(b"\n", line_end.encode())
    block = built.gpg.run("--armor", "--sign", "--encrypt", "-r", GATEWAY_PGP, "-u",
                          built.gp_fingerprint, input=written).output
    assert block.startswith(b"-----BEGIN PGP MESSAGE-----")
    data = (
        f"From: <{GP}>\r\nTo: <dr.martin@chu-test.fr>\r\nSubject: Resultats DUPONT\r\n"
        "Message-ID: <hprim-1@cabinet.apicrypt-test.org>\r\nMIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=us-ascii\r\n\r\n"
    ).encode() + block.replace(b"\n", b"\r\n")
    await running.send(GP, ["dr.martin@chu-test.fr"], data)
    [got] = await world.sinks["hospital"].wait(timeout=30)
    trace, rest = split_trace(got.data)
    results = [f for f in trace_fields(trace) if f.startswith("Authentication-Results:")]
    # Who signed: the GP's address and the fingerprint of the GP's key, nothing else.
    assert results == [
        "Authentication-Results: passerelle.test; x-apicrypt=pass (signature verified) "
        f"header.from={GP} x-apicrypt.fingerprint={built.gp_fingerprint}"
    ]
    message = email.message_from_bytes(rest, policy=email.policy.compat32)
    [part] = [p for p in message.walk() if p.get_content_maintype() == "text"]
    payload = part.get_payload(decode=True)
    assert isinstance(payload, bytes)
    # The octets the GP wrote, line ends included, under the v1 network's charset...
    assert payload == written
    assert part.get_content_charset() == "iso-8859-1"
    # ...so that the text the hospital reads is the text the GP wrote.
    assert payload.decode(part.get_content_charset()) == HPRIM_TEXT.replace("\n", line_end)


GATEWAY_LETTER = "Bonjour, voici le compte rendu de Mme Hélène Dupont.\r\n"


@pytest.mark.parametrize("body,encoding", [
    (GATEWAY_LETTER.encode(), "8bit"),
    # HPRIM with bare LF reaches the gateway base64-encoded, and reaches the GP so.
    (HPRIM_TEXT.encode(), "base64"),
], ids=["letter-crlf", "hprim-lf"])
async def test_hospital_to_apicrypt_gp_decrypts_body_and_attachment_with_gpg(
    crypto: tuple[CryptoWorld, Running], body: bytes, encoding: str,
) -> None:
    built, running = crypto
    world = built.world
    pdf = b"%PDF-1.4\n" + bytes(range(256)) * 8
    text = base64.encodebytes(body).replace(b"\n", b"\r\n") if encoding == "base64" else body
    data = (
        f"From: <secretariat@chu-test.fr>\r\nTo: <{GP}>\r\nSubject: Compte rendu\r\n"
        "MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"B\"\r\n\r\n"
        "--B\r\nContent-Type: text/plain; charset=utf-8\r\n"
        f"Content-Transfer-Encoding: {encoding}\r\n\r\n"
    ).encode() + text + (
        b"\r\n--B\r\nContent-Type: application/pdf; name=\"cr.pdf\"\r\n"
        b"Content-Disposition: attachment; filename=\"cr.pdf\"\r\n"
        b"Content-Transfer-Encoding: base64\r\n\r\n"
    ) + base64.encodebytes(pdf).replace(b"\n", b"\r\n") + b"--B--\r\n"
    await running.send("secretariat@chu-test.fr", [GP], data, client=world.hospital_client)
    [got] = await world.sinks["apicrypt"].wait(timeout=30)
    message = email.message_from_bytes(got.data, policy=email.policy.compat32)
    assert message["Subject"] == "Compte rendu"  # Apicrypt keeps the subject in clear
    # What the gateway verified is visible in the headers an Apicrypt client shows.
    assert message["Authentication-Results"] == "passerelle.test; none"
    parts = [p for p in message.walk() if not p.is_multipart()]
    assert [p.get_filename() for p in parts] == [None, "cr.pdf.apz"]
    assert parts[0].get_content_charset() == "iso-8859-1"  # the v1 network's charset
    gateway_keys = built.gpg.run("--with-colons", "--list-keys", GATEWAY_PGP).output.decode()
    gateway_fpr = next(line.split(":")[9] for line in gateway_keys.splitlines()
                       if line.startswith("fpr:"))
    text_block = built.gpg.run("--decrypt", input=parts[0].get_payload(decode=True))
    assert text_block.has("DECRYPTION_OKAY") and text_block.has("GOODSIG"), text_block.stderr
    assert gateway_fpr in str(text_block.line("VALIDSIG"))
    # The hospital's text, converted from UTF-8 to ISO-8859-1 and otherwise octet for octet.
    assert text_block.output == body.decode("utf-8").encode("iso-8859-1")
    attachment = built.gpg.run("--decrypt", input=parts[1].get_payload(decode=True))
    assert attachment.has("DECRYPTION_OKAY") and attachment.has("GOODSIG"), attachment.stderr
    assert gateway_fpr in str(attachment.line("VALIDSIG"))
    assert attachment.output == pdf
