"""The trunk end to end: real SMTP and TLS on 127.0.0.1, recording sinks as next hops."""

from __future__ import annotations

import asyncio
import email
import email.policy
from collections.abc import Callable
from typing import Any

import aiosmtplib
import pytest

from tests.e2e.conftest import Running, start
from tests.support.world import World, message

pytestmark = pytest.mark.e2e


def split_trace(data: bytes) -> tuple[list[bytes], bytes]:
    """The gateway's trace headers (at the top) and the message as the sender wrote it."""
    lines = data.split(b"\r\n")
    trace: list[bytes] = []
    index = 0
    while index < len(lines):
        line = lines[index]
        if line.startswith((b"Received:", b"Authentication-Results:")) or (
            trace and line[:1] in (b" ", b"\t")
        ):
            trace.append(line)
            index += 1
            continue
        break
    return trace, b"\r\n".join(lines[index:])


async def test_hospital_to_clinic_bytes_preserved(running: Running) -> None:
    world = running.world
    data = message("dr.martin@chu-test.fr", "dr.durand@clinique-test.fr",
                   body="R\xe9sultats joints.\r\n.leading dot line\r\n")
    refused, reply = await running.send(
        "dr.martin@chu-test.fr", ["dr.durand@clinique-test.fr"], data,
        client=world.hospital_client,
    )
    assert refused == {}
    assert reply.startswith("2.0.0 Ok: queued as ")
    [got] = await world.sinks["clinic"].wait()
    assert got.sender == "dr.martin@chu-test.fr"
    assert got.recipients == ["dr.durand@clinique-test.fr"]
    trace, rest = split_trace(got.data)
    assert rest == data
    assert trace[0].startswith(b"Received: from ")
    assert any(b"Authentication-Results: passerelle.test; none" in t for t in trace)


async def test_clinic_to_hospital_over_required_tls_with_client_certificate(
    running: Running,
) -> None:
    world = running.world
    data = message("secretariat@clinique-test.fr", "dr.martin@chu-test.fr")
    await running.send("secretariat@clinique-test.fr", ["dr.martin@chu-test.fr"], data)
    [got] = await world.sinks["hospital"].wait()
    assert split_trace(got.data)[1] == data
    # The hospital's relay is `tls: required`: the gateway presented its client certificate.
    assert got.peer_certificate is not None
    subject = dict(x[0] for x in got.peer_certificate["subject"])
    assert subject["commonName"] == "passerelle.test"


async def test_implicit_tls_listener(running: Running) -> None:
    world = running.world
    data = message("a@clinique-test.fr", "b@chu-test.fr")
    await running.send("a@clinique-test.fr", ["b@chu-test.fr"], data, implicit=True)
    await world.sinks["hospital"].wait()


async def test_wildcard_domain_and_several_networks_in_one_message(
    world_factory: Callable[..., World],
) -> None:
    def both_ways(text: str) -> str:
        return text.replace("- {from: hospital, to: [clinic]}",
                            "- {from: hospital, to: [clinic, hospital]}")

    world = world_factory(edit=both_ways)
    async with start(world) as running:
        data = message("a@chu-test.fr", "x@ch-sud.mssante-test.fr")
        await running.send("a@chu-test.fr", ["x@ch-sud.mssante-test.fr", "y@chu-test.fr"], data,
                           client=world.hospital_client)
        [to_clinic] = await world.sinks["clinic"].wait()
        [to_hospital] = await world.sinks["hospital"].wait()
        assert to_clinic.recipients == ["x@ch-sud.mssante-test.fr"]
        assert to_hospital.recipients == ["y@chu-test.fr"]


async def raw_session(world: World, commands: bytes, *, client: Any = None) -> list[str]:
    """Talk SMTP by hand (after STARTTLS), pipelining `commands`; returns every reply line."""
    reader, writer = await asyncio.open_connection("127.0.0.1", world.port)

    async def replies() -> list[str]:
        lines = []
        while True:
            line = (await asyncio.wait_for(reader.readline(), 10)).decode()
            lines.append(line.rstrip("\r\n"))
            if len(line) < 4 or line[3] != "-":
                return lines

    await replies()
    writer.write(b"EHLO client.test\r\n")
    await replies()
    writer.write(b"STARTTLS\r\n")
    await replies()
    await writer.start_tls(world.client_context(client))
    writer.write(b"EHLO client.test\r\n")
    await replies()
    writer.write(commands)
    await writer.drain()
    out: list[str] = []
    try:
        while True:
            out.extend(await replies())
            if out[-1].startswith("221"):
                break
    except (TimeoutError, ConnectionError, asyncio.IncompleteReadError):
        pass
    writer.close()
    return [line for line in out if line]


@pytest.mark.parametrize(
    ("recipient", "code"),
    [
        ("<user%evil.example@chu-test.fr>", "553 5.1.3"),
        ("<evil.example!user@chu-test.fr>", "553 5.1.3"),
        ('<"user@evil.example"@chu-test.fr>', "553 5.1.3"),
        ("<@chu-test.fr:user@evil.example>", "550 5.1.2"),
        ("<user@evil.example>", "550 5.1.2"),
        ("<user@evil.example.>", "550 5.1.2"),
        ("<user@CHU-TEST.FR.evil.example>", "550 5.1.2"),
        ("<user@[127.0.0.1]>", "550 5.1.2"),
        ("<user@labo-test.fr>", "550 5.7.1"),  # a known network, but no route clinic -> lab
        ("<user@LABO-TEST.FR.>", "550 5.7.1"),
        ("<user@clinique-test.fr>", "550 5.7.1"),  # no route clinic -> clinic
    ],
)
async def test_open_relay_tricks_are_refused(running: Running, recipient: str, code: str) -> None:
    lines = await raw_session(
        running.world, f"MAIL FROM:<a@clinique-test.fr>\r\nRCPT TO:{recipient}\r\nQUIT\r\n".encode()
    )
    assert lines[0].startswith("250 2.1.0")
    assert lines[1].startswith(code), lines


async def test_route_allowed_with_upper_case_and_trailing_dot(running: Running) -> None:
    lines = await raw_session(
        running.world, b"MAIL FROM:<a@clinique-test.fr>\r\nRCPT TO:<Dr@CHU-TEST.FR.>\r\nQUIT\r\n"
    )
    assert lines[1].startswith("250 2.1.5")


async def test_unauthenticated_peer_gets_nothing_through(running: Running) -> None:
    world = running.world
    # A certificate that chains to the anchors but is not the hospital's: it cannot speak for
    # chu-test.fr (it only gets the address-based clinic network, which does not claim it).
    lines = await raw_session(
        world, b"MAIL FROM:<a@chu-test.fr>\r\nQUIT\r\n", client=world.stranger_client
    )
    assert lines[0].startswith("550 5.7.1")
    # Without a certificate at all, same answer.
    lines = await raw_session(world, b"MAIL FROM:<a@chu-test.fr>\r\nQUIT\r\n")
    assert lines[0].startswith("550 5.7.1")


async def test_sender_outside_any_network_refused(running: Running) -> None:
    lines = await raw_session(running.world, b"MAIL FROM:<a@evil.example>\r\nQUIT\r\n")
    assert lines[0].startswith("550 5.7.1")


async def test_null_sender_accepted_from_authenticated_peer(running: Running) -> None:
    world = running.world
    data = message("mailer-daemon@clinique-test.fr", "dr@chu-test.fr")
    refused, _ = await running.send("", ["dr@chu-test.fr"], data)
    assert refused == {}
    [got] = await world.sinks["hospital"].wait()
    assert got.sender == "<>"  # aiosmtpd records the null reverse-path as "<>"


async def test_size_advertised_and_enforced(running: Running) -> None:
    world = running.world
    smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=world.port, start_tls=True,
                           tls_context=world.client_context(None), timeout=10)
    await smtp.connect()
    await smtp.ehlo()
    assert smtp.supports_extension("size")
    assert smtp.esmtp_extensions["size"] == str(1024 * 1024)
    assert smtp.supports_extension("dsn") and smtp.supports_extension("enhancedstatuscodes")
    with pytest.raises(aiosmtplib.SMTPSenderRefused) as refused:
        await smtp.mail("a@clinique-test.fr", options=["SIZE=99999999"])
    assert refused.value.code == 552 and refused.value.message.startswith("5.3.4")
    await smtp.rset()
    await smtp.mail("a@clinique-test.fr")
    await smtp.rcpt("b@chu-test.fr")
    big = message("a@clinique-test.fr", "b@chu-test.fr", body=("x" * 900 + "\r\n") * 1300)
    with pytest.raises(aiosmtplib.SMTPDataError) as caught:
        await smtp.data(big)
    assert caught.value.code == 552
    await smtp.quit()
    assert world.sinks["hospital"].messages == []


SMUGGLED = [
    b"\n.\n",
    b"\r.\r",
    b"\n.\r\n",
    b"\r\n.\n",
    b"\r.\r\n",
]


@pytest.mark.parametrize("separator", SMUGGLED, ids=[repr(s) for s in SMUGGLED])
async def test_smuggling_variants_refused(running: Running, separator: bytes) -> None:
    world = running.world
    smuggled = (
        b"MAIL FROM:<a@clinique-test.fr>\r\nRCPT TO:<victim@chu-test.fr>\r\nDATA\r\n"
        b"From: <ceo@clinique-test.fr>\r\nSubject: smuggled\r\n\r\nforged\r\n"
    )
    payload = (
        b"MAIL FROM:<a@clinique-test.fr>\r\nRCPT TO:<b@chu-test.fr>\r\nDATA\r\n"
        b"From: <a@clinique-test.fr>\r\nSubject: legit\r\n\r\nhello" + separator + smuggled
        + b".\r\nQUIT\r\n"
    )
    lines = await raw_session(world, payload)
    assert lines[:3] == ["250 2.1.0 Sender OK", "250 2.1.5 Recipient OK",
                         "354 End data with <CR><LF>.<CR><LF>"]
    assert lines[3].startswith("550 5.6.0"), lines
    assert not any(line.startswith("250 2.0.0") for line in lines)
    await asyncio.sleep(0.5)
    assert world.sinks["hospital"].messages == []


async def test_line_longer_than_998_octets_refused(running: Running) -> None:
    world = running.world
    payload = (
        b"MAIL FROM:<a@clinique-test.fr>\r\nRCPT TO:<b@chu-test.fr>\r\nDATA\r\n"
        b"Subject: long\r\n\r\n" + b"x" * 999 + b"\r\n.\r\nQUIT\r\n"
    )
    lines = await raw_session(world, payload)
    assert lines[3].startswith("500 5.5.2"), lines
    exactly = (
        b"MAIL FROM:<a@clinique-test.fr>\r\nRCPT TO:<b@chu-test.fr>\r\nDATA\r\n"
        b"Subject: long\r\n\r\n" + b"x" * 998 + b"\r\n.\r\nQUIT\r\n"
    )
    lines = await raw_session(world, exactly)
    assert lines[3].startswith("250 2.0.0"), lines


def parse(data: bytes) -> email.message.Message:
    return email.message_from_bytes(data, policy=email.policy.compat32)


def delivery_status(dsn: bytes) -> list[email.message.Message]:
    report = parse(dsn)
    assert report.get_content_type() == "multipart/report"
    assert report.get_param("report-type") == "delivery-status"
    parts = report.get_payload()
    assert isinstance(parts, list)
    status = parts[1]
    assert status.get_content_type() == "message/delivery-status"
    blocks = status.get_payload()
    assert isinstance(blocks, list)
    return blocks


async def test_temporary_failure_then_success(running: Running) -> None:
    world = running.world
    world.sinks["hospital"].handler.data_replies = ["451 4.3.0 try again later"]
    data = message("a@clinique-test.fr", "b@chu-test.fr")
    await running.send("a@clinique-test.fr", ["b@chu-test.fr"], data)
    [got] = await world.sinks["hospital"].wait(timeout=30)
    assert split_trace(got.data)[1] == data
    assert world.sinks["clinic"].messages == []  # no DSN for a delivered message


async def test_permanent_failure_gives_dsn_for_failed_recipients_only(running: Running) -> None:
    world = running.world
    world.sinks["hospital"].handler.rcpt_replies = {"gone@chu-test.fr": "550 5.1.1 No such user"}
    data = message("a@clinique-test.fr", "b@chu-test.fr")
    await running.send(
        "a@clinique-test.fr", ["b@chu-test.fr", "gone@chu-test.fr"], data,
        mail_options=["ENVID=QX+2B1", "RET=HDRS"],
        rcpt_options=["NOTIFY=FAILURE", "ORCPT=rfc822;Gone@chu-test.fr"],
    )
    [delivered] = await world.sinks["hospital"].wait()
    assert delivered.recipients == ["b@chu-test.fr"]
    [dsn] = await world.sinks["clinic"].wait()
    assert dsn.sender == "<>"
    assert dsn.recipients == ["a@clinique-test.fr"]
    _trace, body = split_trace(dsn.data)
    blocks = delivery_status(body)
    assert blocks[0]["Reporting-MTA"] == "dns; passerelle.test"
    assert blocks[0]["Original-Envelope-Id"] == "QX+1"  # xtext decoded (RFC 3461 §6.3)
    [recipient] = blocks[1:]
    assert recipient["Final-Recipient"] == "rfc822; gone@chu-test.fr"
    assert recipient["Original-Recipient"] == "rfc822;Gone@chu-test.fr"
    assert recipient["Action"] == "failed"
    assert recipient["Status"] == "5.1.1"
    assert "No such user" in recipient["Diagnostic-Code"]
    # RET=HDRS: the original's headers come back, never its body.
    assert b"Bonjour." not in body


async def test_give_up_sends_dsn(world_factory: Callable[..., World]) -> None:
    world = world_factory(retry="[1s]", give_up="2s")
    async with start(world) as running:
        await world.sinks["hospital"].stop()  # the next hop is down for good
        data = message("a@clinique-test.fr", "b@chu-test.fr")
        await running.send("a@clinique-test.fr", ["b@chu-test.fr"], data)
        [dsn] = await world.sinks["clinic"].wait(timeout=30)
        [_, recipient] = delivery_status(split_trace(dsn.data)[1])
        assert recipient["Action"] == "failed"
        assert recipient["Status"] == "5.4.7"


async def test_notify_never_means_no_dsn(running: Running) -> None:
    world = running.world
    world.sinks["hospital"].handler.rcpt_replies = {"gone@chu-test.fr": "550 5.1.1 No such user"}
    data = message("a@clinique-test.fr", "gone@chu-test.fr")
    await running.send("a@clinique-test.fr", ["gone@chu-test.fr"], data,
                       rcpt_options=["NOTIFY=NEVER"])
    await asyncio.sleep(2)
    assert world.sinks["clinic"].messages == []


async def test_null_sender_never_gets_a_dsn(running: Running) -> None:
    world = running.world
    world.sinks["hospital"].handler.rcpt_replies = {"gone@chu-test.fr": "550 5.1.1 No such user"}
    await running.send("", ["gone@chu-test.fr"], message("x@clinique-test.fr", "gone@chu-test.fr"))
    await asyncio.sleep(2)
    assert world.sinks["clinic"].messages == []
    assert list(running.gateway.spool.entries()) == []


async def test_connections_per_peer_limit(world_factory: Callable[..., World]) -> None:
    def limited(text: str) -> str:
        return text.replace("    adapter: mime\n",
                            "    adapter: mime\n    limits: {connections_per_peer: 2}\n")

    world = world_factory(edit=limited)
    async with start(world):
        held = []
        for _ in range(2):
            reader, writer = await asyncio.open_connection("127.0.0.1", world.port)
            assert (await reader.readline()).startswith(b"220")
            held.append(writer)
        reader, writer = await asyncio.open_connection("127.0.0.1", world.port)
        lines = (await asyncio.wait_for(reader.read(4096), 10)).decode()
        assert "421 4.7.0" in lines
        writer.close()
        held.pop().close()
        await asyncio.sleep(0.2)
        reader, writer = await asyncio.open_connection("127.0.0.1", world.port)
        assert (await reader.readline()).startswith(b"220")  # a slot is free again
        writer.close()
        for other in held:
            other.close()
