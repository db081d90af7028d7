"""The MSSanté trust space end to end: real SMTP and mutual TLS on 127.0.0.1, an IGC-Santé-shaped
PKI with CRLs, and a whitelist in the official format (issue 5)."""

from __future__ import annotations

import base64
import email
import email.message
import email.policy
import email.utils
import logging
import os
import re
import ssl
import subprocess
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest

from gateway.audit import read_records
from tests.e2e.conftest import Running, start
from tests.e2e.test_relay import split_trace
from tests.support import testpki
from tests.support.crypto_world import DOCTOR, GATEWAY_PGP, GP, CryptoWorld, build_crypto_world
from tests.support.world import (
    MssanteWorld,
    Sink,
    build_mssante_world,
    message,
    sink_context,
)

pytestmark = pytest.mark.e2e

CLINIC = "secretariat@clinique-test.fr"


@pytest.fixture
def mssante_factory(tmp_path: Path) -> Callable[..., MssanteWorld]:
    def make(**kwargs: Any) -> MssanteWorld:
        return build_mssante_world(tmp_path, **kwargs)
    return make


@pytest.fixture
async def mss(mssante_factory: Callable[..., MssanteWorld]) -> AsyncIterator[Running]:
    async with start(mssante_factory()) as running:
        yield running


def audit_records(running: Running, event: str) -> list[dict[str, Any]]:
    folder = running.gateway.audit.folder
    return [r for r in read_records(sorted(folder.iterdir())) if r.get("event") == event]


async def mail_from(world: MssanteWorld, client: testpki.Issued | None, sender: str,
                    source: str | None = None) -> str:
    """The reply to MAIL FROM after STARTTLS with `client`'s certificate (from the loopback
    address `source`), or "handshake refused" when the TLS session did not survive the client
    certificate."""
    smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=world.port, start_tls=True,
                           tls_context=world.client_context(client), timeout=10,
                           source_address=(source, 0) if source else None)
    try:
        await smtp.connect()
        await smtp.ehlo()
    except (aiosmtplib.SMTPException, ssl.SSLError, OSError):
        return "handshake refused"
    try:
        reply = await smtp.mail(sender)
        return f"{reply.code} {reply.message}"
    except aiosmtplib.SMTPResponseException as refused:
        return f"{refused.code} {refused.message}"
    except (aiosmtplib.SMTPServerDisconnected, ssl.SSLError, OSError):
        return "handshake refused"  # TLS 1.3: the server's verdict arrives on the next read
    finally:
        smtp.close()


# -- the test PKI, as an independent verifier sees it ----------------------------------------------


@pytest.mark.interop
@pytest.mark.parametrize(("role", "verdict"), [
    ("listed", "OK"), ("nosan", "OK"), ("revoked", "certificate revoked"),
    ("expired", "certificate has expired"), ("untrusted", "unable to get local issuer"),
])
def test_openssl_judges_the_igc_sante_shaped_pki_as_the_gateway_does(
    mssante_factory: Callable[..., MssanteWorld], role: str, verdict: str,
) -> None:
    # The root, the ORGANISATIONS intermediate and both CRLs, checked by `openssl verify`
    # with CRLs for every link (the gateway's rule: leaf and intermediates).
    world = mssante_factory()
    pki = world.root / "pki"
    bundle = world.root / "work" / "bundle.pem"
    bundle.parent.mkdir(exist_ok=True)
    bundle.write_bytes(b"".join((pki / name).read_bytes()
                                for name in ("ca.pem", "root.crl", "organisations.crl")))
    leaf = world.root / "work" / f"{role}.pem"
    leaf.write_bytes(world.operators[role].cert_pem)
    done = subprocess.run(["openssl", "verify", "-crl_check_all", "-purpose", "sslclient",
                           "-CAfile", bundle, leaf], capture_output=True, text=True, timeout=60)
    assert verdict in done.stdout + done.stderr, done.stdout + done.stderr
    assert (done.returncode == 0) is (verdict == "OK")


# -- inbound: who may send --------------------------------------------------------------------


XDM_ZIP = b"PK\x03\x04" + os.urandom(3000) + b"PK\x05\x06" + bytes(18)


def conventions_message() -> bytes:
    """An MSSanté message: X-MSS-* headers, a read-receipt request, an IHE_XDM.ZIP attachment
    and the XDM subject that carries the patient's identity."""
    zipped = base64.encodebytes(XDM_ZIP).replace(b"\n", b"\r\n").decode()
    return (
        "From: <dr.a@a.mssante-test.fr>\r\nTo: <" + CLINIC + ">\r\n"
        "Subject: XDM/1.0/DDM+DUPONT+JEAN+19700101\r\n"
        "Message-ID: <xdm-1@a.mssante-test.fr>\r\n"
        "Date: Mon, 23 Nov 2026 10:00:00 +0100\r\nMIME-Version: 1.0\r\n"
        "X-MSS-Version: 1.0\r\nX-Mss-Classification: sensible ; raison=test\r\n"
        "Disposition-Notification-To: <dr.a@a.mssante-test.fr>\r\n"
        'Content-Type: multipart/mixed; boundary="b1"\r\n\r\n'
        "--b1\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nCompte rendu joint.\r\n"
        '--b1\r\nContent-Type: application/zip; name="IHE_XDM.ZIP"\r\n'
        "Content-Transfer-Encoding: base64\r\n"
        'Content-Disposition: attachment; filename="IHE_XDM.ZIP"\r\n\r\n'
        f"{zipped}--b1--\r\n"
    ).encode()


async def test_listed_operator_delivers_and_mssante_conventions_pass_intact(
    mss: Running, caplog: pytest.LogCaptureFixture,
) -> None:
    world = mss.world
    assert isinstance(world, MssanteWorld)
    data = conventions_message()
    with caplog.at_level(logging.DEBUG):
        refused, _ = await mss.send("dr.a@a.mssante-test.fr", [CLINIC], data,
                                    client=world.operators["listed"])
        assert refused == {}
        [got] = await world.sinks["clinic"].wait()
    # Byte for byte below the trace headers: X-MSS-*, Disposition-Notification-To, the zip.
    assert split_trace(got.data)[1] == data
    parsed = email.message_from_bytes(got.data, policy=email.policy.compat32)
    attachment = parsed.get_payload()[1]
    assert attachment.get_filename() == "IHE_XDM.ZIP"
    assert attachment.get_payload(decode=True) == XDM_ZIP
    # The XDM subject names the patient: never in the audit trail, never in the gateway's logs
    # (aiosmtpd's own `mail.log` echoes DATA at DEBUG; `gateway serve` keeps it at WARNING).
    audit_text = "".join(p.read_text() for p in (world.root / "var" / "audit").iterdir())
    assert "DUPONT" not in audit_text
    ours = [r.getMessage() for r in caplog.records if r.name.startswith("gateway")]
    assert ours and not any("DUPONT" in text for text in ours)


async def test_peer_certificate_without_subject_alt_name_is_accepted(mss: Running) -> None:
    world = mss.world
    assert isinstance(world, MssanteWorld)
    nosan = world.operators["nosan"].certificate
    assert not [e for e in nosan.extensions if e.oid.dotted_string == "2.5.29.17"]
    assert (await mail_from(world, world.operators["nosan"], "x@b.mssante-test.fr")
            ).startswith("250")


async def test_null_sender_and_read_receipt_from_a_listed_operator(mss: Running) -> None:
    world = mss.world
    assert isinstance(world, MssanteWorld)
    mdn = (
        "From: <dr.a@a.mssante-test.fr>\r\nTo: <" + CLINIC + ">\r\nSubject: Lu\r\n"
        "Message-ID: <mdn-1@a.mssante-test.fr>\r\nMIME-Version: 1.0\r\n"
        'Content-Type: multipart/report; report-type=disposition-notification; boundary="r"\r\n'
        "\r\n--r\r\nContent-Type: text/plain\r\n\r\nLu.\r\n"
        "--r\r\nContent-Type: message/disposition-notification\r\n\r\n"
        "Reporting-UA: a.mssante-test.fr\r\nFinal-Recipient: rfc822;dr.a@a.mssante-test.fr\r\n"
        "Original-Message-ID: <xdm-1@clinique-test.fr>\r\n"
        "Disposition: manual-action/MDN-sent-manually; displayed\r\n\r\n--r--\r\n"
    ).encode()
    refused, _ = await mss.send("", [CLINIC], mdn, client=world.operators["listed"])
    assert refused == {}
    [got] = await world.sinks["clinic"].wait()
    assert got.sender == "<>"
    assert split_trace(got.data)[1] == mdn


@pytest.mark.parametrize("role", ["unlisted", "cn_twin", "reordered", "revoked"])
async def test_refused_peers_get_550_and_the_audit_gets_the_details(
    mss: Running, role: str,
) -> None:
    world = mss.world
    assert isinstance(world, MssanteWorld)
    reply = await mail_from(world, world.operators[role], "dr.a@a.mssante-test.fr")
    assert reply.startswith("550 5.7.1"), reply
    # The peer learns nothing about the list or its certificate...
    assert "CN=" not in reply and "revoked" not in reply.lower()
    # ...the audit trail learns which DN was presented and why it failed.
    [record] = audit_records(mss, "rejected")
    assert record["reply"].startswith("550 5.7.1")
    assert world.dn(role) in record["detail"]
    if role == "revoked":
        assert "revoked" in record["detail"] and record["reason"] == "revoked"
    else:
        assert "the whitelist expects" in record["detail"]
        # The listed DN, as the list spells it (other case, spaces kept inside values).
        assert "cn=mx.operateur-a.test,ou=1750000001,o=ch  operateur a" in \
            record["detail"].lower()
    assert world.sinks["clinic"].messages == []


@pytest.mark.parametrize("role", ["expired", "untrusted"])
async def test_expired_or_untrusted_client_certificates_never_reach_mail(
    mss: Running, role: str,
) -> None:
    world = mss.world
    assert isinstance(world, MssanteWorld)
    reply = await mail_from(world, world.operators[role], "dr.a@a.mssante-test.fr")
    assert reply == "handshake refused" or reply.startswith("550 5.7.1"), reply


async def test_sender_domain_listed_for_another_operator_is_refused(mss: Running) -> None:
    world = mss.world
    assert isinstance(world, MssanteWorld)
    # The no-SAN operator is listed for b.mssante-test.fr only.
    reply = await mail_from(world, world.operators["nosan"], "x@a.mssante-test.fr")
    assert reply.startswith("550 5.7.1")


# -- outbound: who may receive ----------------------------------------------------------------


async def test_next_hop_listed_for_the_recipient_domain_receives(mss: Running) -> None:
    world = mss.world
    data = message(CLINIC, "dr.a@a.mssante-test.fr")
    await mss.send(CLINIC, ["dr.a@a.mssante-test.fr"], data)
    [got] = await world.sinks["mssante"].wait()
    assert split_trace(got.data)[1] == data


@pytest.mark.parametrize(("recipient", "sink", "why"), [
    ("dr.c@c.mssante-test.fr", "mssante", "not listed in the MSSanté whitelist"),
    ("dr.d@d.autre-mssante-test.fr", "revokedhop", "revoked"),
])
async def test_next_hop_not_listed_or_revoked_is_never_sent_then_bounced(
    mssante_factory: Callable[..., MssanteWorld], recipient: str, sink: str, why: str,
) -> None:
    world = mssante_factory(retry="[1s]", give_up="3s")
    async with start(world) as running:
        data = message(CLINIC, recipient)
        await running.send(CLINIC, [recipient], data)
        [dsn] = await world.sinks["clinic"].wait(timeout=30)
        assert world.sinks[sink].messages == []  # never sent, not even once
        body = split_trace(dsn.data)[1]
        report = email.message_from_bytes(body, policy=email.policy.compat32)
        assert report.get_content_type() == "multipart/report"
        status = report.get_payload()[1].get_payload()[1]
        assert status["Action"] == "failed"
        deferred = audit_records(running, "deferred")
        assert deferred and why in str(deferred[0])


# -- the list changes while serving -----------------------------------------------------------


async def test_reload_takes_a_new_list_and_keeps_the_last_good_one(mss: Running) -> None:
    world = mss.world
    assert isinstance(world, MssanteWorld)
    newcomer = world.operators["unlisted"]
    assert (await mail_from(world, newcomer, "x@e.mssante-test.fr")).startswith("550")
    world.write_whitelist([*world.listed, ("e.mssante-test.fr", world.dn("unlisted"))])
    assert mss.gateway.reload()
    assert (await mail_from(world, newcomer, "x@e.mssante-test.fr")).startswith("250")
    # A broken download: the gateway keeps serving with the last good list.
    world.whitelist.write_bytes(world.whitelist.read_bytes()[:300])
    assert mss.gateway.reload()
    assert mss.gateway.runtime().whitelist is not None
    assert (await mail_from(world, newcomer, "x@e.mssante-test.fr")).startswith("250")
    assert (await mail_from(world, world.operators["unlisted"], "x@a.mssante-test.fr")
            ).startswith("550")


async def test_mail_sent_into_mssante_carries_x_mss_nil(
    mssante_factory: Callable[..., MssanteWorld],
) -> None:
    world = mssante_factory(x_mss_nil='"PASSERELLE-TEST-1.0"')
    async with start(world) as running:
        data = message(CLINIC, "dr.a@a.mssante-test.fr")
        await running.send(CLINIC, ["dr.a@a.mssante-test.fr"], data)
        kept = message(CLINIC, "dr.b@a.mssante-test.fr", extra="X-MSS-NIL: LOGICIEL-SOURCE\r\n")
        await running.send(CLINIC, ["dr.b@a.mssante-test.fr"], kept)
        # Two deliveries run side by side: tell them apart by recipient, not arrival order.
        arrived = {m.recipients[0]: m for m in await world.sinks["mssante"].wait(2)}
        first, second = arrived["dr.a@a.mssante-test.fr"], arrived["dr.b@a.mssante-test.fr"]
        assert first.data.startswith(b"X-MSS-NIL: PASSERELLE-TEST-1.0\r\nReceived: ")
        assert first.data.endswith(data)
        # One already set by the sending product stays, alone and untouched.
        assert second.data.count(b"X-MSS-NIL") == 1 and split_trace(second.data)[1] == kept


# -- MSSanté conventions through every adapter --------------------------------------------------
#
# Read receipts must come back across the gateway whatever the networks on either side: the
# request (`Disposition-Notification-To`) and the receipt (RFC 8098 `multipart/report;
# report-type=disposition-notification`) cross each adapter in both directions with their
# header fields and their parts' decoded bytes intact, and so do the X-MSS-* fields and an
# IHE_XDM.ZIP attachment. The XDM subject names the patient: never in the audit trail.

PGP_PEER = "dr.pgp@pgp-test.org"
HOSPITAL_DOCTOR = "dr.martin@chu-test.fr"
XDM_SUBJECT = "XDM/1.0/DDM+DUPONT+JEAN+19700101"


def receipt_request(sender: str, recipient: str) -> bytes:
    """A hospital letter that asks for a read receipt, with X-MSS-* and an IHE_XDM.ZIP."""
    zipped = base64.encodebytes(XDM_ZIP).replace(b"\n", b"\r\n").decode()
    return (
        f"From: <{sender}>\r\nTo: <{recipient}>\r\nSubject: {XDM_SUBJECT}\r\n"
        f"Message-ID: <xdm-2@{sender.rpartition('@')[2]}>\r\n"
        f"Date: {email.utils.formatdate(localtime=True)}\r\nMIME-Version: 1.0\r\n"
        "X-MSS-Version: 1.0\r\nX-Mss-Classification: sensible ; raison=test\r\n"
        f"Disposition-Notification-To: <{sender}>\r\n"
        'Content-Type: multipart/mixed; boundary="b1"\r\n\r\n'
        "--b1\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\nCompte rendu joint.\r\n"
        '--b1\r\nContent-Type: application/zip; name="IHE_XDM.ZIP"\r\n'
        "Content-Transfer-Encoding: base64\r\n"
        'Content-Disposition: attachment; filename="IHE_XDM.ZIP"\r\n\r\n'
        f"{zipped}--b1--\r\n"
    ).encode()


def read_receipt(sender: str, recipient: str) -> bytes:
    """An RFC 8098 MDN from `sender` about a message `recipient` sent."""
    return (
        f"From: <{sender}>\r\nTo: <{recipient}>\r\nSubject: Lu\r\n"
        f"Message-ID: <mdn-2@{sender.rpartition('@')[2]}>\r\n"
        f"Date: {email.utils.formatdate(localtime=True)}\r\nMIME-Version: 1.0\r\n"
        'Content-Type: multipart/report; report-type=disposition-notification; '
        'boundary="r"\r\n\r\n'
        "--r\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\nVotre message a ete lu.\r\n"
        "--r\r\nContent-Type: message/disposition-notification\r\n\r\n"
        f"Reporting-UA: {sender.rpartition('@')[2]}; Passerelle-Test\r\n"
        f"Original-Recipient: rfc822;{sender}\r\nFinal-Recipient: rfc822;{sender}\r\n"
        f"Original-Message-ID: <xdm-2@{recipient.rpartition('@')[2]}>\r\n"
        "Disposition: manual-action/MDN-sent-manually; displayed\r\n"
        "\r\n--r--\r\n"
    ).encode()


def leaves(data: bytes) -> list[tuple[str, str | None, bytes]]:
    """(content type, file name, decoded bytes) of every leaf part, line ends as LF."""
    out: list[tuple[str, str | None, bytes]] = []

    def visit(part: email.message.Message) -> None:
        kind = part.get_content_type()
        if kind == "message/disposition-notification":
            # The email package parses these fields as header blocks: take them as written.
            found = re.search(rb"message/disposition-notification\r?\n\r?\n(.*?)\r?\n--",
                              data, re.DOTALL | re.IGNORECASE)
            assert found is not None
            out.append((kind, None, found.group(1).replace(b"\r\n", b"\n")))
        elif part.is_multipart():
            for child in part.get_payload():
                visit(child)
        else:
            payload = part.get_payload(decode=True)
            assert isinstance(payload, bytes)
            out.append((kind, part.get_filename(), payload.replace(b"\r\n", b"\n")))

    visit(email.message_from_bytes(data, policy=email.policy.compat32))
    return out


def assert_conventions_kept(got: bytes, sent: bytes) -> None:
    """`got` carries `sent`'s receipt request, X-MSS-* fields, structure and parts."""
    want = email.message_from_bytes(sent, policy=email.policy.compat32)
    have = email.message_from_bytes(got, policy=email.policy.compat32)
    for field in ("Disposition-Notification-To", "X-MSS-Version", "X-Mss-Classification",
                  "Message-ID"):
        assert have.get_all(field) == want.get_all(field), field
    assert have.get_content_type() == want.get_content_type()
    assert have.get_param("report-type") == want.get_param("report-type")
    assert leaves(got) == leaves(sent)


def assert_subject_not_recorded(running: Running, caplog: pytest.LogCaptureFixture) -> None:
    """The XDM subject is in neither the audit trail nor the gateway's own log records."""
    folder = running.gateway.audit.folder
    assert "DUPONT" not in "".join(p.read_text() for p in folder.iterdir())
    ours = [r.getMessage() for r in caplog.records if r.name.startswith("gateway")]
    assert ours and not any("DUPONT" in text for text in ours)


def paired(arrived: list[Any], sent: list[bytes]) -> list[tuple[Any, bytes]]:
    """Each message that arrived with the one sent, by Message-ID (deliveries run side by
    side: arrival order is not sending order)."""
    def message_id(data: bytes) -> str:
        return str(email.message_from_bytes(data, policy=email.policy.compat32)["Message-ID"])

    by_id = {message_id(got.data): got for got in arrived}
    assert len(by_id) == len(sent)
    return [(by_id[message_id(data)], data) for data in sent]


async def receipts_from_the_hospital(running: Running, recipient: str,
                                     sink: str) -> list[tuple[Any, bytes]]:
    """A receipt request and a read receipt sent by the hospital's doctor to `recipient`
    through the gateway: each message that reached `sink`, with the one sent."""
    world = running.world
    sent = [receipt_request(HOSPITAL_DOCTOR, recipient), read_receipt(HOSPITAL_DOCTOR, recipient)]
    for data in sent:
        await running.send(HOSPITAL_DOCTOR, [recipient], data, client=world.hospital_client)
    return paired(await world.sinks[sink].wait(2, timeout=30), sent)


def crlf(data: bytes) -> bytes:
    return data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


@pytest.fixture
async def crypto(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                 ) -> AsyncIterator[tuple[CryptoWorld, Running]]:
    """The crypto world (S/MIME and Apicrypt networks) plus an OpenPGP network `pgp`; the
    gateway's log records are captured at DEBUG."""
    caplog.set_level(logging.DEBUG, logger="gateway")
    built = build_crypto_world(tmp_path)
    world = built.world
    world.sinks["pgp"] = Sink("pgp", sink_context(world.pki, world.root, "pgp"))
    peer = built.gpg.generate(f"Dr PGP <{PGP_PEER}>")
    (built.pki / "directory" / "pgp.asc").write_bytes(built.gpg.export_public(peer))
    text = world.config.read_text().replace("networks:\n", f"""networks:
  pgp:
    adapter: openpgp
    domains: [pgp-test.org]
    peers: {{addresses: [127.0.0.1]}}
    identity: apicrypt-pgp
    relay: {{host: 127.0.0.1, port: {world.sinks["pgp"].port}, tls: opportunistic}}
""", 1)
    text = text.replace("to: [clinic, medecin, apicrypt]}", "to: [clinic, medecin, apicrypt, pgp]}")
    text = text.replace("routes:\n", "routes:\n  - {from: pgp, to: [hospital]}\n", 1)
    world.config.write_text(text)
    try:
        async with start(world) as running:
            yield built, running
    finally:
        built.gpg.close()


def openssl(*args: str | Path, data: bytes | None = None) -> bytes:
    done = subprocess.run(["openssl", *map(str, args)], input=data, capture_output=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr.decode()
    return done.stdout


@pytest.mark.interop
async def test_receipts_cross_into_the_smime_network_intact(
    crypto: tuple[CryptoWorld, Running],
    caplog: pytest.LogCaptureFixture,
) -> None:
    built, running = crypto
    world = built.world
    work = world.root / "work"
    received = await receipts_from_the_hospital(running, DOCTOR, "medecin")
    for index, (got, data) in enumerate(received):
        # What the doctor's client reads once it decrypted with the doctor's key and
        # verified the gateway's signature (openssl as the independent S/MIME reader).
        sealed = built.write(f"sealed-{index}.eml", got.data)
        signed = openssl("cms", "-decrypt", "-in", sealed, "-recip", work / "doctor.pem",
                         "-inkey", work / "doctor.key")
        inner = openssl("cms", "-verify", "-in", built.write(f"signed-{index}.eml", signed),
                        "-CAfile", world.anchor)
        assert_conventions_kept(split_trace(crlf(inner))[1], data)
    assert_subject_not_recorded(running, caplog)


@pytest.mark.interop
async def test_receipts_from_the_smime_network_reach_the_hospital_intact(
    crypto: tuple[CryptoWorld, Running],
    caplog: pytest.LogCaptureFixture,
) -> None:
    built, running = crypto
    world = built.world
    work = world.root / "work"
    sent = [receipt_request(DOCTOR, HOSPITAL_DOCTOR), read_receipt(DOCTOR, HOSPITAL_DOCTOR)]
    for index, data in enumerate(sent):
        signed = openssl("cms", "-sign", "-in", built.write(f"plain-{index}.eml", data),
                         "-signer", work / "doctor.pem", "-inkey", work / "doctor.key",
                         "-md", "sha256", "-binary")
        encrypted = openssl("cms", "-encrypt", "-in", built.write(f"s-{index}.eml", signed),
                            "-aes-256-cbc", "-from", DOCTOR, "-to", HOSPITAL_DOCTOR,
                            world.root / "pki" / "medecin.pem")
        await running.send(DOCTOR, [HOSPITAL_DOCTOR], crlf(encrypted),
                           client=built.medecin_mta)
    arrived = await world.sinks["hospital"].wait(2, timeout=30)
    for got, data in paired(arrived, sent):
        trace, rest = split_trace(got.data)
        assert any(b"smime=pass" in line for line in trace)
        assert_conventions_kept(rest, data)
    assert_subject_not_recorded(running, caplog)


@pytest.mark.interop
async def test_receipts_cross_into_the_openpgp_network_intact(
    crypto: tuple[CryptoWorld, Running],
    caplog: pytest.LogCaptureFixture,
) -> None:
    built, running = crypto
    for got, data in await receipts_from_the_hospital(running, PGP_PEER, "pgp"):
        wrapped = email.message_from_bytes(got.data, policy=email.policy.compat32)
        assert wrapped.get_content_type() == "multipart/encrypted"
        armored = wrapped.get_payload()[1].get_payload(decode=True)
        opened = built.gpg.run("--decrypt", input=armored)
        assert opened.has("DECRYPTION_OKAY"), opened.stderr
        signed = email.message_from_bytes(opened.output, policy=email.policy.compat32)
        assert signed.get_content_type() == "multipart/signed"
        # The signed entity exactly as it sits between the first two boundary lines.
        delimiter = b"\r\n--" + str(signed.get_boundary()).encode() + b"\r\n"
        inner = crlf(opened.output).split(delimiter)[1]
        assert_conventions_kept(split_trace(inner)[1], data)
    assert_subject_not_recorded(running, caplog)


def pgp_mime(gpg: Any, data: bytes, signer: str) -> bytes:
    """`data` signed by `signer` and encrypted to the gateway as RFC 3156 PGP/MIME, the way an
    OpenPGP mail client sends it (routing header fields outside, the whole entity inside)."""
    head, body = data.split(b"\r\n\r\n", 1)
    fields = [f for f in head.split(b"\r\n") if not f.lower().startswith(b"content-type")]
    content_type = next(f for f in head.split(b"\r\n") if f.lower().startswith(b"content-type"))
    entity = b"\r\n".join([*fields, content_type]) + b"\r\n\r\n" + body
    armored = gpg.run("--armor", "--sign", "--encrypt", "-r", GATEWAY_PGP, "-u", signer,
                      input=entity, check=True).output
    routing = b"\r\n".join(f for f in fields if f.split(b":")[0].lower() in (
        b"from", b"to", b"subject", b"message-id", b"date"))
    return (
        routing + b"\r\nMIME-Version: 1.0\r\n"
        b'Content-Type: multipart/encrypted; protocol="application/pgp-encrypted"; '
        b'boundary="e"\r\n\r\n--e\r\nContent-Type: application/pgp-encrypted\r\n\r\n'
        b"Version: 1\r\n\r\n--e\r\nContent-Type: application/octet-stream\r\n\r\n"
        + crlf(armored) + b"\r\n--e--\r\n"
    )


@pytest.mark.interop
@pytest.mark.parametrize(("network", "method"), [("openpgp", "x-openpgp"),
                                                 ("apicrypt", "x-apicrypt")])
async def test_receipts_from_an_openpgp_network_reach_the_hospital_intact(
    crypto: tuple[CryptoWorld, Running],
    caplog: pytest.LogCaptureFixture,
    network: str,
    method: str,
) -> None:
    """PGP/MIME from an OpenPGP network, and from an Apicrypt one (Apicrypt 2 and PGP users
    send it too), each with its own verdict method."""
    built, running = crypto
    world = built.world
    sender, signer = ((PGP_PEER, PGP_PEER) if network == "openpgp"
                      else (GP, built.gp_fingerprint))
    sent = [receipt_request(sender, HOSPITAL_DOCTOR), read_receipt(sender, HOSPITAL_DOCTOR)]
    for data in sent:
        await running.send(sender, [HOSPITAL_DOCTOR], pgp_mime(built.gpg, data, signer))
    arrived = await world.sinks["hospital"].wait(2, timeout=30)
    for got, data in paired(arrived, sent):
        trace, rest = split_trace(got.data)
        assert any(f"{method}=pass".encode() in line for line in trace), trace
        assert_conventions_kept(rest, data)
    assert_subject_not_recorded(running, caplog)


def apicrypt_layout(gpg: Any, data: bytes, signer: str) -> bytes:
    """`data` (text and attachments) in the Apicrypt layout, made with gpg: the text as one
    armored block, each attachment encrypted on its own as `<name>.apz`, header fields in
    clear."""
    parsed = email.message_from_bytes(data, policy=email.policy.compat32)
    head = data.split(b"\r\n\r\n", 1)[0].split(b"\r\n")
    fields = b"\r\n".join(f for f in head if not f.lower().startswith(b"content-type"))
    parts = []
    for part in parsed.walk():
        if part.is_multipart():
            continue
        payload = part.get_payload(decode=True)
        assert isinstance(payload, bytes)
        if part.get_filename() is None:
            block = gpg.run("--armor", "--sign", "--encrypt", "-r", GATEWAY_PGP, "-u", signer,
                            input=payload, check=True).output
            parts.append(b"Content-Type: text/plain; charset=us-ascii\r\n\r\n" + crlf(block))
        else:
            sealed = gpg.run("--sign", "--encrypt", "-r", GATEWAY_PGP, "-u", signer,
                             input=payload, check=True).output
            name = f"{part.get_filename()}.apz"
            parts.append(
                f'Content-Type: application/octet-stream; name="{name}"\r\n'
                "Content-Transfer-Encoding: base64\r\n"
                f'Content-Disposition: attachment; filename="{name}"\r\n\r\n'.encode()
                + base64.encodebytes(sealed).replace(b"\n", b"\r\n"))
    body = b"".join(b"--a\r\n" + part + b"\r\n" for part in parts) + b"--a--\r\n"
    return fields + b'\r\nContent-Type: multipart/mixed; boundary="a"\r\n\r\n' + body


@pytest.mark.interop
async def test_apicrypt_layout_keeps_the_receipt_request_and_the_xdm_zip(
    crypto: tuple[CryptoWorld, Running],
    caplog: pytest.LogCaptureFixture,
) -> None:
    built, running = crypto
    world = built.world
    data = receipt_request(GP, HOSPITAL_DOCTOR)
    await running.send(GP, [HOSPITAL_DOCTOR],
                       apicrypt_layout(built.gpg, data, built.gp_fingerprint))
    [got] = await world.sinks["hospital"].wait(timeout=30)
    trace, rest = split_trace(got.data)
    assert any(b"x-apicrypt=pass" in line for line in trace), trace
    have = email.message_from_bytes(rest, policy=email.policy.compat32)
    want = email.message_from_bytes(data, policy=email.policy.compat32)
    for field in ("Disposition-Notification-To", "X-MSS-Version", "X-Mss-Classification"):
        assert have.get_all(field) == want.get_all(field), field
    # The parts' decoded bytes, the IHE_XDM.ZIP among them under its own name (the Apicrypt
    # layout does not carry the attachment's media type).
    assert [(n, b) for _, n, b in leaves(rest)] == [(n, b) for _, n, b in leaves(data)]
    assert_subject_not_recorded(running, caplog)


def opened_apicrypt(gpg: Any, data: bytes) -> list[tuple[str | None, bytes]]:
    """(file name without .apz, decrypted bytes) of each part of an Apicrypt message."""
    parsed = email.message_from_bytes(data, policy=email.policy.compat32)
    out = []
    for part in parsed.walk():
        if part.is_multipart():
            continue
        payload = part.get_payload(decode=True)
        assert isinstance(payload, bytes)
        opened = gpg.run("--decrypt", input=payload)
        assert opened.has("DECRYPTION_OKAY") and opened.has("GOODSIG"), opened.stderr
        name = part.get_filename()
        out.append((name.removesuffix(".apz") if name else None,
                    opened.output.replace(b"\r\n", b"\n")))
    return out


@pytest.mark.interop
async def test_receipts_cross_into_the_apicrypt_network_as_its_layout(
    crypto: tuple[CryptoWorld, Running],
    caplog: pytest.LogCaptureFixture,
) -> None:
    built, running = crypto
    [(request, request_sent), (receipt, receipt_sent)] = await receipts_from_the_hospital(
        running, GP, "apicrypt")
    # The Apicrypt layout has a text block and attachments: the request's text and its
    # IHE_XDM.ZIP come out of gpg byte for byte, the zip under its own name.
    [(_, _, text), (_, _, zipped)] = leaves(request_sent)
    assert opened_apicrypt(built.gpg, request.data) == [(None, text), ("IHE_XDM.ZIP", zipped)]
    # A receipt: its human-readable text and its disposition fields, each decrypted intact.
    [(_, _, said), (_, _, fields)] = leaves(receipt_sent)
    [(no_name, got_text), (_, got_fields)] = opened_apicrypt(built.gpg, receipt.data)
    assert no_name is None and (got_text, got_fields) == (said, fields)
    assert_subject_not_recorded(running, caplog)


@pytest.mark.interop
async def test_receipt_request_and_x_mss_fields_reach_the_apicrypt_reader(
    crypto: tuple[CryptoWorld, Running],
) -> None:
    built, running = crypto
    world = built.world
    data = receipt_request(HOSPITAL_DOCTOR, GP)
    await running.send(HOSPITAL_DOCTOR, [GP], data, client=world.hospital_client)
    [got] = await world.sinks["apicrypt"].wait(timeout=30)
    have = email.message_from_bytes(got.data, policy=email.policy.compat32)
    want = email.message_from_bytes(data, policy=email.policy.compat32)
    for field in ("Disposition-Notification-To", "X-MSS-Version", "X-Mss-Classification"):
        assert have.get_all(field) == want.get_all(field), field
