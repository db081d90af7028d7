"""Attacks on the accept stage's SMTP session, one named test per attack, against the real relay
(SMTP and TLS on 127.0.0.1, the e2e world of tests/support/world.py: max_message_size 1 MiB,
the clinic peers by address 127.0.0.1 and may send to the hospital, chu-test.fr).

What must hold in each: the peer gets a clear refusal with an enhanced status code (never
aiosmtpd's generic 500, never a hang), nothing reaches a next hop that should not, memory stays
bounded whatever the peer sends, and the gateway keeps serving. The DATA reader is also checked
on its own (sans-I/O), with every way of cutting the stream into chunks.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ssl
import tracemalloc
from collections.abc import AsyncIterator
from typing import Any

import aiosmtplib
import pytest

import gateway.inbound
from gateway.errors import TemporaryFailure
from gateway.inbound import DataReader
from tests.e2e.conftest import Running
from tests.e2e.test_relay import raw_session, split_trace
from tests.support.world import World, message

pytestmark = pytest.mark.e2e

LIMIT = 1024 * 1024  # max_message_size of the test world
SENDER, RECIPIENT = "a@clinique-test.fr", "b@chu-test.fr"
TRANSACTION = b"MAIL FROM:<a@clinique-test.fr>\r\nRCPT TO:<b@chu-test.fr>\r\nDATA\r\n"


class Session:
    """One SMTP session driven by hand, after STARTTLS and EHLO."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, world: World, *, tls: bool = True,
                   source: str | None = None) -> Session:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", world.port, local_addr=(source, 0) if source else None)
        session = cls(reader, writer)
        await session.reply()
        if tls:
            await session.command(b"EHLO client.test")
            assert (await session.command(b"STARTTLS"))[0].startswith("220")
            await writer.start_tls(world.client_context(None))
            await session.command(b"EHLO client.test")
        return session

    async def reply(self) -> list[str]:
        lines = []
        while True:
            line = (await asyncio.wait_for(self.reader.readline(), 20)).decode()
            if not line:
                raise ConnectionError("connection closed")
            lines.append(line.rstrip("\r\n"))
            if len(line) < 4 or line[3] != "-":
                return lines

    async def command(self, line: bytes) -> list[str]:
        await self.send(line + b"\r\n")
        return await self.reply()

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def close(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except (OSError, ssl.SSLError):
            pass


@pytest.fixture
async def session(running: Running) -> AsyncIterator[Session]:
    opened = await Session.open(running.world)
    yield opened
    await opened.close()


async def nothing_delivered(running: Running) -> None:
    await asyncio.sleep(0.5)  # let a wrongly queued message reach its next hop
    for sink in running.world.sinks.values():
        assert sink.messages == [], sink.name


async def still_serving(running: Running, subject: str = "still serving") -> None:
    sink = running.world.sinks["hospital"]
    count = len(sink.messages)
    data = message(SENDER, "ok@chu-test.fr", subject=subject)
    await running.send(SENDER, ["ok@chu-test.fr"], data)
    while not any(m.recipients == ["ok@chu-test.fr"] for m in sink.messages):
        count += 1
        await sink.wait(count)


# -- the DATA reader on its own -------------------------------------------------------------


def read_all(chunks: list[bytes], limit: int = LIMIT) -> tuple[DataReader, bytes]:
    """Feed `chunks`; returns the reader and what was left after <CRLF>.<CRLF>."""
    reader = DataReader(limit)
    for index, chunk in enumerate(chunks):
        end = reader.feed(chunk)
        if end is not None:
            return reader, chunk[end:] + b"".join(chunks[index + 1:])
    raise AssertionError("no end of DATA found")


STUFFED = (b"Subject: dots\r\n\r\n..leading dot\r\n...two\r\n..\r\nmid.dle\r\nend.\r\n"
           + b"x" * 998 + b"\r\n\r\n")
UNSTUFFED = (b"Subject: dots\r\n\r\n.leading dot\r\n..two\r\n.\r\nmid.dle\r\nend.\r\n"
             + b"x" * 998 + b"\r\n\r\n")


def test_data_reader_undoes_dot_stuffing_whatever_the_chunking() -> None:
    stream = STUFFED + b".\r\nQUIT\r\n"
    for cut in range(1, len(stream)):
        reader, rest = read_all([stream[:cut], stream[cut:]])
        assert reader.error is None, cut
        assert reader.content() == UNSTUFFED, cut
        assert rest == b"QUIT\r\n", cut
    reader, rest = read_all([bytes([b]) for b in stream])
    assert (reader.content(), rest) == (UNSTUFFED, b"QUIT\r\n")


def test_data_reader_empty_message_ends_at_the_first_lone_dot() -> None:
    reader, rest = read_all([b".\r\nMAIL FROM:<x@y>\r\n"])
    assert (reader.error, reader.content(), rest) == (None, b"", b"MAIL FROM:<x@y>\r\n")
    reader, rest = read_all([b".", b"\r", b"\n"])
    assert (reader.content(), rest) == (b"", b"")


@pytest.mark.parametrize("separator", [
    b"\n.\n", b"\r.\r", b"\n.\r\n", b"\r\n.\n", b"\r\n.\r", b"\r.\r\n", b"\n.\r",
    b"\r\n\x00.\r\n", b"\r\n.\x00\r\n",
], ids=["LF.LF", "CR.CR", "LF.CRLF", "CRLF.LF", "CRLF.CR", "CR.CRLF", "LF.CR", "CRLF-NUL.CRLF",
        "CRLF.NUL-CRLF"])
def test_data_reader_only_crlf_dot_crlf_ends_data(separator: bytes) -> None:
    smuggled = b"hello" + separator + b"MAIL FROM:<x@y>\r\n"
    stream = smuggled + b"forged\r\n.\r\nQUIT\r\n"
    for cut in range(1, len(stream)):
        reader, rest = read_all([stream[:cut], stream[cut:]])
        assert rest == b"QUIT\r\n", (cut, rest)
        assert reader.error is not None and reader.error.smtp_reply.startswith("550 5.6.0")


def test_data_reader_keeps_memory_bounded_when_over_the_limit() -> None:
    reader = DataReader(1000)
    block = b"y" * 500 + b"\r\n"
    for _ in range(10_000):
        assert reader.feed(block) is None
    assert reader.error is not None and reader.error.smtp_reply.startswith("552 5.3.4")
    assert reader.buffered() <= 1000 + 1002  # the limit plus one unfinished line
    no_line_end = DataReader(1000)
    for _ in range(10_000):
        assert no_line_end.feed(b"z" * 4096) is None
    assert no_line_end.buffered() <= 8
    assert no_line_end.feed(b"\r\n.\r\n") == 5
    assert no_line_end.error is not None
    assert no_line_end.error.smtp_reply.startswith("500 5.5.2")


# -- oversize and bombs, without reading everything into memory ------------------------------


async def test_oversize_data_is_discarded_as_it_arrives(running: Running,
                                                        session: Session) -> None:
    """Many lines past the size limit: 552 after the terminator, and the gateway never holds
    much more than the limit in memory."""
    assert (await session.command(b"MAIL FROM:<a@clinique-test.fr>"))[0][:3] == "250"
    assert (await session.command(b"RCPT TO:<b@chu-test.fr>"))[0][:3] == "250"
    assert (await session.command(b"DATA"))[0][:3] == "354"
    block = (b"y" * 998 + b"\r\n") * 64
    tracemalloc.start()
    try:
        for _ in range(4 * LIMIT // len(block)):  # within the discard budget
            await session.send(block)
        await session.send(b".\r\n")
        reply = await session.reply()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert reply[0].startswith("552 5.3.4"), reply
    assert peak < 3 * LIMIT, peak
    assert (await session.command(b"NOOP"))[0].startswith("250")
    await nothing_delivered(running)


async def test_gigabyte_line_without_line_end_is_not_buffered(running: Running,
                                                              session: Session) -> None:
    await session.command(b"MAIL FROM:<a@clinique-test.fr>")
    await session.command(b"RCPT TO:<b@chu-test.fr>")
    assert (await session.command(b"DATA"))[0][:3] == "354"
    block = b"z" * 65536
    tracemalloc.start()
    try:
        for _ in range(4 * LIMIT // len(block)):  # within the discard budget
            await session.send(block)
        await session.send(b"\r\n.\r\n")
        reply = await session.reply()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert reply[0].startswith("500 5.5.2"), reply
    assert peak < 2 * LIMIT, peak
    await nothing_delivered(running)
    await still_serving(running)


async def test_data_that_never_ends_is_cut_after_a_bounded_amount(running: Running,
                                                                   session: Session) -> None:
    await session.command(b"MAIL FROM:<a@clinique-test.fr>")
    await session.command(b"RCPT TO:<b@chu-test.fr>")
    assert (await session.command(b"DATA"))[0][:3] == "354"
    block = (b"w" * 998 + b"\r\n") * 64
    sent = 0
    closed = False
    try:
        while sent < 64 * LIMIT:
            await session.send(block)
            sent += len(block)
            if session.reader.at_eof():
                break
    except (ConnectionError, ssl.SSLError):
        closed = True
    if not closed:
        try:
            lines = await session.reply()
            assert lines[0].startswith("421 4.3.4"), lines
            await session.reply()
        except (ConnectionError, ssl.SSLError, asyncio.IncompleteReadError):
            closed = True
    assert closed or session.reader.at_eof()
    assert sent < 64 * LIMIT
    await nothing_delivered(running)
    await still_serving(running)


async def test_folded_header_bomb(running: Running) -> None:
    """One Message-ID header folded over tens of thousands of lines, within the size limit."""
    world = running.world
    folded = "Message-ID: <bomb" + "\r\n\t x" * 60_000 + "@test>\r\n"
    bomb = message(SENDER, RECIPIENT, extra=folded).replace(b"Message-ID: <", b"X-Old-Id: <", 1)
    try:
        await asyncio.wait_for(running.send(SENDER, [RECIPIENT], bomb), 60)
        [got] = await world.sinks["hospital"].wait(timeout=60)
        assert split_trace(got.data)[1] == bomb
    except aiosmtplib.SMTPResponseException as refused:
        assert 500 <= refused.code < 600
    await still_serving(running)


async def test_large_message_with_dots_arrives_byte_for_byte(running: Running) -> None:
    body = "".join(f".{i}\r\n..{i}\r\n{'b' * 990}.\r\n" for i in range(800))
    data = message(SENDER, RECIPIENT, body=body)
    assert 512 * 1024 < len(data) < LIMIT
    await running.send(SENDER, [RECIPIENT], data)
    [got] = await running.world.sinks["hospital"].wait(timeout=30)
    assert split_trace(got.data)[1] == data


# -- SMTP smuggling ---------------------------------------------------------------------------


SEPARATORS = [b"\n.\n", b"\r.\r", b"\n.\r\n", b"\r\n.\n", b"\r\n.\r", b"\r.\r\n",
              b"\r\n\x00.\r\n", b"\r\n.\x00\r\n"]
SEPARATOR_IDS = ["LF.LF", "CR.CR", "LF.CRLF", "CRLF.LF", "CRLF.CR", "CR.CRLF", "CRLF-NUL.CRLF",
                 "CRLF.NUL-CRLF"]
SMUGGLED = (b"MAIL FROM:<a@clinique-test.fr>\r\nRCPT TO:<victim@chu-test.fr>\r\nDATA\r\n"
            b"From: <director@clinique-test.fr>\r\nSubject: smuggled\r\n\r\nforged\r\n")


@pytest.mark.parametrize("separator", SEPARATORS, ids=SEPARATOR_IDS)
async def test_smtp_smuggling_pipelined_in_one_packet(running: Running,
                                                      separator: bytes) -> None:
    payload = (TRANSACTION + b"Subject: legit\r\n\r\nhello" + separator + SMUGGLED
               + b".\r\nQUIT\r\n")
    lines = await raw_session(running.world, payload)
    assert lines[3].startswith("550 5.6.0"), lines
    assert lines[4:] == ["221 2.0.0 Bye"], lines
    await nothing_delivered(running)


@pytest.mark.parametrize("separator", SEPARATORS, ids=SEPARATOR_IDS)
async def test_smtp_smuggling_without_pipelining(running: Running, session: Session,
                                                 separator: bytes) -> None:
    """Each piece sent on its own, waiting between them as a non-pipelining client would:
    the smuggled commands get no reply, they are part of the refused message."""
    assert (await session.command(b"MAIL FROM:<a@clinique-test.fr>"))[0].startswith("250")
    assert (await session.command(b"RCPT TO:<b@chu-test.fr>"))[0].startswith("250")
    assert (await session.command(b"DATA"))[0].startswith("354")
    await session.send(b"Subject: legit\r\n\r\nhello" + separator)
    for line in SMUGGLED.split(b"\r\n")[:3]:
        await session.send(line + b"\r\n")
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(session.reader.readline(), 0.2)
    await session.send(SMUGGLED.split(b"DATA\r\n", 1)[1] + b".\r\n")
    assert (await session.reply())[0].startswith("550 5.6.0")
    assert (await session.command(b"RCPT TO:<b@chu-test.fr>"))[0].startswith("503 5.5.1")
    await nothing_delivered(running)


async def test_nul_in_message_is_refused(running: Running) -> None:
    """A next hop that drops NULs would read `<CRLF>\\0.<CRLF>` as the end of DATA."""
    lines = await raw_session(running.world,
                              TRANSACTION + b"Subject: x\r\n\r\na\x00b\r\n.\r\nQUIT\r\n")
    assert lines[3].startswith("550 5.6.0"), lines
    await nothing_delivered(running)


async def test_bdat_is_neither_advertised_nor_accepted(running: Running) -> None:
    world = running.world
    reader, writer = await asyncio.open_connection("127.0.0.1", world.port)
    session = Session(reader, writer)
    await session.reply()
    await session.command(b"EHLO client.test")
    await session.command(b"STARTTLS")
    await writer.start_tls(world.client_context(None))
    ehlo = await session.command(b"EHLO client.test")
    assert not any("CHUNKING" in line.upper() or "BINARYMIME" in line.upper() for line in ehlo)
    assert (await session.command(b"MAIL FROM:<a@clinique-test.fr>"))[0].startswith("250")
    assert (await session.command(b"RCPT TO:<b@chu-test.fr>"))[0].startswith("250")
    chunk = b"Subject: bdat\r\n\r\nhello\r\n"
    reply = await session.command(b"BDAT %d LAST" % len(chunk))
    assert reply[0][:1] == "5" and not reply[0].startswith("250"), reply
    await session.close()
    await nothing_delivered(running)


async def test_pipelined_transactions_after_the_terminator_are_kept(running: Running) -> None:
    """Commands pipelined behind <CRLF>.<CRLF> in the same packet run as commands."""
    first = message(SENDER, RECIPIENT, subject="first")
    second = message(SENDER, "c@chu-test.fr", subject="second")
    payload = (TRANSACTION + first + b".\r\nMAIL FROM:<a@clinique-test.fr>\r\n"
               b"RCPT TO:<c@chu-test.fr>\r\nDATA\r\n" + second + b".\r\nQUIT\r\n")
    lines = await raw_session(running.world, payload)
    assert [line[:9] for line in lines] == ["250 2.1.0", "250 2.1.5", "354 End d", "250 2.0.0",
                                            "250 2.1.0", "250 2.1.5", "354 End d", "250 2.0.0",
                                            "221 2.0.0"], lines
    got = await running.world.sinks["hospital"].wait(2)
    assert sorted(split_trace(m.data)[1] for m in got) == sorted([first, second])


# -- the transaction ends with DATA, RSET, EHLO and STARTTLS ------------------------------------


async def test_rcpt_after_completed_data_needs_a_new_mail_from(running: Running,
                                                               session: Session) -> None:
    await session.command(b"MAIL FROM:<a@clinique-test.fr>")
    await session.command(b"RCPT TO:<b@chu-test.fr>")
    await session.command(b"DATA")
    await session.send(message(SENDER, RECIPIENT) + b".\r\n")
    assert (await session.reply())[0].startswith("250 2.0.0")
    assert (await session.command(b"RCPT TO:<c@chu-test.fr>"))[0].startswith("503 5.5.1")
    assert (await session.command(b"DATA"))[0].startswith("503 5.5.1")
    [got] = await running.world.sinks["hospital"].wait()
    await asyncio.sleep(0.5)
    assert [m.recipients for m in running.world.sinks["hospital"].messages] == [[RECIPIENT]]
    assert got.recipients == [RECIPIENT]


async def test_rcpt_after_refused_data_needs_a_new_mail_from(running: Running,
                                                             session: Session) -> None:
    await session.command(b"MAIL FROM:<a@clinique-test.fr>")
    await session.command(b"RCPT TO:<b@chu-test.fr>")
    await session.command(b"DATA")
    await session.send(b"Subject: x\r\n\r\nbare\nline\r\n.\r\n")
    assert (await session.reply())[0].startswith("550 5.6.0")
    assert (await session.command(b"RCPT TO:<c@chu-test.fr>"))[0].startswith("503 5.5.1")
    assert (await session.command(b"DATA"))[0].startswith("503 5.5.1")
    await nothing_delivered(running)


@pytest.mark.parametrize("reset", [b"RSET", b"EHLO client.test", b"HELO client.test"])
async def test_rcpt_after_reset_needs_a_new_mail_from(running: Running, session: Session,
                                                      reset: bytes) -> None:
    await session.command(b"MAIL FROM:<a@clinique-test.fr>")
    await session.command(b"RCPT TO:<b@chu-test.fr>")
    assert (await session.command(reset))[-1].startswith("250")
    assert (await session.command(b"RCPT TO:<c@chu-test.fr>"))[0].startswith("503 5.5.1")
    assert (await session.command(b"DATA"))[0].startswith("503 5.5.1")
    await nothing_delivered(running)


async def test_starttls_injection_of_a_whole_transaction_is_discarded(running: Running) -> None:
    """MAIL, RCPT and DATA pipelined behind STARTTLS in clear text never run: after the
    handshake there is no transaction, and no reply to the injected commands arrives."""
    world = running.world
    reader, writer = await asyncio.open_connection("127.0.0.1", world.port)
    session = Session(reader, writer)
    await session.reply()
    await session.command(b"EHLO attacker.test")
    await session.send(b"STARTTLS\r\nRSET\r\nEHLO x\r\nMAIL FROM:<a@clinique-test.fr>\r\n"
                       b"RCPT TO:<b@chu-test.fr>\r\nDATA\r\nSubject: injected\r\n\r\nx\r\n.\r\n")
    assert (await session.reply())[0].startswith("220")
    await writer.start_tls(world.client_context(None))
    assert (await session.command(b"NOOP"))[0].startswith("250")  # the first reply is ours
    assert (await session.command(b"EHLO attacker.test"))[-1].startswith("250")
    assert (await session.command(b"RCPT TO:<b@chu-test.fr>"))[0].startswith("503 5.5.1")
    reply = await session.command(b"STARTTLS")  # a second handshake is refused
    assert reply[0][:1] in ("4", "5"), reply
    assert (await session.command(b"NOOP"))[0].startswith("250")
    await session.close()
    await nothing_delivered(running)


# -- open relay ---------------------------------------------------------------------------------


@pytest.mark.parametrize("recipient", [
    "<victim%evil.example@CHU-TEST.FR>",
    "<victim@evil.example@chu-test.fr>",
    "<victim@chu-test.fr@evil.example>",
    "<victim@evil.example>,<b@chu-test.fr>",
    "victim@evil.example",
    "<victim@[IPv6:::1]>",
    "<victim@chu-test.fr\x00.evil.example>",
    "<victim@chu-test.fr.>evil.example",
    "<postmaster@passerelle.test>",
    "<victim@xn--chu-tst-fya.fr>",
])
async def test_open_relay_recipient_tricks(running: Running, recipient: str) -> None:
    lines = await raw_session(
        running.world,
        f"MAIL FROM:<a@clinique-test.fr>\r\nRCPT TO:{recipient}\r\nDATA\r\n".encode()
        + b"Subject: relay\r\n\r\nx\r\n.\r\nQUIT\r\n",
    )
    assert lines[0].startswith("250"), lines
    assert lines[1][:1] == "5" and lines[1][4:5] == "5", lines
    assert not any(line.startswith("250 2.0.0") for line in lines), lines
    await nothing_delivered(running)


async def test_relay_from_a_peer_without_a_route(running: Running) -> None:
    """127.0.0.2 is the lab's peer; nothing routes from the lab, so it relays nowhere."""
    session = await Session.open(running.world, source="127.0.0.2")
    try:
        assert (await session.command(b"MAIL FROM:<x@labo-test.fr>"))[0].startswith("250")
        reply = await session.command(b"RCPT TO:<b@chu-test.fr>")
        assert reply[0].startswith("550 5.7.1"), reply
        assert (await session.command(b"DATA"))[0].startswith("503 5.5.1")
    finally:
        await session.close()
    await nothing_delivered(running)


async def test_null_sender_from_a_peer_of_no_network(running: Running) -> None:
    session = await Session.open(running.world, source="127.0.0.3")
    try:
        assert (await session.command(b"MAIL FROM:<>"))[0].startswith("550 5.7.1")
        assert (await session.command(b"RCPT TO:<b@chu-test.fr>"))[0].startswith("503 5.5.1")
    finally:
        await session.close()
    await nothing_delivered(running)


# -- connection floods ------------------------------------------------------------------------


async def test_connection_over_the_per_peer_limit_gets_only_421(running: Running) -> None:
    world = running.world
    held: list[asyncio.StreamWriter] = []
    try:
        for _ in range(20):  # limits.connections_per_peer defaults to 20
            reader, writer = await asyncio.open_connection("127.0.0.1", world.port)
            held.append(writer)
            assert (await asyncio.wait_for(reader.readline(), 10)).startswith(b"220")
        reader, writer = await asyncio.open_connection("127.0.0.1", world.port)
        held.append(writer)
        answer = await asyncio.wait_for(reader.read(), 10)  # everything until the close
        assert answer == (b"421 4.7.0 Too many connections from your address, "
                          b"try again later\r\n"), answer
    finally:
        for writer in held:
            writer.close()
    # The flood is over: the same peer is served again.
    for _ in range(50):
        if len(running.gateway.inbound.sessions) == 0:
            break
        await asyncio.sleep(0.1)
    await still_serving(running)


# -- failures inside the gateway: a clear 4xx, never a 500 or a 250 without its audit record ---


def failing_audit(running: Running, monkeypatch: pytest.MonkeyPatch, *events: str) -> None:
    """The audit trail's disk is full for `events` (all events when none is named)."""
    audit = running.gateway.audit
    original = audit.record

    def record(event: str, **fields: Any) -> dict[str, Any]:
        if not events or event in events:
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(event, **fields)

    monkeypatch.setattr(audit, "record", record)


async def test_audit_failure_after_spooling_answers_451_and_withdraws(
    running: Running, monkeypatch: pytest.MonkeyPatch,
) -> None:
    failing_audit(running, monkeypatch, "received")
    data = message(SENDER, RECIPIENT, subject="unrecorded")
    with pytest.raises(aiosmtplib.SMTPDataError) as refused:
        await running.send(SENDER, [RECIPIENT], data)
    assert refused.value.code == 451 and refused.value.message.startswith("4.3.0")
    assert "try again" in refused.value.message
    assert list(running.gateway.spool.entries()) == []
    await nothing_delivered(running)
    monkeypatch.undo()
    again = message(SENDER, RECIPIENT, subject="recorded")
    await running.send(SENDER, [RECIPIENT], again)
    [got] = await running.world.sinks["hospital"].wait()
    assert split_trace(got.data)[1] == again


async def test_audit_and_withdrawal_failing_still_answers_451_and_sends_nothing(
    running: Running, monkeypatch: pytest.MonkeyPatch,
) -> None:
    failing_audit(running, monkeypatch, "received")

    async def withdraw(queue_id: str) -> None:
        raise TemporaryFailure("Requested action aborted: local storage problem, try again later")

    monkeypatch.setattr(running.gateway.spool, "withdraw", withdraw)
    with pytest.raises(aiosmtplib.SMTPDataError) as refused:
        await running.send(SENDER, [RECIPIENT], message(SENDER, RECIPIENT))
    assert refused.value.code == 451 and refused.value.message.startswith("4.3.0")
    await nothing_delivered(running)
    # The copy the disk would not give back waits in active/, unscheduled, for the next start:
    # at worst a duplicate of the peer's retry, never a loss.
    assert [entry.location for entry in running.gateway.spool.entries()] == ["active"]


async def test_audit_fsync_failure_before_250_answers_451_and_withdraws(
    running: Running, monkeypatch: pytest.MonkeyPatch,
) -> None:
    def sync() -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(running.gateway.audit, "sync", sync)
    with pytest.raises(aiosmtplib.SMTPDataError) as refused:
        await running.send(SENDER, [RECIPIENT], message(SENDER, RECIPIENT))
    assert refused.value.code == 451 and refused.value.message.startswith("4.3.0")
    assert list(running.gateway.spool.entries()) == []
    await nothing_delivered(running)


async def test_audit_failure_on_a_refusal_still_refuses_cleanly(
    running: Running, monkeypatch: pytest.MonkeyPatch,
) -> None:
    failing_audit(running, monkeypatch)
    lines = await raw_session(running.world, b"MAIL FROM:<a@evil.example>\r\n"
                              b"MAIL FROM:<a@clinique-test.fr>\r\nRCPT TO:<v@evil.example>\r\n"
                              b"RCPT TO:<b@chu-test.fr>\r\nDATA\r\nbare\nLF\r\n.\r\nQUIT\r\n")
    assert [line[:9] for line in lines] == ["550 5.7.1", "250 2.1.0", "550 5.1.2", "250 2.1.5",
                                            "354 End d", "550 5.6.0", "221 2.0.0"], lines
    await nothing_delivered(running)


async def test_unexpected_spool_error_answers_451_not_500(
    running: Running, monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def enqueue(*args: object) -> None:
        raise RuntimeError("cannot schedule new futures after shutdown")

    monkeypatch.setattr(running.gateway.spool, "enqueue", enqueue)
    with pytest.raises(aiosmtplib.SMTPDataError) as refused:
        await running.send(SENDER, [RECIPIENT], message(SENDER, RECIPIENT))
    assert refused.value.code == 451 and refused.value.message.startswith("4.3.0")
    assert "RuntimeError" not in refused.value.message and "futures" not in refused.value.message
    await nothing_delivered(running)


async def test_unexpected_error_in_a_command_answers_451_without_details(
    running: Running, monkeypatch: pytest.MonkeyPatch,
) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise ValueError("secret internal detail")

    monkeypatch.setattr(gateway.inbound, "resolve_source", broken)
    lines = await raw_session(running.world, b"MAIL FROM:<a@clinique-test.fr>\r\nNOOP\r\nQUIT\r\n")
    assert lines[0].startswith("451 4.3.0"), lines
    assert not any("secret" in line or "ValueError" in line for line in lines), lines
    assert lines[1].startswith("250"), lines


# -- slow peers ------------------------------------------------------------------------------


async def _start_data(session: Session) -> None:
    await session.command(b"MAIL FROM:<a@clinique-test.fr>")
    await session.command(b"RCPT TO:<b@chu-test.fr>")
    assert (await session.command(b"DATA"))[0][:3] == "354"


async def test_slow_data_that_keeps_arriving_is_not_cut_by_the_idle_timer(
        running: Running, session: Session, monkeypatch: pytest.MonkeyPatch) -> None:
    """A large message on a slow link: DATA lasts longer than the idle timeout, but every chunk
    restarts it, so the message gets its 250 (aiosmtpd alone restarts it only per command)."""
    monkeypatch.setattr(gateway.inbound, "SESSION_TIMEOUT", 0.6)
    await session.close()
    slow = await Session.open(running.world)  # a session made with the short timeout
    try:
        await _start_data(slow)
        data = message(SENDER, RECIPIENT, subject="slow link")
        pieces = [data[i:i + len(data) // 5 + 1] for i in range(0, len(data), len(data) // 5 + 1)]
        for piece in pieces:
            await slow.send(piece)
            await asyncio.sleep(0.3)  # five pauses: well past the 0.6 s timeout in all
        await slow.send(b".\r\n")  # `message` ends with CRLF
        assert (await slow.reply())[0].startswith("250"), "cut off mid-DATA"
    finally:
        await slow.close()
    sink = running.world.sinks["hospital"]
    await sink.wait(1)
    assert sink.messages[0].recipients == [RECIPIENT]


async def test_silent_peer_in_data_is_cut_after_the_idle_timeout(
        running: Running, session: Session, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gateway.inbound, "SESSION_TIMEOUT", 0.3)
    await session.close()
    silent = await Session.open(running.world)
    try:
        await _start_data(silent)
        await silent.send(b"Subject: x\r\n\r\nhalf a message\r\n")
        closed = await asyncio.wait_for(silent.reader.read(), 10)  # EOF once it is cut off
        assert closed == b""
    finally:
        await silent.close()
    await nothing_delivered(running)
    await still_serving(running)


async def test_data_trickling_past_the_deadline_gets_421(
        running: Running, session: Session, monkeypatch: pytest.MonkeyPatch) -> None:
    """A peer that keeps the idle timer alive with a few octets at a time still cannot hold
    the connection for ever: DATA has a deadline, past which the reply is 421 4.4.2."""
    monkeypatch.setattr(gateway.inbound, "DATA_DEADLINE", 0.5)
    await _start_data(session)

    async def trickle() -> None:
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            while True:
                await session.send(b"trickle\r\n")
                await asyncio.sleep(0.05)

    trickling = asyncio.create_task(trickle())
    try:
        lines = await session.reply()
    finally:
        trickling.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await trickling
    assert lines and lines[0].startswith("421 4.4.2"), lines
    await nothing_delivered(running)
    await still_serving(running)
