"""The deliver stage against real aiosmtpd sinks on 127.0.0.1 (ephemeral ports, test PKI).

The sinks here are independent of the gateway's own inbound code: plain aiosmtpd, with a
subclass only where a test needs the DSN extension advertised (aiosmtpd refuses NOTIFY, ORCPT,
RET and ENVID with 555 unless told otherwise) or the raw MAIL/RCPT arguments recorded.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.smtp import SMTP, Envelope, Session
from cryptography import x509
from cryptography.x509.oid import NameOID

from gateway.config import Limits, NetworkSettings, PeerRule, RelaySettings
from gateway.delivery import Outcome, SmtpTransport, make_client_tls_context
from gateway.envelope import Recipient
from gateway.errors import Reason, TemporaryFailure
from tests.support import testpki

pytestmark = pytest.mark.e2e

MESSAGE = (
    b"From: <a@clinique-test.fr>\r\nTo: <b@chu-test.fr>\r\nSubject: Compte rendu\r\n"
    b"Message-ID: <m1@clinique-test.fr>\r\nMIME-Version: 1.0\r\n"
    b"Content-Type: text/plain; charset=us-ascii\r\n\r\n"
    b"Bonjour.\r\n.leading dot survives\r\n..two dots too\r\nFin.\r\n"
)


# -- the test PKI ---------------------------------------------------------------------------


@dataclass
class Pki:
    folder: Path
    ca: testpki.IgcSante
    anchor: Path
    gateway_cert: Path
    gateway_key: Path

    def server_context(self, issued: testpki.Issued, name: str) -> ssl.SSLContext:
        cert, key = self.folder / f"{name}.pem", self.folder / f"{name}.key"
        cert.write_bytes(issued.chain_pem())
        key.write_bytes(issued.key_pem)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        context.load_verify_locations(cafile=str(self.anchor))
        context.verify_mode = ssl.CERT_OPTIONAL  # so the sink can see the gateway's certificate
        return context

    def sink_context(self, name: str = "sink") -> ssl.SSLContext:
        issued = self.ca.server(f"mx.{name}.test", dns=[f"mx.{name}.test"], ips=["127.0.0.1"])
        return self.server_context(issued, name)

    def client_context(self) -> ssl.SSLContext:
        return make_client_tls_context([self.anchor], self.gateway_cert, self.gateway_key)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    folder = tmp_path_factory.mktemp("pki")
    ca = testpki.IgcSante.create()
    anchor = folder / "ca.pem"
    anchor.write_bytes(ca.root.cert_pem + ca.organisations.cert_pem)
    gateway = ca.server("passerelle.test", dns=["passerelle.test"])
    cert, key = gateway.write(folder, "gateway")
    cert.write_bytes(gateway.chain_pem())
    return Pki(folder, ca, anchor, cert, key)


# -- the sink -------------------------------------------------------------------------------


@dataclass
class Received:
    sender: str
    recipients: list[str]
    data: bytes
    tls: bool
    client_subject: str | None


@dataclass
class Handler:
    messages: list[Received] = field(default_factory=list)
    commands: list[str] = field(default_factory=list)  # "MAIL FROM:<...> ..." as received
    rcpt_replies: dict[str, str] = field(default_factory=dict)
    mail_reply: str | None = None  # instead of accepting MAIL FROM
    data_reply: str | None = None
    drop_in_data: bool = False
    hold_rcpt: asyncio.Event | None = None  # RCPT waits for this (a slow next hop)
    gate: asyncio.Event | None = None  # DATA waits for this (concurrency tests)
    in_data: int = 0
    most_in_data: int = 0
    dsn: bool = False  # advertise the DSN extension (RFC 3461)

    async def handle_EHLO(self, server: SMTP, session: Session, envelope: Envelope,
                          hostname: str, responses: list[str]) -> list[str]:
        session.host_name = hostname
        if self.dsn:
            responses.insert(len(responses) - 1, "250-DSN")
        return responses

    async def handle_MAIL(self, server: SMTP, session: Session, envelope: Envelope,
                          address: str, options: list[str]) -> str:
        if self.mail_reply is not None:
            return self.mail_reply
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 OK"

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope,
                          address: str, options: list[str]) -> str:
        if self.hold_rcpt is not None:
            await self.hold_rcpt.wait()
        reply = self.rcpt_replies.get(address)
        if reply is not None:
            if reply.startswith("251"):  # accepted, to be forwarded
                envelope.rcpt_tos.append(address)
            return reply
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.in_data += 1
        self.most_in_data = max(self.most_in_data, self.in_data)
        try:
            if self.gate is not None:
                await self.gate.wait()
        finally:
            self.in_data -= 1
        if self.drop_in_data:
            assert isinstance(server.transport, asyncio.Transport)
            server.transport.abort()  # the message arrived, the reply never will
            return "250 never sent"
        if self.data_reply is not None:
            return self.data_reply
        ssl_object = server.transport.get_extra_info("ssl_object") if server.transport else None
        subject = None
        if ssl_object is not None:
            der = ssl_object.getpeercert(binary_form=True)
            if der:
                subject = x509.load_der_x509_certificate(der).subject.rfc4514_string()
        assert isinstance(envelope.original_content, bytes)
        self.messages.append(Received(str(envelope.mail_from), list(envelope.rcpt_tos),
                                      envelope.original_content, ssl_object is not None,
                                      subject))
        return "250 2.0.0 Ok: queued"


class SinkSMTP(SMTP):
    """aiosmtpd's server, recording raw commands and optionally speaking DSN (RFC 3461)."""

    def __init__(self, sink: Sink, **kwargs: Any) -> None:
        super().__init__(sink.handler, **kwargs)
        self.sink = sink

    def connection_lost(self, error: Exception | None) -> None:
        self.sink.closed += 1
        super().connection_lost(error)

    async def smtp_MAIL(self, arg: str) -> None:
        self.sink.handler.commands.append(f"MAIL {arg}")
        await super().smtp_MAIL(arg)

    async def smtp_RCPT(self, arg: str) -> None:
        self.sink.handler.commands.append(f"RCPT {arg}")
        await super().smtp_RCPT(arg)

    def _getparams(self, params: Sequence[str]) -> dict[str, str | bool] | None:
        result: dict[str, str | bool] | None = super()._getparams(params)
        if result is not None and self.sink.dsn:
            for name in ("NOTIFY", "ORCPT", "RET", "ENVID"):
                result.pop(name, None)
        return result


class Sink:
    def __init__(self, *, tls: ssl.SSLContext | None = None, dsn: bool = False,
                 size: int | None = 1_000_000, utf8: bool = False) -> None:
        self.tls = tls
        self.dsn = dsn
        self.size = size
        self.utf8 = utf8
        self.handler = Handler(dsn=dsn)
        self.connections = 0
        self.closed = 0
        self.port = 0
        self.server: asyncio.Server | None = None
        self.protocols: list[SinkSMTP] = []

    async def start(self) -> Sink:
        def factory() -> SinkSMTP:
            self.connections += 1
            protocol = SinkSMTP(
                self, hostname="sink.test", decode_data=False, tls_context=self.tls,
                require_starttls=False, data_size_limit=self.size,
                enable_SMTPUTF8=self.utf8,
            )
            self.protocols.append(protocol)
            return protocol

        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(factory, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    def drop_connections(self) -> None:
        for protocol in self.protocols:
            if isinstance(protocol.transport, asyncio.Transport):
                protocol.transport.abort()

    async def stop(self) -> None:
        for event in (self.handler.hold_rcpt, self.handler.gate):
            if event is not None:
                event.set()
        if self.server is not None:
            self.server.close()
            self.server = None
        self.drop_connections()
        await asyncio.sleep(0)

    @property
    def messages(self) -> list[Received]:
        return self.handler.messages


SinkFactory = Callable[..., Awaitable[Sink]]


@pytest.fixture
async def sinks() -> AsyncIterator[SinkFactory]:
    started: list[Sink] = []

    async def make(**kwargs: Any) -> Sink:
        sink = await Sink(**kwargs).start()
        started.append(sink)
        return sink

    yield make
    for sink in started:
        await sink.stop()


@pytest.fixture
async def transports(pki: Pki) -> AsyncIterator[Callable[..., SmtpTransport]]:
    made: list[SmtpTransport] = []

    def make(context: ssl.SSLContext | str | None = "default", **kwargs: Any) -> SmtpTransport:
        chosen = pki.client_context() if context == "default" else context
        assert not isinstance(chosen, str)
        transport = SmtpTransport("passerelle.test", chosen, **kwargs)
        made.append(transport)
        return transport

    yield make
    for transport in made:
        await transport.close()


def network(port: int, tls: str = "none", concurrency: int = 10,
            host: str = "127.0.0.1") -> NetworkSettings:
    return NetworkSettings(
        name="hospital", adapter="mime", domains=("chu-test.fr",), peers=PeerRule(),
        relay=RelaySettings(host=host, port=port, tls=tls),  # type: ignore[arg-type]
        limits=Limits(concurrency=concurrency),
    )


def rcpt(*addresses: str, **kwargs: Any) -> list[Recipient]:
    return [Recipient(a, "hospital", **kwargs) for a in addresses]


async def send(transport: SmtpTransport, net: NetworkSettings, recipients: list[Recipient],
               message: bytes = MESSAGE, *, envid: str | None = None,
               ret: str | None = None) -> list[Outcome]:
    outcomes = await transport.send(net, "a@clinique-test.fr", recipients, message,
                                    envid=envid, ret=ret)
    assert [o.address for o in outcomes] == [r.address for r in recipients]
    return outcomes


async def until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    async def poll() -> None:
        while not condition():
            await asyncio.sleep(0.01)
    await asyncio.wait_for(poll(), timeout)


def unused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


# -- clear text -----------------------------------------------------------------------------


async def test_plain_delivery_sends_the_bytes_unchanged(sinks: SinkFactory,
                                                        transports: Any) -> None:
    sink = await sinks()
    [outcome] = await send(transports(), network(sink.port), rcpt("b@chu-test.fr"))
    assert outcome.kind == "delivered"
    assert (outcome.code, outcome.enhanced, outcome.text) == (250, "2.0.0", "Ok: queued")
    assert outcome.reason is None
    assert outcome.remote_mta == "127.0.0.1"
    [got] = sink.messages
    assert got.sender == "a@clinique-test.fr"
    assert got.recipients == ["b@chu-test.fr"]
    assert got.data == MESSAGE
    assert not got.tls


async def test_tls_none_never_starts_tls(pki: Pki, sinks: SinkFactory, transports: Any) -> None:
    sink = await sinks(tls=pki.sink_context())
    [outcome] = await send(transports(), network(sink.port, "none"), rcpt("b@chu-test.fr"))
    assert outcome.kind == "delivered"
    assert not sink.messages[0].tls


# -- STARTTLS required ----------------------------------------------------------------------


async def test_required_tls_verified_with_client_certificate(
    pki: Pki, sinks: SinkFactory, transports: Any
) -> None:
    sink = await sinks(tls=pki.sink_context())
    seen: list[x509.Certificate | None] = []

    def check(net: NetworkSettings, recipients: Any, certificate: x509.Certificate | None) -> None:
        seen.append(certificate)

    transport = transports(peer_check=check)
    [outcome] = await send(transport, network(sink.port, "required"), rcpt("b@chu-test.fr"))
    assert outcome.kind == "delivered", outcome
    [got] = sink.messages
    assert got.tls
    assert got.data == MESSAGE
    assert got.client_subject is not None and "CN=passerelle.test" in got.client_subject
    [certificate] = seen
    assert certificate is not None
    [cn] = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    assert cn.value == "mx.sink.test"


async def test_required_tls_with_an_untrusted_certificate_defers(
    pki: Pki, sinks: SinkFactory, transports: Any
) -> None:
    stranger = testpki.IgcSante.create()  # a CA the gateway does not trust
    issued = stranger.server("mx.sink.test", ips=["127.0.0.1"])
    sink = await sinks(tls=pki.server_context(issued, "stranger"))
    [outcome] = await send(transports(), network(sink.port, "required"), rcpt("b@chu-test.fr"))
    assert outcome.kind == "deferred"
    assert outcome.enhanced == "4.7.5"
    assert outcome.reason is Reason.NEXT_HOP_UNTRUSTED
    assert "not trusted" in outcome.text and "nothing was sent" in outcome.text
    assert sink.messages == []
    assert sink.handler.commands == []  # not even MAIL FROM


async def test_required_tls_checks_the_host_name(
    pki: Pki, sinks: SinkFactory, transports: Any
) -> None:
    issued = pki.ca.server("mx.elsewhere.test", dns=["mx.elsewhere.test"])  # no 127.0.0.1
    sink = await sinks(tls=pki.server_context(issued, "elsewhere"))
    [outcome] = await send(transports(), network(sink.port, "required"), rcpt("b@chu-test.fr"))
    assert (outcome.kind, outcome.reason) == ("deferred", Reason.NEXT_HOP_UNTRUSTED)
    assert sink.handler.commands == []


async def test_required_tls_without_starttls_defers_and_sends_nothing(
    sinks: SinkFactory, transports: Any
) -> None:
    sink = await sinks(tls=None)
    [outcome] = await send(transports(), network(sink.port, "required"), rcpt("b@chu-test.fr"))
    assert outcome.kind == "deferred"
    assert outcome.enhanced == "4.7.4"
    assert outcome.reason is Reason.NEXT_HOP_UNTRUSTED
    assert "does not offer STARTTLS" in outcome.text
    assert sink.messages == []
    assert sink.handler.commands == []


async def test_required_tls_without_a_client_context_defers(
    pki: Pki, sinks: SinkFactory, transports: Any
) -> None:
    sink = await sinks(tls=pki.sink_context())
    [outcome] = await send(transports(None), network(sink.port, "required"),
                           rcpt("b@chu-test.fr"))
    assert outcome.kind == "deferred"
    assert sink.handler.commands == []


# -- STARTTLS opportunistic -----------------------------------------------------------------


async def test_opportunistic_verified_when_possible(
    pki: Pki, sinks: SinkFactory, transports: Any
) -> None:
    sink = await sinks(tls=pki.sink_context())
    seen: list[x509.Certificate | None] = []
    transport = transports(peer_check=lambda n, r, c: seen.append(c))
    [outcome] = await send(transport, network(sink.port, "opportunistic"), rcpt("b@chu-test.fr"))
    assert outcome.kind == "delivered"
    assert sink.messages[0].tls
    assert seen[0] is not None


async def test_opportunistic_falls_back_to_unverified_encryption(
    pki: Pki, sinks: SinkFactory, transports: Any, caplog: pytest.LogCaptureFixture
) -> None:
    stranger = testpki.IgcSante.create()
    sink = await sinks(tls=pki.server_context(
        stranger.server("mx.sink.test", ips=["127.0.0.1"]), "stranger2"))
    with caplog.at_level(logging.WARNING, logger="gateway.delivery"):
        [outcome] = await send(transports(), network(sink.port, "opportunistic"),
                               rcpt("b@chu-test.fr"))
    assert outcome.kind == "delivered"
    [got] = sink.messages
    assert got.tls  # encrypted, never clear text
    assert got.client_subject is not None  # and the gateway still presented its certificate
    assert any("not verified" in r.getMessage() for r in caplog.records)


async def test_opportunistic_without_an_unverified_twin_defers_loudly(
    pki: Pki, sinks: SinkFactory, transports: Any
) -> None:
    stranger = testpki.IgcSante.create()
    sink = await sinks(tls=pki.server_context(
        stranger.server("mx.sink.test", ips=["127.0.0.1"]), "stranger3"))
    plain = ssl.create_default_context(cafile=str(pki.anchor))  # a context of another origin
    [outcome] = await send(transports(plain), network(sink.port, "opportunistic"),
                           rcpt("b@chu-test.fr"))
    assert (outcome.kind, outcome.reason) == ("deferred", Reason.NEXT_HOP_UNTRUSTED)
    assert sink.messages == []


async def test_opportunistic_without_starttls_sends_in_clear(
    sinks: SinkFactory, transports: Any
) -> None:
    sink = await sinks(tls=None)
    [outcome] = await send(transports(), network(sink.port, "opportunistic"),
                           rcpt("b@chu-test.fr"))
    assert outcome.kind == "delivered"
    assert not sink.messages[0].tls


# -- replies --------------------------------------------------------------------------------


async def test_rcpt_550_bounces_only_that_recipient(sinks: SinkFactory, transports: Any) -> None:
    sink = await sinks()
    sink.handler.rcpt_replies = {"gone@chu-test.fr": "550 5.1.1 No such user"}
    good, gone = await send(transports(), network(sink.port),
                            rcpt("b@chu-test.fr", "gone@chu-test.fr"))
    assert good.kind == "delivered"
    assert (gone.kind, gone.code, gone.enhanced, gone.text) == (
        "bounced", 550, "5.1.1", "No such user"
    )
    assert gone.reason is Reason.DESTINATION_REFUSED
    assert sink.messages[0].recipients == ["b@chu-test.fr"]


async def test_rcpt_without_enhanced_code_gets_one_inferred(
    sinks: SinkFactory, transports: Any
) -> None:
    sink = await sinks()
    sink.handler.rcpt_replies = {"gone@chu-test.fr": "550 unknown", "later@chu-test.fr":
                                 "450-mailbox busy\r\n450 come back later"}
    _, gone, later = await send(transports(), network(sink.port),
                                rcpt("b@chu-test.fr", "gone@chu-test.fr", "later@chu-test.fr"))
    assert (gone.kind, gone.enhanced) == ("bounced", "5.1.0")
    assert (later.kind, later.enhanced, later.text) == (
        "deferred", "4.0.0", "mailbox busy come back later"
    )


async def test_rcpt_451_defers_that_recipient(sinks: SinkFactory, transports: Any) -> None:
    sink = await sinks()
    sink.handler.rcpt_replies = {"later@chu-test.fr": "451 4.3.0 Try again later"}
    good, later = await send(transports(), network(sink.port),
                             rcpt("b@chu-test.fr", "later@chu-test.fr"))
    assert good.kind == "delivered"
    assert (later.kind, later.code, later.enhanced) == ("deferred", 451, "4.3.0")


async def test_rcpt_251_will_forward_is_delivered(sinks: SinkFactory, transports: Any) -> None:
    sink = await sinks()
    sink.handler.rcpt_replies = {"moved@chu-test.fr": "251 2.1.5 User not local; will forward"}
    [outcome] = await send(transports(), network(sink.port), rcpt("moved@chu-test.fr"))
    assert (outcome.kind, outcome.code) == ("delivered", 250)
    assert sink.messages[0].recipients == ["moved@chu-test.fr"]


@pytest.mark.parametrize("reply", [
    "252 2.1.5 Cannot VRFY user, but will accept message and attempt delivery",
    "220 2.0.0 another success code",
    "354 go ahead",
    "199 below every class",
], ids=["252", "other-2xx", "3xx", "1xx"])
async def test_rcpt_reply_other_than_250_or_251_defers_and_is_never_delivered(
    sinks: SinkFactory, transports: Any, reply: str
) -> None:
    sink = await sinks()
    sink.handler.rcpt_replies = {"odd@chu-test.fr": reply}
    good, odd = await send(transports(), network(sink.port),
                           rcpt("b@chu-test.fr", "odd@chu-test.fr"))
    assert good.kind == "delivered"
    assert (odd.kind, odd.code, odd.enhanced, odd.reason) == (
        "deferred", 451, "4.5.0", Reason.NEXT_HOP_UNAVAILABLE)
    assert f"answered RCPT TO with {reply[:3]}" in odd.text
    assert odd.remote_mta == "127.0.0.1"
    [got] = sink.messages
    assert got.recipients == ["b@chu-test.fr"]


async def test_rcpt_252_alone_sends_no_data_and_the_connection_is_not_reused(
    sinks: SinkFactory, transports: Any
) -> None:
    sink = await sinks()
    sink.handler.rcpt_replies = {"odd@chu-test.fr": "252 2.1.5 Cannot VRFY user"}
    transport = transports()
    net = network(sink.port)
    [odd] = await send(transport, net, rcpt("odd@chu-test.fr"))
    assert (odd.kind, odd.code, odd.enhanced) == ("deferred", 451, "4.5.0")
    assert "252 Cannot VRFY user" in odd.text
    assert sink.messages == []
    [good] = await send(transport, net, rcpt("b@chu-test.fr"))
    assert good.kind == "delivered"
    assert sink.connections == 2


@pytest.mark.parametrize("reply", ["251 2.1.5 Sender OK, forwarding", "252 2.1.0 Maybe"])
async def test_mail_from_reply_other_than_250_defers(
    sinks: SinkFactory, transports: Any, reply: str
) -> None:
    sink = await sinks()
    sink.handler.mail_reply = reply
    first, second = await send(transports(), network(sink.port),
                               rcpt("b@chu-test.fr", "c@chu-test.fr"))
    for outcome in (first, second):
        assert (outcome.kind, outcome.code, outcome.enhanced) == ("deferred", 451, "4.5.0")
        assert f"answered MAIL FROM with {reply[:3]}" in outcome.text
    assert sink.messages == []


@pytest.mark.parametrize("reply", ["251 2.0.0 Forwarded", "252 2.0.0 Maybe", "354 more?"])
async def test_end_of_data_reply_other_than_250_is_not_a_delivery(
    sinks: SinkFactory, transports: Any, reply: str
) -> None:
    sink = await sinks()
    sink.handler.data_reply = reply
    [outcome] = await send(transports(), network(sink.port), rcpt("b@chu-test.fr"))
    assert (outcome.kind, outcome.code, outcome.enhanced, outcome.reason) == (
        "deferred", 451, "4.5.0", Reason.NEXT_HOP_UNAVAILABLE)
    assert f"answered DATA with {reply[:3]}" in outcome.text


async def test_all_recipients_refused_sends_no_data(sinks: SinkFactory, transports: Any) -> None:
    sink = await sinks()
    sink.handler.rcpt_replies = {"gone@chu-test.fr": "550 5.1.1 No such user"}
    [gone] = await send(transports(), network(sink.port), rcpt("gone@chu-test.fr"))
    assert gone.kind == "bounced"
    assert sink.messages == []


@pytest.mark.parametrize(("reply", "kind", "enhanced"), [
    ("554 5.6.0 Content refused", "bounced", "5.6.0"),
    ("451 4.3.0 Queue full", "deferred", "4.3.0"),
])
async def test_data_reply_applies_to_every_accepted_recipient(
    sinks: SinkFactory, transports: Any, reply: str, kind: str, enhanced: str
) -> None:
    sink = await sinks()
    sink.handler.rcpt_replies = {"gone@chu-test.fr": "550 5.1.1 No such user"}
    sink.handler.data_reply = reply
    first, second, gone = await send(
        transports(), network(sink.port),
        rcpt("b@chu-test.fr", "c@chu-test.fr", "gone@chu-test.fr"),
    )
    assert (first.kind, first.enhanced) == (kind, enhanced)
    assert (second.kind, second.enhanced) == (kind, enhanced)
    assert (gone.kind, gone.enhanced) == ("bounced", "5.1.1")


async def test_421_greeting_defers(transports: Any) -> None:
    async def refuse(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"421 4.3.2 Service shutting down\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(refuse, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        [outcome] = await send(transports(), network(port), rcpt("b@chu-test.fr"))
    finally:
        server.close()
    assert outcome.kind == "deferred"
    assert outcome.code == 421
    assert outcome.enhanced == "4.3.2"
    assert outcome.reason is Reason.NEXT_HOP_UNAVAILABLE
    assert "Service shutting down" in outcome.text


async def test_connection_refused_defers(transports: Any) -> None:
    [outcome] = await send(transports(), network(unused_port()), rcpt("b@chu-test.fr"))
    assert outcome.kind == "deferred"
    assert outcome.enhanced == "4.4.1"
    assert outcome.reason is Reason.NEXT_HOP_UNAVAILABLE
    assert "could not be reached" in outcome.text


async def test_unknown_host_defers(transports: Any) -> None:
    [outcome] = await send(transports(), network(25, host="relay.invalid"), rcpt("b@chu-test.fr"))
    assert outcome.kind == "deferred"
    assert outcome.reason is Reason.NEXT_HOP_UNAVAILABLE


async def test_connection_dropped_during_data_defers(sinks: SinkFactory, transports: Any) -> None:
    sink = await sinks()
    sink.handler.drop_in_data = True
    first, second = await send(transports(), network(sink.port),
                               rcpt("b@chu-test.fr", "c@chu-test.fr"))
    for outcome in (first, second):
        assert outcome.kind == "deferred"
        assert outcome.enhanced == "4.4.2"
        assert outcome.reason is Reason.NEXT_HOP_UNAVAILABLE
        assert "during DATA" in outcome.text


async def test_a_silent_next_hop_times_out_and_defers(
    sinks: SinkFactory, transports: Any
) -> None:
    sink = await sinks()
    sink.handler.hold_rcpt = asyncio.Event()  # never answers RCPT until the test ends
    [outcome] = await send(transports(command_timeout=0.5), network(sink.port),
                           rcpt("b@chu-test.fr"))
    assert outcome.kind == "deferred"
    assert outcome.reason is Reason.NEXT_HOP_UNAVAILABLE
    assert "did not answer in time" in outcome.text


# -- connection reuse and limits ------------------------------------------------------------


async def test_connection_is_reused(sinks: SinkFactory, transports: Any) -> None:
    sink = await sinks()
    transport = transports()
    net = network(sink.port)
    for _ in range(3):
        [outcome] = await send(transport, net, rcpt("b@chu-test.fr"))
        assert outcome.kind == "delivered"
    assert len(sink.messages) == 3
    assert sink.connections == 1


async def test_a_broken_pooled_connection_is_replaced(sinks: SinkFactory, transports: Any) -> None:
    sink = await sinks()
    transport = transports()
    net = network(sink.port)
    await send(transport, net, rcpt("b@chu-test.fr"))
    sink.drop_connections()
    [outcome] = await send(transport, net, rcpt("b@chu-test.fr"))
    assert outcome.kind == "delivered"
    assert len(sink.messages) == 2
    assert sink.connections == 2


async def test_idle_connections_are_closed(sinks: SinkFactory, transports: Any) -> None:
    sink = await sinks()
    await send(transports(idle_timeout=0.1), network(sink.port), rcpt("b@chu-test.fr"))
    await until(lambda: sink.closed == 1)


async def test_close_closes_pooled_connections(sinks: SinkFactory, transports: Any) -> None:
    sink = await sinks()
    transport = transports()
    await send(transport, network(sink.port), rcpt("b@chu-test.fr"))
    assert sink.closed == 0
    await transport.close()
    await until(lambda: sink.closed == 1)


async def test_concurrency_limit_per_network(sinks: SinkFactory, transports: Any) -> None:
    sink = await sinks()
    sink.handler.gate = asyncio.Event()
    transport = transports()
    net = network(sink.port, concurrency=2)
    sends = [asyncio.create_task(send(transport, net, rcpt(f"r{i}@chu-test.fr")))
             for i in range(5)]
    await until(lambda: sink.handler.in_data == 2)
    await asyncio.sleep(0.2)  # give a third delivery every chance to break the limit
    assert sink.handler.in_data == 2
    sink.handler.gate.set()
    results = await asyncio.gather(*sends)
    assert all(outcome.kind == "delivered" for [outcome] in results)
    assert len(sink.messages) == 5
    assert sink.handler.most_in_data == 2
    assert sink.connections <= 2


# -- ESMTP extensions -----------------------------------------------------------------------


async def test_dsn_parameters_forwarded_when_advertised(
    sinks: SinkFactory, transports: Any
) -> None:
    sink = await sinks(dsn=True)
    recipients = [
        Recipient("b@chu-test.fr", "hospital", orcpt="rfc822;B+2Bx@chu-test.fr",
                  notify=("FAILURE", "DELAY")),
        Recipient("c@chu-test.fr", "hospital"),
    ]
    outcomes = await send(transports(), network(sink.port), recipients,
                          envid="QX+2B1", ret="HDRS")
    assert all(o.kind == "delivered" for o in outcomes)
    mail, first, second = sink.handler.commands
    assert mail.startswith("MAIL FROM:<a@clinique-test.fr>")
    assert "RET=HDRS" in mail.split() and "ENVID=QX+2B1" in mail.split()
    assert f"SIZE={len(MESSAGE)}" in mail.split()
    assert first.split()[2:] == ["NOTIFY=FAILURE,DELAY", "ORCPT=rfc822;B+2Bx@chu-test.fr"]
    assert second == "RCPT TO:<c@chu-test.fr>"  # default NOTIFY is not spelt out


async def test_dsn_parameters_withheld_when_not_advertised(
    sinks: SinkFactory, transports: Any
) -> None:
    sink = await sinks(dsn=False)  # plain aiosmtpd would answer 555 to them
    recipients = rcpt("b@chu-test.fr", notify=("NEVER",), orcpt="rfc822;b@chu-test.fr")
    [outcome] = await send(transports(), network(sink.port), recipients,
                           envid="QX", ret="FULL")
    assert outcome.kind == "delivered"
    assert all("NOTIFY" not in c and "ENVID" not in c for c in sink.handler.commands)


async def test_message_larger_than_the_advertised_size_bounces(
    sinks: SinkFactory, transports: Any
) -> None:
    sink = await sinks(size=100)
    [outcome] = await send(transports(), network(sink.port), rcpt("b@chu-test.fr"))
    assert (outcome.kind, outcome.code, outcome.enhanced) == ("bounced", 552, "5.3.4")
    assert outcome.reason is Reason.TOO_LARGE
    assert sink.handler.commands == []


async def test_eight_bit_body_is_announced(sinks: SinkFactory, transports: Any) -> None:
    sink = await sinks()
    body = MESSAGE.replace(b"Bonjour.", "Résultats.".encode("latin-1"))
    [outcome] = await send(transports(), network(sink.port), rcpt("b@chu-test.fr"), body)
    assert outcome.kind == "delivered"
    assert "BODY=8BITMIME" in sink.handler.commands[0].split()
    assert sink.messages[0].data == body


async def test_internationalised_address_needs_smtputf8(
    sinks: SinkFactory, transports: Any
) -> None:
    sink = await sinks(utf8=False)
    ascii_one, utf8_one = await send(transports(), network(sink.port),
                                     rcpt("b@chu-test.fr", "jérôme@chu-test.fr"))
    assert ascii_one.kind == "delivered"
    assert (utf8_one.kind, utf8_one.enhanced) == ("bounced", "5.6.7")


async def test_internationalised_address_with_smtputf8(
    sinks: SinkFactory, transports: Any
) -> None:
    sink = await sinks(utf8=True)
    [outcome] = await send(transports(), network(sink.port), rcpt("jérôme@chu-test.fr"))
    assert outcome.kind == "delivered"
    assert "SMTPUTF8" in sink.handler.commands[0].split()
    assert sink.messages[0].recipients == ["jérôme@chu-test.fr"]


# -- the peer check hook --------------------------------------------------------------------


async def test_peer_check_can_refuse_the_next_hop(
    pki: Pki, sinks: SinkFactory, transports: Any
) -> None:
    sink = await sinks(tls=pki.sink_context())
    refuse = True

    def check(net: NetworkSettings, recipients: Any, certificate: x509.Certificate | None) -> None:
        if refuse:
            raise TemporaryFailure("The next hop is not in the MSSanté whitelist.",
                                   enhanced="4.7.1", reason=Reason.NEXT_HOP_UNTRUSTED)

    transport = transports(peer_check=check)
    net = network(sink.port, "required")
    [outcome] = await send(transport, net, rcpt("b@chu-test.fr"))
    assert (outcome.kind, outcome.enhanced, outcome.reason) == (
        "deferred", "4.7.1", Reason.NEXT_HOP_UNTRUSTED
    )
    assert "whitelist" in outcome.text
    assert sink.handler.commands == []
    refuse = False
    [outcome] = await send(transport, net, rcpt("b@chu-test.fr"))
    assert outcome.kind == "delivered"
    assert sink.connections == 1  # the refused attempt left a clean connection for reuse


async def test_a_broken_peer_check_defers_rather_than_sends(
    sinks: SinkFactory, transports: Any
) -> None:
    sink = await sinks()

    def check(net: NetworkSettings, recipients: Any, certificate: Any) -> None:
        raise RuntimeError("bug")

    [outcome] = await send(transports(peer_check=check), network(sink.port),
                           rcpt("b@chu-test.fr"))
    assert (outcome.kind, outcome.reason) == ("deferred", Reason.INTERNAL)
    assert sink.messages == []


async def test_network_without_relay_defers(transports: Any) -> None:
    net = NetworkSettings(name="lab", adapter="mime", domains=("labo-test.fr",),
                          peers=PeerRule())
    [outcome] = await send(transports(), net, rcpt("x@labo-test.fr"))
    assert outcome.kind == "deferred"
    assert "no relay" in outcome.text
