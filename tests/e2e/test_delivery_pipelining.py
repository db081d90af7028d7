"""SMTP out: connection caching per next hop, PIPELINING (RFC 2920) and the message's writes,
against a scripted next hop on 127.0.0.1 that records every command line of every session.

What must hold: with PIPELINING, MAIL, every RCPT and DATA leave in one write and the message
with its final dot in one more, and each reply still decides exactly what it decides without
pipelining (only 250/251 to RCPT and 250 after the dot deliver); a connection is kept for the
next message, no more of them than the network's `limits.concurrency`, and closed after
`idle_timeout`; RSET is sent only when the last transaction on the connection did not end; a
cached connection the next hop closed meanwhile is replaced by a new one for that message
without counting as a failure, while a new connection that fails is a failure.
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from gateway.config import Limits, NetworkSettings, PeerRule, RelaySettings
from gateway.delivery import Outcome, SmtpTransport
from gateway.envelope import Recipient
from gateway.errors import Reason
from gateway.smtp_wire import wire_form

pytestmark = pytest.mark.e2e

SENDER = "a@clinique-test.fr"
MESSAGE = (
    b"From: <a@clinique-test.fr>\r\nTo: <b@chu-test.fr>\r\nSubject: Compte rendu\r\n"
    b"Message-ID: <m1@clinique-test.fr>\r\n\r\nBonjour.\r\n.ligne\r\nFin.\r\n"
)


class Act(enum.Enum):
    DEFAULT = "default"  # the reply a plain server gives
    CLOSE = "close"  # close the connection without a reply


Hook = Callable[["Session", bytes], "bytes | Act"]


@dataclass
class Session:
    number: int
    lines: list[bytes] = field(default_factory=list)  # command lines, CRLF stripped
    messages: list[bytes] = field(default_factory=list)  # DATA contents, still dot-stuffed
    transactions: int = 0  # MAIL commands seen
    accepted: int = 0  # recipients accepted in the transaction under way
    writer: asyncio.StreamWriter | None = None

    @property
    def verbs(self) -> list[str]:
        return [line.split(b" ", 1)[0].split(b":", 1)[0].decode().upper() for line in self.lines]


class Hop:
    """A next hop speaking just enough SMTP: PIPELINING advertised unless told otherwise,
    replies per recipient from `rcpt`, and `hook` to script anything else."""

    def __init__(self, *, pipelining: bool = True, rcpt: dict[str, bytes] | None = None,
                 mail: bytes = b"250 2.1.0 Ok", data: bytes = b"354 End data with <CR><LF>.<CR><LF>",
                 end: bytes = b"250 2.0.0 Ok: queued", hook: Hook | None = None) -> None:
        self.pipelining = pipelining
        self.rcpt = rcpt or {}
        self.mail, self.data, self.end = mail, data, end
        self.hook = hook
        self.sessions: list[Session] = []
        self.gate: asyncio.Event | None = None  # the reply after the dot waits for it
        self.in_data = 0
        self.port = 0
        self.server: asyncio.Server | None = None

    @property
    def messages(self) -> list[bytes]:
        return [m for s in self.sessions for m in s.messages]

    async def start(self) -> Hop:
        self.server = await asyncio.start_server(self._session, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self.gate is not None:
            self.gate.set()
        if self.server is not None:
            self.server.close()
        for session in self.sessions:
            if session.writer is not None:
                session.writer.close()

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        session = Session(len(self.sessions) + 1, writer=writer)
        self.sessions.append(session)
        writer.write(b"220 hop.test ESMTP\r\n")
        try:
            while line := await reader.readline():
                command = line.rstrip(b"\r\n")
                session.lines.append(command)
                verb = command[:4].upper()
                if verb in (b"MAIL", b"RSET"):
                    session.accepted = 0
                if verb == b"MAIL":
                    session.transactions += 1
                answer = self.hook(session, command) if self.hook else Act.DEFAULT
                if answer is Act.CLOSE:
                    return
                if isinstance(answer, bytes):
                    writer.write(answer + b"\r\n")
                elif verb == b"EHLO":
                    offer = b"250-PIPELINING\r\n" if self.pipelining else b""
                    writer.write(b"250-hop.test\r\n" + offer + b"250 8BITMIME\r\n")
                elif verb == b"MAIL":
                    writer.write(self.mail + b"\r\n")
                elif verb == b"RCPT":
                    address = command.split(b"<", 1)[1].split(b">", 1)[0].decode()
                    reply = self.rcpt.get(address, b"250 2.1.5 Ok")
                    session.accepted += reply.startswith((b"250", b"251"))
                    writer.write(reply + b"\r\n")
                elif verb == b"DATA" and not session.accepted:
                    writer.write(b"554 5.5.1 Error: no valid recipients\r\n")
                elif verb == b"DATA":
                    writer.write(self.data + b"\r\n")
                    if self.data.startswith(b"354"):
                        await writer.drain()
                        content = b""
                        while not content.endswith(b"\r\n.\r\n"):
                            chunk = await reader.readline()
                            if not chunk:
                                return
                            content += chunk
                        session.messages.append(content[:-3])
                        self.in_data += 1
                        if self.gate is not None:
                            await self.gate.wait()
                        self.in_data -= 1
                        writer.write(self.end + b"\r\n")
                elif verb == b"QUIT":
                    writer.write(b"221 2.0.0 Bye\r\n")
                    await writer.drain()
                    return
                else:
                    writer.write(b"250 2.0.0 Ok\r\n")
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()


HopFactory = Callable[..., Awaitable[Hop]]


@pytest.fixture
async def hops() -> AsyncIterator[HopFactory]:
    started: list[Hop] = []

    async def make(**kwargs: Any) -> Hop:
        hop = await Hop(**kwargs).start()
        started.append(hop)
        return hop

    yield make
    for hop in started:
        await hop.stop()


@pytest.fixture
async def transports() -> AsyncIterator[Callable[..., SmtpTransport]]:
    made: list[SmtpTransport] = []

    def make(**kwargs: Any) -> SmtpTransport:
        kwargs.setdefault("command_timeout", 10.0)
        transport = SmtpTransport("passerelle.test", None, **kwargs)
        made.append(transport)
        return transport

    yield make
    for transport in made:
        await transport.close()


def network(port: int, concurrency: int = 10) -> NetworkSettings:
    return NetworkSettings(
        name="hospital", adapter="mime", domains=("chu-test.fr",), peers=PeerRule(),
        relay=RelaySettings(host="127.0.0.1", port=port, tls="none"),
        limits=Limits(concurrency=concurrency),
    )


async def send(transport: SmtpTransport, hop: Hop, *addresses: str, message: bytes = MESSAGE,
               concurrency: int = 10) -> list[Outcome]:
    outcomes = await transport.send(network(hop.port, concurrency), SENDER,
                                    [Recipient(a, "hospital") for a in addresses], message,
                                    envid=None, ret=None)
    assert [o.address for o in outcomes] == list(addresses)
    return outcomes


def summary(outcomes: list[Outcome]) -> list[tuple[str, str, int, str]]:
    return [(o.address, o.kind, o.code, o.enhanced) for o in outcomes]


async def until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    async def poll() -> None:
        while not condition():
            await asyncio.sleep(0.01)
    await asyncio.wait_for(poll(), timeout)


# -- pipelining -----------------------------------------------------------------------------


async def test_pipelining_sends_the_commands_in_one_write_and_the_message_in_another(
    hops: HopFactory, transports: Callable[..., SmtpTransport],
) -> None:
    hop = await hops()
    transport = transports()
    outcomes = await send(transport, hop, "b@chu-test.fr", "c@chu-test.fr", "d@chu-test.fr")
    assert [o.kind for o in outcomes] == ["delivered"] * 3
    assert transport.stats.writes == 2
    assert hop.sessions[0].verbs == ["EHLO", "MAIL", "RCPT", "RCPT", "RCPT", "DATA"]
    assert hop.messages == [MESSAGE.replace(b"\r\n.ligne", b"\r\n..ligne")]


async def test_without_pipelining_one_command_per_write(
    hops: HopFactory, transports: Callable[..., SmtpTransport],
) -> None:
    hop = await hops(pipelining=False)
    transport = transports()
    outcomes = await send(transport, hop, "b@chu-test.fr", "c@chu-test.fr")
    assert [o.kind for o in outcomes] == ["delivered"] * 2
    assert transport.stats.writes == 5  # MAIL, RCPT, RCPT, DATA, then the message
    assert len(hop.messages) == 1


MIXED = {
    "ok@chu-test.fr": b"250 2.1.5 Ok",
    "forward@chu-test.fr": b"251 2.1.5 User not local; will forward",
    "unknown@chu-test.fr": b"550 5.1.1 No such user",
    "busy@chu-test.fr": b"451 4.2.0 Mailbox busy",
    "vrfy@chu-test.fr": b"252 2.1.5 Cannot VRFY user, but will accept message",
}


@pytest.mark.parametrize("pipelining", [True, False], ids=["pipelined", "stepwise"])
async def test_each_rcpt_reply_decides_its_recipient_pipelined_or_not(
    hops: HopFactory, transports: Callable[..., SmtpTransport], pipelining: bool,
) -> None:
    hop = await hops(pipelining=pipelining, rcpt=MIXED)
    outcomes = await send(transports(), hop, *MIXED)
    assert summary(outcomes) == [
        ("ok@chu-test.fr", "delivered", 250, "2.0.0"),
        ("forward@chu-test.fr", "delivered", 250, "2.0.0"),
        ("unknown@chu-test.fr", "bounced", 550, "5.1.1"),
        ("busy@chu-test.fr", "deferred", 451, "4.2.0"),
        ("vrfy@chu-test.fr", "deferred", 451, "4.5.0"),  # 252 is no acceptance
    ]
    assert len(hop.messages) == 1


@pytest.mark.parametrize("pipelining", [True, False], ids=["pipelined", "stepwise"])
async def test_a_refused_end_of_data_delivers_nobody(
    hops: HopFactory, transports: Callable[..., SmtpTransport], pipelining: bool,
) -> None:
    hop = await hops(pipelining=pipelining, end=b"554 5.6.0 Content rejected")
    outcomes = await send(transports(), hop, "b@chu-test.fr", "c@chu-test.fr")
    assert [(o.kind, o.code) for o in outcomes] == [("bounced", 554)] * 2


async def test_pipelined_mail_refused_refuses_everyone_and_sends_no_message(
    hops: HopFactory, transports: Callable[..., SmtpTransport],
) -> None:
    def refuse(session: Session, line: bytes) -> bytes | Act:
        verb = line[:4].upper()
        if verb in (b"RCPT", b"DATA"):
            return b"503 5.5.1 Error: need MAIL command"
        return Act.DEFAULT

    hop = await hops(mail=b"550 5.7.1 Sender refused", hook=refuse)
    outcomes = await send(transports(), hop, "b@chu-test.fr", "c@chu-test.fr")
    assert [(o.kind, o.code, o.enhanced) for o in outcomes] == [("bounced", 550, "5.7.1")] * 2
    assert hop.messages == []


async def test_pipelined_354_without_an_accepted_recipient_sends_nothing_and_drops_the_connection(
    hops: HopFactory, transports: Callable[..., SmtpTransport],
) -> None:
    # Out of step: every RCPT refused, yet DATA answered 354. No byte of the message may follow.
    def go_ahead(session: Session, line: bytes) -> bytes | Act:
        if line[:4].upper() == b"DATA" and session.number == 1:
            return b"354 End data with <CR><LF>.<CR><LF>"
        return Act.DEFAULT

    hop = await hops(rcpt={"b@chu-test.fr": b"550 5.1.1 No such user"}, hook=go_ahead)
    transport = transports()
    [outcome] = await send(transport, hop, "b@chu-test.fr")
    assert outcome.kind == "bounced"
    await until(lambda: hop.sessions[0].writer is not None
                and hop.sessions[0].writer.is_closing())
    assert hop.messages == []
    [again] = await send(transport, hop, "c@chu-test.fr")
    assert again.kind == "delivered"
    assert len(hop.sessions) == 2  # the first connection was not reused


@pytest.mark.parametrize("pipelining", [True, False], ids=["pipelined", "stepwise"])
async def test_rset_only_after_a_transaction_that_did_not_end(
    hops: HopFactory, transports: Callable[..., SmtpTransport], pipelining: bool,
) -> None:
    hop = await hops(pipelining=pipelining, rcpt={"nobody@chu-test.fr": b"550 5.1.1 No such user"})
    transport = transports()
    assert [o.kind for o in await send(transport, hop, "b@chu-test.fr")] == ["delivered"]
    assert [o.kind for o in await send(transport, hop, "c@chu-test.fr")] == ["delivered"]
    assert [o.kind for o in await send(transport, hop, "nobody@chu-test.fr")] == ["bounced"]
    assert [o.kind for o in await send(transport, hop, "d@chu-test.fr")] == ["delivered"]
    [session] = hop.sessions
    verbs = session.verbs[1:]
    if pipelining:
        # The refused transaction's DATA is part of its group; the next group opens with RSET.
        assert verbs == ["MAIL", "RCPT", "DATA", "MAIL", "RCPT", "DATA", "MAIL", "RCPT", "DATA",
                         "RSET", "MAIL", "RCPT", "DATA"]
    else:
        assert verbs == ["MAIL", "RCPT", "DATA", "MAIL", "RCPT", "DATA", "MAIL", "RCPT",
                         "RSET", "MAIL", "RCPT", "DATA"]


# -- the connection cache -------------------------------------------------------------------


async def test_connections_are_kept_up_to_the_networks_concurrency(
    hops: HopFactory, transports: Callable[..., SmtpTransport],
) -> None:
    hop = await hops()
    hop.gate = asyncio.Event()
    transport = transports()

    async def wave() -> None:
        assert hop.gate is not None
        hop.gate.clear()
        sends = [asyncio.ensure_future(send(transport, hop, f"r{i}@chu-test.fr", concurrency=6))
                 for i in range(6)]
        await until(lambda: hop.in_data == 6)
        hop.gate.set()
        for outcomes in await asyncio.gather(*sends):
            assert [o.kind for o in outcomes] == ["delivered"]

    await wave()
    await wave()  # carried by the six connections the first wave left open
    assert len(hop.sessions) == 6
    assert transport.stats.connections == 6


async def test_no_more_connections_than_the_concurrency(
    hops: HopFactory, transports: Callable[..., SmtpTransport],
) -> None:
    hop = await hops()
    transport = transports()
    results = await asyncio.gather(*(send(transport, hop, f"r{i}@chu-test.fr", concurrency=2)
                                     for i in range(10)))
    assert all(o.kind == "delivered" for outcomes in results for o in outcomes)
    assert len(hop.sessions) <= 2
    assert len(hop.messages) == 10


async def test_an_idle_connection_expires_and_the_next_message_opens_another(
    hops: HopFactory, transports: Callable[..., SmtpTransport],
) -> None:
    hop = await hops()
    transport = transports(idle_timeout=0.2)
    await send(transport, hop, "b@chu-test.fr")
    await until(lambda: "QUIT" in hop.sessions[0].verbs)
    [outcome] = await send(transport, hop, "c@chu-test.fr")
    assert outcome.kind == "delivered"
    assert len(hop.sessions) == 2
    assert transport.stats.stale == 0


@pytest.mark.parametrize("pipelining", [True, False], ids=["pipelined", "stepwise"])
@pytest.mark.parametrize("how", ["closed", "421"])
async def test_a_cached_connection_the_next_hop_ended_is_replaced_without_a_failure(
    hops: HopFactory, transports: Callable[..., SmtpTransport], pipelining: bool, how: str,
) -> None:
    """The next hop ends the idle session just as the next transaction starts on it (its
    close, or its 421, crossing our MAIL): the message goes on a new connection, and nothing
    counts as a failed attempt."""

    def idle_end(session: Session, line: bytes) -> bytes | Act:
        if line[:4].upper() == b"MAIL" and session.transactions == 2:
            return Act.CLOSE if how == "closed" else b"421 4.4.2 hop.test Idle timeout"
        return Act.DEFAULT

    hop = await hops(pipelining=pipelining, hook=idle_end)
    transport = transports()
    await send(transport, hop, "b@chu-test.fr")
    if how == "421":
        # A server that says 421 then closes: close it after the reply, as it would.
        original = hop.hook

        def then_close(session: Session, line: bytes) -> bytes | Act:
            if session.transactions == 2 and line[:4].upper() != b"MAIL":
                return Act.CLOSE
            assert original is not None
            return original(session, line)

        hop.hook = then_close
    outcomes = await send(transport, hop, "c@chu-test.fr", "d@chu-test.fr")
    assert [o.kind for o in outcomes] == ["delivered", "delivered"]
    assert transport.stats.stale == 1
    assert len(hop.sessions) == 2
    assert hop.sessions[1].messages  # the message went on the new connection, once
    assert len(hop.messages) == 2


async def test_a_new_connection_that_closes_is_a_failure_and_not_tried_again(
    hops: HopFactory, transports: Callable[..., SmtpTransport],
) -> None:
    def close_at_mail(session: Session, line: bytes) -> bytes | Act:
        return Act.CLOSE if line[:4].upper() == b"MAIL" else Act.DEFAULT

    hop = await hops(hook=close_at_mail)
    transport = transports()
    [outcome] = await send(transport, hop, "b@chu-test.fr")
    assert (outcome.kind, outcome.reason) == ("deferred", Reason.NEXT_HOP_UNAVAILABLE)
    assert transport.stats.stale == 0
    assert len(hop.sessions) == 1


async def test_bytes_from_the_next_hop_while_idle_end_the_cached_connection(
    hops: HopFactory, transports: Callable[..., SmtpTransport],
) -> None:
    """An idle session that the next hop times out with a 421: those bytes answer no command,
    so they end the connection instead of being read as the next command's reply."""
    hop = await hops()
    transport = transports()
    await send(transport, hop, "b@chu-test.fr")
    writer = hop.sessions[0].writer
    assert writer is not None
    writer.write(b"421 4.4.2 hop.test Error: timeout exceeded\r\n")
    await writer.drain()
    await until(writer.is_closing)
    await asyncio.sleep(0.05)  # let the gateway's side see it
    [outcome] = await send(transport, hop, "c@chu-test.fr")
    assert (outcome.kind, outcome.code) == ("delivered", 250)
    assert len(hop.sessions) == 2


# -- the message on the wire ----------------------------------------------------------------


async def test_a_large_message_arrives_whole_dot_stuffed_and_with_crlf(
    hops: HopFactory, transports: Callable[..., SmtpTransport],
) -> None:
    line = b"." + b"x" * 70
    body = b"\r\n".join([line] * 50_000)  # about 3.5 MiB, every line starting with a dot
    message = b"Subject: gros\r\n\r\n" + body + b"\nbare line feed\rbare return\r\n"
    hop = await hops()
    [outcome] = await send(transports(), hop, "b@chu-test.fr", message=message)
    assert outcome.kind == "delivered"
    [received] = hop.messages
    expected = (b"Subject: gros\r\n\r\n" + b"\r\n".join([b"." + line] * 50_000)
                + b"\r\nbare line feed\r\nbare return\r\n")
    assert received == expected


def test_the_wire_form_copies_nothing_when_nothing_needs_changing() -> None:
    plain = b"Subject: x\r\n\r\nBonjour.\r\n"
    assert wire_form(plain) is plain


@pytest.mark.parametrize(("message", "wire"), [
    (b".starts with a dot\r\n", b"..starts with a dot\r\n"),
    (b"a\r\n.b\r\n..c\r\n", b"a\r\n..b\r\n...c\r\n"),
    (b"no final line end", b"no final line end\r\n"),
    (b"bare\nline\rends\r\n", b"bare\r\nline\r\nends\r\n"),
    (b"a\n.b\n", b"a\r\n..b\r\n"),
    (b"", b"\r\n"),
])
def test_the_wire_form(message: bytes, wire: bytes) -> None:
    assert wire_form(message) == wire
