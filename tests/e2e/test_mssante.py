"""The MSSanté trust space end to end: real SMTP and mutual TLS on 127.0.0.1, an IGC-Santé-shaped
PKI with CRLs, and a whitelist in the official format (issue 5)."""

from __future__ import annotations

import base64
import email
import email.policy
import logging
import os
import ssl
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest

from gateway.audit import read_records
from tests.e2e.conftest import Running, start
from tests.e2e.test_relay import split_trace
from tests.support import testpki
from tests.support.world import MssanteWorld, build_mssante_world, message

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
        first, second = await world.sinks["mssante"].wait(2)
        assert first.data.startswith(b"X-MSS-NIL: PASSERELLE-TEST-1.0\r\nReceived: ")
        assert first.data.endswith(data)
        # One already set by the sending product stays, alone and untouched.
        assert second.data.count(b"X-MSS-NIL") == 1 and split_trace(second.data)[1] == kept
