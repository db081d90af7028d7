"""Security regressions, one named test per attack (issue 5), against the real relay: SMTP and
TLS on 127.0.0.1, the e2e worlds of tests/support/world.py.

Each test states the attack in its name and what must hold: nothing reaches a next hop that
should not, the peer gets a refusal, and the gateway keeps serving.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiosmtplib
import pytest
from cryptography import x509

from tests.e2e.conftest import Running, start
from tests.e2e.test_mssante import mail_from
from tests.e2e.test_relay import raw_session, split_trace
from tests.support.world import MssanteWorld, Sink, World, build_mssante_world, message

pytestmark = pytest.mark.e2e


@pytest.fixture
async def mss(tmp_path: Path) -> AsyncIterator[Running]:
    async with start(build_mssante_world(tmp_path / "mss")) as running:
        yield running


def trust_space(running: Running) -> MssanteWorld:
    assert isinstance(running.world, MssanteWorld)
    return running.world


# -- relaying ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("recipient", "code"), [
    ("<victim%evil.example@chu-test.fr>", "553 5.1.3"),  # percent hack
    ("<evil.example!victim@chu-test.fr>", "553 5.1.3"),  # bang path
    ('<"victim@evil.example"@chu-test.fr>', "553 5.1.3"),  # quoted @
    ("<@chu-test.fr:victim@evil.example>", "550 5.1.2"),  # source route
    ("<victim@evil.example>", "550 5.1.2"),
    ("<victim@chu-test.fr.evil.example>", "550 5.1.2"),
    ("<victim@[192.0.2.1]>", "550 5.1.2"),  # address literal
    ("<victim@labo-test.fr>", "550 5.7.1"),  # a known network, no route to it
])
async def test_open_relay_tricks(running: Running, recipient: str, code: str) -> None:
    lines = await raw_session(
        running.world, f"MAIL FROM:<a@clinique-test.fr>\r\nRCPT TO:{recipient}\r\nQUIT\r\n".encode()
    )
    assert lines[1].startswith(code), lines
    for sink in running.world.sinks.values():
        assert sink.messages == []


@pytest.mark.parametrize("separator", [b"\n.\n", b"\r.\r", b"\n.\r\n", b"\r\n.\n", b"\r.\r\n"],
                         ids=["LF.LF", "CR.CR", "LF.CRLF", "CRLF.LF", "CR.CRLF"])
async def test_smtp_smuggling_with_pipelining(running: Running, separator: bytes) -> None:
    world = running.world
    smuggled = (b"MAIL FROM:<a@clinique-test.fr>\r\nRCPT TO:<victim@chu-test.fr>\r\nDATA\r\n"
                b"From: <director@clinique-test.fr>\r\nSubject: smuggled\r\n\r\nforged\r\n")
    payload = (b"MAIL FROM:<a@clinique-test.fr>\r\nRCPT TO:<b@chu-test.fr>\r\nDATA\r\n"
               b"Subject: legit\r\n\r\nhello" + separator + smuggled + b".\r\nQUIT\r\n")
    lines = await raw_session(world, payload)
    assert not any(line.startswith("250 2.0.0") for line in lines), lines
    await asyncio.sleep(0.5)
    assert world.sinks["hospital"].messages == []


async def test_starttls_command_injection_is_discarded(running: Running) -> None:
    """Commands pipelined behind STARTTLS in clear text must not run inside the TLS session
    (CVE-2011-0411 class)."""
    world = running.world
    reader, writer = await asyncio.open_connection("127.0.0.1", world.port)

    async def reply() -> list[str]:
        lines = []
        while True:
            line = (await asyncio.wait_for(reader.readline(), 10)).decode()
            lines.append(line.rstrip("\r\n"))
            if len(line) < 4 or line[3] != "-":
                return lines

    await reply()
    writer.write(b"EHLO attacker.test\r\n")
    await reply()
    writer.write(b"STARTTLS\r\nMAIL FROM:<a@clinique-test.fr>\r\nRCPT TO:<b@chu-test.fr>\r\n")
    await writer.drain()
    assert (await reply())[0].startswith("220")
    await writer.start_tls(world.client_context(None))
    writer.write(b"EHLO attacker.test\r\n")
    await reply()
    # Had the injected MAIL/RCPT survived, DATA would be accepted now.
    writer.write(b"DATA\r\n")
    answer = (await reply())[0]
    assert answer.startswith("503"), answer
    writer.close()


async def test_tls_downgrade_required_relay_never_sends_in_clear(
    world_factory: Callable[..., World],
) -> None:
    world = world_factory()
    # The hospital's next hop (tls: required) is replaced by one that stopped offering STARTTLS.
    port = world.sinks["hospital"].port
    stripped = Sink("hospital", None, port=port)
    world.sinks["hospital"] = stripped
    async with start(world) as running:
        await running.send("a@clinique-test.fr", ["b@chu-test.fr"],
                           message("a@clinique-test.fr", "b@chu-test.fr"))
        await asyncio.sleep(3)  # a few delivery attempts
        assert stripped.handler.connections >= 1
        assert stripped.messages == []
        entries = list(running.gateway.spool.entries())
        assert entries and all(e.location in ("active", "deferred") for e in entries)


# -- peer authentication ----------------------------------------------------------------------


async def test_client_certificate_from_untrusted_ca(mss: Running) -> None:
    world = trust_space(mss)
    reply = await mail_from(world, world.operators["untrusted"], "dr@a.mssante-test.fr")
    assert reply == "handshake refused" or reply.startswith("550 5.7.1"), reply


async def test_expired_client_certificate(mss: Running) -> None:
    world = trust_space(mss)
    reply = await mail_from(world, world.operators["expired"], "dr@a.mssante-test.fr")
    assert reply == "handshake refused" or reply.startswith("550 5.7.1"), reply


async def test_revoked_client_certificate(mss: Running) -> None:
    world = trust_space(mss)
    reply = await mail_from(world, world.operators["revoked"], "dr@a.mssante-test.fr")
    assert reply.startswith("550 5.7.1"), reply


async def test_valid_certificate_not_whitelisted_for_the_claimed_domain(mss: Running) -> None:
    world = trust_space(mss)
    assert (await mail_from(world, world.operators["unlisted"], "dr@a.mssante-test.fr")
            ).startswith("550 5.7.1")
    # Listed, but for b.mssante-test.fr only.
    assert (await mail_from(world, world.operators["nosan"], "dr@a.mssante-test.fr")
            ).startswith("550 5.7.1")


async def test_dn_vs_cn_confusion(mss: Running) -> None:
    """Same CN as a listed operator, different OU and O: not that operator."""
    world = trust_space(mss)
    twin, listed = (world.operators[r].certificate.subject for r in ("cn_twin", "listed"))
    common_name = x509.NameOID.COMMON_NAME
    assert twin.get_attributes_for_oid(common_name) == listed.get_attributes_for_oid(common_name)
    assert (await mail_from(world, world.operators["cn_twin"], "dr@a.mssante-test.fr")
            ).startswith("550 5.7.1")


async def test_whitelist_dn_spoofing_by_rdn_order(mss: Running) -> None:
    """The listed operator's attributes in reverse RDN order: another name (RFC 4514/4518)."""
    world = trust_space(mss)
    assert (await mail_from(world, world.operators["reordered"], "dr@a.mssante-test.fr")
            ).startswith("550 5.7.1")


async def test_whitelist_dn_case_and_spaces_follow_rfc4518(mss: Running) -> None:
    """The list spells the listed operator's DN in another case with extra spaces: RFC 4518
    caseIgnoreMatch makes it the same name, so the genuine operator is not locked out."""
    world = trust_space(mss)
    assert (await mail_from(world, world.operators["listed"], "dr@a.mssante-test.fr")
            ).startswith("250")


async def test_unauthenticated_peer(running: Running) -> None:
    world = running.world
    lines = await raw_session(world, b"MAIL FROM:<a@chu-test.fr>\r\nQUIT\r\n")
    assert lines[0].startswith("550 5.7.1")


async def test_mail_from_of_another_networks_domain(mss: Running) -> None:
    world = trust_space(mss)
    # A listed MSSanté operator (from an address the clinic does not trust) may not speak for
    # the clinic...
    assert (await mail_from(world, world.operators["listed"], "x@clinique-test.fr",
                            source="127.0.0.2")).startswith("550 5.7.1")
    # ...and the clinic's address does not make it an MSSanté operator.
    assert (await mail_from(world, None, "x@a.mssante-test.fr")).startswith("550 5.7.1")


# -- content ----------------------------------------------------------------------------------


async def test_forged_authentication_results(running: Running) -> None:
    world = running.world
    forged = (
        "Authentication-Results: passerelle.test; smime=pass header.from=ceo@chu-test.fr\r\n"
        "Authentication-Results: PASSERELLE.TEST;\r\n\tx-openpgp=pass\r\n"
        "Authentication-Results: mx.clinique-test.fr; spf=pass\r\n"
    )
    data = message("a@clinique-test.fr", "b@chu-test.fr", extra=forged)
    await running.send("a@clinique-test.fr", ["b@chu-test.fr"], data)
    [got] = await world.sinks["hospital"].wait()
    results = [line for line in got.data.split(b"\r\n\r\n")[0].split(b"\r\n")
               if line.lower().startswith(b"authentication-results:")]
    assert results == [b"Authentication-Results: passerelle.test; none",
                       b"Authentication-Results: mx.clinique-test.fr; spf=pass"]
    assert b"pass header.from=ceo" not in got.data and b"x-openpgp=pass" not in got.data


async def test_oversize_message_refused_at_size_and_during_data(running: Running) -> None:
    world = running.world
    smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=world.port, start_tls=True,
                           tls_context=world.client_context(None), timeout=20)
    await smtp.connect()
    with pytest.raises(aiosmtplib.SMTPSenderRefused) as at_size:
        await smtp.mail("a@clinique-test.fr", options=["SIZE=2000000000"])
    assert at_size.value.code == 552
    await smtp.rset()
    await smtp.mail("a@clinique-test.fr")  # no SIZE: the limit holds during DATA
    await smtp.rcpt("b@chu-test.fr")
    huge = message("a@clinique-test.fr", "b@chu-test.fr", body=("y" * 990 + "\r\n") * 4000)
    with pytest.raises(aiosmtplib.SMTPDataError) as during:
        await smtp.data(huge)
    assert during.value.code == 552
    await smtp.quit()
    assert world.sinks["hospital"].messages == []


async def test_line_length_bomb(running: Running) -> None:
    lines = await raw_session(
        running.world,
        b"MAIL FROM:<a@clinique-test.fr>\r\nRCPT TO:<b@chu-test.fr>\r\nDATA\r\n"
        b"Subject: x\r\n\r\n" + b"z" * 200_000 + b"\r\n.\r\nQUIT\r\n",
    )
    assert any(line.startswith(("500 5.5.2", "552")) for line in lines), lines
    assert running.world.sinks["hospital"].messages == []


async def test_header_bomb(running: Running) -> None:
    """Tens of thousands of header fields, within the size limit: handled in bounded time,
    either delivered intact or refused, and the gateway keeps serving."""
    world = running.world
    headers = "".join(f"X-Bomb-{i}: {'h' * 10}\r\n" for i in range(30_000))
    bomb = message("a@clinique-test.fr", "b@chu-test.fr", extra=headers)
    try:
        await asyncio.wait_for(running.send("a@clinique-test.fr", ["b@chu-test.fr"], bomb), 30)
        [got] = await world.sinks["hospital"].wait(timeout=30)
        assert split_trace(got.data)[1] == bomb
    except aiosmtplib.SMTPResponseException as refused:
        assert 500 <= refused.code < 600
    ok = message("a@clinique-test.fr", "c@chu-test.fr")
    await running.send("a@clinique-test.fr", ["c@chu-test.fr"], ok)


async def test_peer_opening_500_connections_is_limited_and_others_are_served(
    running: Running,
) -> None:
    world = running.world
    opened: list[asyncio.StreamWriter] = []
    refused = 0
    try:
        for _ in range(500):
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", world.port)
                opened.append(writer)
                greeting = await asyncio.wait_for(reader.readline(), 5)
                if not greeting.startswith(b"220"):
                    refused += 1
            except (OSError, TimeoutError):
                refused += 1
        assert refused >= 500 - 20  # limits.connections_per_peer defaults to 20
        # While the flood holds its connections, another peer is greeted normally.
        reader, writer = await asyncio.open_connection("127.0.0.1", world.port,
                                                       local_addr=("127.0.0.2", 0))
        assert (await asyncio.wait_for(reader.readline(), 5)).startswith(b"220")
        writer.close()
    finally:
        for writer in opened:
            writer.close()
