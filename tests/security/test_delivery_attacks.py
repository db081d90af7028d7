"""Delivery regressions, one named test per threat to the message after the 250: a next hop
that answers out of step with SMTP (RFC 5321 §4.2, §4.3.2), a downgrade of TLS towards the
next hop (RFC 3207), a disk that fails once the next hop has taken the message, and failures
found while preparing it (the retry schedule and the give-up time of DESIGN.md §10).

What must hold in each: a recipient counts as delivered only when the next hop accepted the
message for it; nothing is sent in clear on a route that requires TLS, nor after STARTTLS was
offered; a recipient the next hop accepted is not sent the message again by this process; a
recipient that cannot be served now waits on the schedule and gets a DSN when it expires.

Two harnesses: the queue manager over a real spool with the spool's fault seam and a
scripted next hop (no sockets, the clock handed in), and real SMTP and TLS on 127.0.0.1 (the
transport against scripted or aiosmtpd next hops, and the whole gateway of
tests/support/world.py).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import errno
import os
import ssl
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.smtp import SMTP

import gateway.qmgr
from adapters.base import Verdict
from gateway.audit import AuditTrail, read_records
from gateway.config import Limits, NetworkSettings, PeerRule, RelaySettings
from gateway.delivery import Kind, Outcome, SmtpTransport, make_client_tls_context
from gateway.envelope import DeliveryState, Envelope, Peer, Recipient, Status
from gateway.errors import GatewayError, Reason, TemporaryFailure
from gateway.events import Events, Metrics
from gateway.pipeline import Batch, Prepared
from gateway.qmgr import QueueManager
from gateway.runtime import Runtime
from gateway.spool import Operation, Spool, SpoolFaults
from tests.e2e.conftest import start
from tests.support import testpki
from tests.support.world import Sink, World, build_world, message

pytestmark = pytest.mark.e2e

T0 = 1_795_000_000.0
SENDER = "a@clinique-test.fr"
B, C = "b@chu-test.fr", "c@chu-test.fr"
ROUTE = "clinic->hospital"


# -- the queue manager over a real spool --------------------------------------------------------


Reply = tuple[Kind, int, str, str]
DEFER: Reply = ("deferred", 451, "4.4.1", "Try again later")
BOUNCE: Reply = ("bounced", 550, "5.1.1", "No such user")


class NextHop:
    """A `Transport` double: 250 for every recipient unless `replies` says otherwise."""

    def __init__(self) -> None:
        self.replies: dict[str, Reply] = {}
        self.tried: list[str] = []  # every recipient of every send, in order
        self.received: list[str] = []  # the recipients it accepted the message for

    async def send(self, network: NetworkSettings, sender: str, recipients: Sequence[Recipient],
                   message: bytes, *, envid: str | None, ret: str | None) -> list[Outcome]:
        outcomes = []
        for recipient in recipients:
            kind, code, enhanced, text = self.replies.get(
                recipient.address, ("delivered", 250, "2.0.0", "Ok: queued"))
            self.tried.append(recipient.address)
            if kind == "delivered":
                self.received.append(recipient.address)
            reason = None if kind == "delivered" else Reason.DESTINATION_REFUSED
            outcomes.append(Outcome(recipient.address, kind, code, enhanced, text, reason,
                                    "127.0.0.1"))
        return outcomes


class Disk:
    """The spool's fault seam, switchable: while `failing(operation, path)` says so, that
    operation raises OSError(`code`)."""

    def __init__(self) -> None:
        self.failing: Callable[[Operation, Path], bool] | None = None
        self.code = errno.ENOSPC
        self.hits = 0

    def hook(self, operation: Operation, path: Path) -> None:
        if self.failing is not None and self.failing(operation, path):
            self.hits += 1
            raise OSError(self.code, os.strerror(self.code), str(path))


def state_rewrite(operation: Operation, path: Path) -> bool:
    """Writing a new delivery state (a temporary file in incoming/, renamed over the old)."""
    return operation == "write" and path.parent.name == "incoming" and path.suffix == ".tmp"


def any_write(operation: Operation, path: Path) -> bool:
    return operation == "write"


def queue_file_removal(operation: Operation, path: Path) -> bool:
    return operation == "unlink" and path.parent.name in ("active", "deferred")


def stub_prepare(failing: Mapping[str, GatewayError]) -> Callable[..., Prepared]:
    """`pipeline.prepare` as the queue manager sees it: the raw message for every recipient,
    except those in `failing` (read at each call, so a test can fix them)."""

    def prepare(runtime: Runtime, envelope: Envelope, raw: bytes,
                recipients: Sequence[Recipient], now: dt.datetime) -> Prepared:
        failed = {r.address: failing[r.address] for r in recipients if r.address in failing}
        by_network: dict[str, list[Recipient]] = {}
        for recipient in recipients:
            if recipient.address not in failed:
                by_network.setdefault(recipient.network, []).append(recipient)
        batches = tuple(Batch(runtime.config.networks[name], tuple(members), raw)
                        for name, members in by_network.items())
        return Prepared(Verdict.unsigned(), False, (), batches, failed)

    return prepare


@dataclass
class Queue:
    qm: QueueManager
    spool: Spool
    hop: NextHop
    disk: Disk
    events: Events
    audit_folder: Path
    failing: dict[str, GatewayError]
    now: list[float] = field(default_factory=lambda: [T0])

    async def accept(self, *addresses: str, notify: tuple[str, ...] = ()) -> Envelope:
        envelope = Envelope(
            queue_id=self.spool.new_queue_id(), sender=SENDER,
            recipients=tuple(Recipient(a, "hospital", notify=notify) for a in addresses),
            source_network="clinic", peer=Peer("127.0.0.1"), received_at=self.now[0], size=100,
            message_id="<m1@clinique-test.fr>",
        )
        await self.spool.enqueue(envelope, message(SENDER, addresses[0]))
        return envelope

    async def attempt(self, envelope: Envelope) -> None:
        await self.qm.attempt(envelope.queue_id)

    def later(self, seconds: float) -> None:
        self.now[0] += seconds

    def audit(self, event: str) -> list[dict[str, Any]]:
        records = read_records(sorted(self.audit_folder.glob("audit-*.jsonl")))
        return [r for r in records if r.get("event") == event]

    def delivered_metric(self) -> float:
        value = self.events.metrics.registry.get_sample_value(
            "gateway_messages_delivered_total", {"route": ROUTE})
        return value or 0.0

    def notifications(self) -> list[tuple[Envelope, bytes]]:
        return [self.spool.load(e.queue_id) for e in self.spool.entries()
                if e.envelope is not None and e.envelope.generated]


@pytest.fixture
async def queue(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Queue]:
    world = build_world(tmp_path / "world", retry="[10s, 20s]", give_up="1m")
    runtime = Runtime.load(world.config)
    disk, hop = Disk(), NextHop()
    now = [T0]
    spool = Spool(tmp_path / "spool", faults=SpoolFaults(disk.hook), clock=lambda: now[0])
    spool.open()
    audit = AuditTrail(tmp_path / "audit")
    audit.open()
    events = Events(Metrics(), audit)
    failing: dict[str, GatewayError] = {}
    monkeypatch.setattr(gateway.qmgr, "prepare", stub_prepare(failing))
    qm = QueueManager(spool, lambda: runtime, hop, events=events, clock=lambda: now[0])
    yield Queue(qm, spool, hop, disk, events, tmp_path / "audit", failing, now)
    spool.close()


# -- a disk that fails after the next hop's 250 --------------------------------------------------


async def test_disk_full_after_250_never_sends_again_and_the_spool_empties_once_it_heals(
    queue: Queue,
) -> None:
    queue.hop.replies[C] = DEFER  # so that the attempt must write a new state, not finish
    envelope = await queue.accept(B, C)
    queue.disk.failing = state_rewrite
    await queue.attempt(envelope)
    assert queue.hop.received == [B]
    assert queue.disk.hits == 1
    assert queue.spool.read_state(envelope.queue_id) == DeliveryState.initial(envelope)

    queue.later(10)  # C is due again; the disk is still full
    await queue.attempt(envelope)
    assert queue.hop.tried == [B, C, C]  # B is not sent the message again
    assert queue.disk.hits == 2

    queue.disk.failing = None  # space is back, and the next hop takes C
    del queue.hop.replies[C]
    queue.later(20)
    await queue.attempt(envelope)
    assert queue.hop.received == [B, C]
    assert list(queue.spool.entries()) == []
    assert queue.qm.unsaved == {}
    # One audit record and one count per delivery, not one per attempt to save it.
    assert [r["recipient"] for r in queue.audit("delivered")] == [B, C]
    assert queue.delivered_metric() == 2


async def test_removal_that_fails_after_250_is_retried_without_sending_again(
    queue: Queue,
) -> None:
    envelope = await queue.accept(B)
    queue.disk.code = errno.EIO
    queue.disk.failing = queue_file_removal
    await queue.attempt(envelope)
    assert queue.hop.received == [B]
    assert queue.spool.locate(envelope.queue_id) is not None  # the removal failed

    queue.later(queue.qm.persist_retry)
    await queue.attempt(envelope)  # only tries the removal again
    assert queue.hop.tried == [B]
    assert queue.disk.hits >= 2

    queue.disk.failing = None
    queue.later(queue.qm.persist_retry)
    await queue.attempt(envelope)
    assert list(queue.spool.entries()) == []
    assert queue.hop.tried == [B]
    assert len(queue.audit("delivered")) == 1
    assert queue.delivered_metric() == 1
    assert queue.qm.unsaved == {}


async def test_bounce_whose_dsn_cannot_be_queued_is_not_retried_and_reported_once(
    queue: Queue,
) -> None:
    queue.hop.replies[B] = BOUNCE
    envelope = await queue.accept(B)
    queue.disk.failing = any_write  # neither the DSN nor the state can be written
    await queue.attempt(envelope)
    assert queue.notifications() == []
    queue.later(queue.qm.persist_retry)
    await queue.attempt(envelope)
    assert queue.hop.tried == [B]

    queue.disk.failing = None
    queue.later(queue.qm.persist_retry)
    await queue.attempt(envelope)
    assert queue.hop.tried == [B]
    [(notice, body)] = queue.notifications()
    assert notice.recipients[0].address == SENDER
    assert b"Status: 5.1.1" in body
    assert queue.spool.locate(envelope.queue_id) is None  # only the DSN is left
    assert len(queue.audit("bounced")) == 1
    assert len(queue.audit("dsn")) == 1


async def test_after_a_restart_an_unsaved_delivery_is_sent_again_never_lost(
    queue: Queue,
) -> None:
    """The documented limit: what could not be saved is only in memory, so a new process
    recovers the older state and sends again (a duplicate, never a loss)."""
    queue.hop.replies[C] = DEFER
    envelope = await queue.accept(B, C)
    queue.disk.failing = state_rewrite
    await queue.attempt(envelope)
    queue.disk.failing = None
    restarted = QueueManager(queue.spool, queue.qm.runtime, queue.hop, clock=lambda: queue.now[0])
    assert restarted.recover() == 1
    await restarted.attempt(envelope.queue_id)
    assert queue.hop.received == [B, B]


# -- the retry schedule and the give-up time ---------------------------------------------------


async def test_last_interval_repeats_until_give_up_then_bounce_with_expired_record(
    queue: Queue,
) -> None:
    queue.hop.replies[B] = DEFER
    envelope = await queue.accept(B)
    waits = []
    for _ in range(10):
        await queue.attempt(envelope)
        if queue.spool.locate(envelope.queue_id) is None:
            break
        state = queue.spool.read_state(envelope.queue_id).get(B)
        assert state.status is Status.DEFERRED
        waits.append(state.next_attempt - queue.now[0])
        queue.now[0] = state.next_attempt
    # [10s, 20s] then 20s again; the last wait is cut to end at give_up_after (1 minute).
    assert waits == [10, 20, 20, 10]
    assert queue.now[0] == T0 + 60
    assert queue.hop.tried == [B] * 5
    [(_notice, body)] = queue.notifications()
    text = b" ".join(body.split())
    assert b"Action: failed" in text and b"Status: 5.4.7" in text
    assert b"gave up after 1 minute of failed attempts; last reply: 451 4.4.1" in text
    [expired] = queue.audit("expired")
    assert expired["recipient"] == B and expired["reason"] == "gave_up"
    assert expired["reply"].startswith("554 5.4.7 gave up after 1 minute")
    assert len(queue.audit("deferred")) == 4


async def test_give_up_sends_a_dsn_saying_after_how_long_end_to_end(
    tmp_path: Path,
) -> None:
    world = build_world(tmp_path, retry="[1s]", give_up="2s")
    async with start(world) as running:
        await world.sinks["hospital"].stop()  # down for good
        await running.send(SENDER, [B], message(SENDER, B))
        [dsn] = await world.sinks["clinic"].wait(timeout=30)
    assert b"gave up after 2 seconds" in b" ".join(dsn.data.split())
    events = [r["event"] for r in audit_records(world) if r.get("recipient") == B]
    assert events[-1] == "expired" and "deferred" in events and "delivered" not in events


# -- temporary failures found while preparing the message ----------------------------------------


def stale_crl() -> TemporaryFailure:
    return TemporaryFailure(
        "The revocation list of the recipient's CA is out of date; the message will be sent "
        "once it is refreshed", enhanced="4.7.5", reason=Reason.REVOCATION_UNKNOWN,
    )


async def test_temporary_failure_from_prepare_defers_on_schedule_then_delivers(
    queue: Queue,
) -> None:
    queue.failing[C] = stale_crl()
    envelope = await queue.accept(B, C)
    await queue.attempt(envelope)
    state = queue.spool.read_state(envelope.queue_id)
    assert state.get(B).status is Status.DELIVERED
    c = state.get(C)
    assert (c.status, c.attempts, c.next_attempt) == (Status.DEFERRED, 1, T0 + 10)
    assert (c.enhanced, c.reason) == ("4.7.5", "revocation_unknown")
    assert queue.hop.tried == [B]  # C is never sent while it cannot be prepared
    assert queue.notifications() == []  # deferred, not bounced (no DELAY asked)
    queue.later(10)
    await queue.attempt(envelope)
    assert queue.spool.read_state(envelope.queue_id).get(C).next_attempt == T0 + 30
    del queue.failing[C]  # the CRL was refreshed
    queue.later(20)
    await queue.attempt(envelope)
    assert queue.hop.received == [B, C]
    assert list(queue.spool.entries()) == []
    assert [r["reason"] for r in queue.audit("deferred")] == ["revocation_unknown"] * 2


@pytest.mark.parametrize("smtp_code", [451, 554], ids=["4xx", "5xx-code-on-a-temporary"])
async def test_temporary_failure_from_prepare_bounces_only_after_give_up(
    queue: Queue, smtp_code: int,
) -> None:
    failure = stale_crl()
    failure.smtp_code = smtp_code  # a TemporaryFailure defers whatever code it carries
    queue.failing[B] = failure
    envelope = await queue.accept(B, notify=("FAILURE", "DELAY"))
    await queue.attempt(envelope)
    assert queue.spool.read_state(envelope.queue_id).get(B).status is Status.DEFERRED
    [(_notice, delayed)] = queue.notifications()
    assert b"Action: delayed" in delayed and b"Status: 4.7.5" in delayed
    while queue.spool.locate(envelope.queue_id) is not None:
        queue.now[0] = queue.spool.read_state(envelope.queue_id).get(B).next_attempt
        await queue.attempt(envelope)
    assert queue.now[0] == T0 + 60
    assert queue.hop.tried == []
    failed = [body for _notice, body in queue.notifications() if b"Action: failed" in body]
    assert len(failed) == 1 and b"Status: 5.4.7" in failed[0]
    [expired] = queue.audit("expired")
    assert "revocation list" in " ".join(expired["reply"].split())


async def test_recipient_that_prepare_leaves_out_is_deferred_not_left_pending(
    queue: Queue, monkeypatch: pytest.MonkeyPatch,
) -> None:
    def forgetful(runtime: Runtime, envelope: Envelope, raw: bytes,
                  recipients: Sequence[Recipient], now: dt.datetime) -> Prepared:
        return Prepared(Verdict.unsigned(), False, (), (), {})

    monkeypatch.setattr(gateway.qmgr, "prepare", forgetful)
    envelope = await queue.accept(B)
    await queue.attempt(envelope)
    state = queue.spool.read_state(envelope.queue_id).get(B)
    assert (state.status, state.next_attempt, state.reason) == (
        Status.DEFERRED, T0 + 10, "internal")


async def test_recipient_that_prepare_failed_is_not_sent_even_if_a_batch_lists_it(
    queue: Queue, monkeypatch: pytest.MonkeyPatch,
) -> None:
    def contradictory(runtime: Runtime, envelope: Envelope, raw: bytes,
                      recipients: Sequence[Recipient], now: dt.datetime) -> Prepared:
        batch = Batch(runtime.config.networks["hospital"], tuple(recipients), raw)
        return Prepared(Verdict.unsigned(), False, (), (batch,), {C: stale_crl()})

    monkeypatch.setattr(gateway.qmgr, "prepare", contradictory)
    envelope = await queue.accept(B, C)
    await queue.attempt(envelope)
    assert queue.hop.tried == [B]
    assert queue.spool.read_state(envelope.queue_id).get(C).status is Status.DEFERRED


# -- a next hop out of step with SMTP ------------------------------------------------------------


async def test_rcpt_252_is_deferred_never_counted_as_delivered_end_to_end(tmp_path: Path) -> None:
    world = build_world(tmp_path, retry="[1s]")
    sink = world.sinks["hospital"]
    async with start(world) as running:
        sink.handler.rcpt_replies = {B: "252 2.1.5 Cannot VRFY user, but will accept message"}
        await running.send(SENDER, [B], message(SENDER, B))
        await until(lambda: any(r.get("event") == "deferred" for r in audit_records(world)))
        assert sink.messages == []
        assert [e.location for e in running.gateway.spool.entries()] in (["active"],
                                                                          ["deferred"])
        sink.handler.rcpt_replies = {}
        await sink.wait(1, timeout=30)
        await until(lambda: not list(running.gateway.spool.entries()))
    records = audit_records(world)
    [deferred, *_] = [r for r in records if r.get("event") == "deferred"]
    assert deferred["reply"].startswith("451 4.5.0")
    assert "answered RCPT TO with 252" in deferred["reply"]
    assert [r["event"] for r in records if r.get("event") in ("delivered", "deferred")][-1] == \
        "delivered"
    assert len([r for r in records if r.get("event") == "delivered"]) == 1
    assert len(sink.messages) == 1


class ScriptedHop:
    """A next hop speaking just enough SMTP, with the replies a test chooses. Records every
    line it reads (the gateway's commands) and every message it is sent."""

    def __init__(self, *, starttls: bytes | None = None, after_starttls: bytes = b"",
                 data: bytes = b"354 go ahead\r\n") -> None:
        self.starttls = starttls  # the reply to STARTTLS; None: not offered
        self.after_starttls = after_starttls  # bytes sent right after that reply
        self.data = data
        self.lines: list[bytes] = []
        self.messages: list[bytes] = []
        self.port = 0
        self.server: asyncio.Server | None = None

    @property
    def commands(self) -> list[bytes]:
        return [line.split(b" ", 1)[0].split(b":", 1)[0].strip().upper() for line in self.lines]

    async def start(self) -> ScriptedHop:
        self.server = await asyncio.start_server(self._session, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 hop.test ESMTP\r\n")
        try:
            while line := await reader.readline():
                self.lines.append(line)
                verb = line[:4].upper()
                if verb == b"EHLO":
                    offer = b"250-STARTTLS\r\n" if self.starttls is not None else b""
                    writer.write(b"250-hop.test\r\n" + offer + b"250 8BITMIME\r\n")
                elif verb == b"STAR" and self.starttls is not None:
                    writer.write(self.starttls)
                    if self.after_starttls:
                        # Once the client's handshake has begun, so that it reads these bytes
                        # as the server's answer (bytes already there at the 220 are dropped).
                        await writer.drain()
                        await reader.read(1)
                        writer.write(self.after_starttls)
                elif verb == b"DATA":
                    writer.write(self.data)
                    if self.data.startswith(b"354"):
                        content = b""
                        while not content.endswith(b"\r\n.\r\n"):
                            chunk = await reader.readline()
                            if not chunk:
                                return
                            content += chunk
                        self.messages.append(content)
                        writer.write(b"250 2.0.0 Ok: queued\r\n")
                elif verb == b"QUIT":
                    writer.write(b"221 bye\r\n")
                    return
                else:
                    writer.write(b"250 OK\r\n")
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()


@dataclass
class Tls:
    folder: Path
    ca: testpki.IgcSante
    anchor: Path
    client: ssl.SSLContext

    def server_context(self, issued: testpki.Issued, name: str) -> ssl.SSLContext:
        cert, key = self.folder / f"{name}.pem", self.folder / f"{name}.key"
        cert.write_bytes(issued.chain_pem())
        key.write_bytes(issued.key_pem)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        return context


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> Tls:
    folder = tmp_path_factory.mktemp("tls")
    ca = testpki.IgcSante.create()
    anchor = folder / "ca.pem"
    anchor.write_bytes(ca.root.cert_pem + ca.organisations.cert_pem)
    gateway_identity = ca.server("passerelle.test", dns=["passerelle.test"])
    cert, key = gateway_identity.write(folder, "gateway")
    cert.write_bytes(gateway_identity.chain_pem())
    return Tls(folder, ca, anchor, make_client_tls_context([anchor], cert, key))


@pytest.fixture
async def hops() -> AsyncIterator[Callable[..., Any]]:
    started: list[ScriptedHop] = []

    async def make(**kwargs: Any) -> ScriptedHop:
        hop = await ScriptedHop(**kwargs).start()
        started.append(hop)
        return hop

    yield make
    for hop in started:
        await hop.stop()


def relay_network(port: int, tls: str) -> NetworkSettings:
    return NetworkSettings(
        name="hospital", adapter="mime", domains=("chu-test.fr",), peers=PeerRule(),
        relay=RelaySettings(host="127.0.0.1", port=port, tls=tls),  # type: ignore[arg-type]
        limits=Limits(),
    )


async def deliver(context: ssl.SSLContext | None, port: int, tls_mode: str) -> Outcome:
    transport = SmtpTransport("passerelle.test", context, command_timeout=10,
                              connect_timeout=10)
    try:
        [outcome] = await transport.send(relay_network(port, tls_mode), SENDER,
                                         [Recipient(B, "hospital")], message(SENDER, B),
                                         envid=None, ret=None)
    finally:
        await transport.close()
    return outcome


@pytest.mark.parametrize("reply", [b"250 OK\r\n", b"220 2.0.0 Ready\r\n"], ids=["250", "220"])
async def test_data_command_answered_with_a_success_but_not_354_is_never_a_delivery(
    hops: Callable[..., Any], reply: bytes,
) -> None:
    """The message was never sent: a 2xx to DATA itself must not read as its acceptance."""
    hop = await hops(data=reply)
    outcome = await deliver(None, hop.port, "none")
    assert (outcome.kind, outcome.code, outcome.enhanced, outcome.reason) == (
        "deferred", 451, "4.5.0", Reason.NEXT_HOP_UNAVAILABLE)
    assert f"answered DATA with {reply[:3].decode()}" in outcome.text
    assert hop.messages == []


# -- TLS towards the next hop: no downgrade ------------------------------------------------------


@pytest.mark.parametrize("tls_mode", ["required", "opportunistic"])
@pytest.mark.parametrize(("reply", "after"), [
    (b"454 4.7.0 TLS not available due to temporary reason\r\n", b""),
    (b"502 5.5.1 Not implemented\r\n", b""),
    (b"250 OK, no TLS today\r\n", b""),
    (b"garbage instead of a reply\r\n", b""),
    (b"220 2.0.0 Ready to start TLS\r\n", b"this is not a TLS handshake\r\n"),
], ids=["454", "5xx", "250", "unreadable", "220-then-garbage"])
async def test_starttls_offered_then_not_started_never_sends_in_clear(
    tls: Tls, hops: Callable[..., Any], tls_mode: str, reply: bytes, after: bytes,
) -> None:
    hop = await hops(starttls=reply, after_starttls=after)
    outcome = await deliver(tls.client, hop.port, tls_mode)
    assert outcome.kind == "deferred", outcome
    assert outcome.reason in (Reason.NEXT_HOP_UNAVAILABLE, Reason.NEXT_HOP_UNTRUSTED)
    assert "nothing was sent" in outcome.text or "during STARTTLS" in outcome.text
    assert b"MAIL" not in hop.commands and b"RCPT" not in hop.commands
    assert hop.messages == []


@pytest.mark.parametrize("tls_mode", ["required", "opportunistic"])
async def test_peer_dropping_starttls_from_ehlo(
    tls: Tls, hops: Callable[..., Any], tls_mode: str,
) -> None:
    """Required: defer, never clear text. Opportunistic: clear text is what it allows when
    STARTTLS is not offered, and only then."""
    hop = await hops(starttls=None)
    outcome = await deliver(tls.client, hop.port, tls_mode)
    if tls_mode == "required":
        assert (outcome.kind, outcome.enhanced) == ("deferred", "4.7.4")
        assert b"MAIL" not in hop.commands and hop.messages == []
    else:
        assert outcome.kind == "delivered"
        assert len(hop.messages) == 1


@dataclass
class TlsSink:
    sink: Sink
    plain_after_first: bool = False

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        sink = self.sink

        def factory() -> SMTP:
            sink.handler.connections += 1
            offered = sink.tls if sink.handler.connections == 1 or not self.plain_after_first \
                else None
            protocol = SMTP(sink.handler, hostname="sink.hop", decode_data=False,
                            tls_context=offered, require_starttls=False)
            sink.protocols.append(protocol)
            return protocol

        sink.server = await loop.create_server(factory, "127.0.0.1", sink.port)


@pytest.fixture
async def tls_sinks() -> AsyncIterator[Callable[..., Any]]:
    started: list[Sink] = []

    async def make(context: ssl.SSLContext, *, plain_after_first: bool = False) -> Sink:
        sink = Sink("hop", context)
        await TlsSink(sink, plain_after_first).start()
        started.append(sink)
        return sink

    yield make
    for sink in started:
        await sink.stop()


@pytest.mark.parametrize("certificate", ["expired", "untrusted", "wrong-name"])
async def test_required_tls_with_a_bad_certificate_is_deferred_and_nothing_sent(
    tls: Tls, tls_sinks: Callable[..., Any], certificate: str,
) -> None:
    now = testpki.NOW
    if certificate == "expired":
        issued = tls.ca.server("mx.hop.test", ips=["127.0.0.1"],
                               not_before=now - dt.timedelta(days=60),
                               not_after=now - dt.timedelta(days=1))
    elif certificate == "untrusted":
        issued = testpki.IgcSante.create().server("mx.hop.test", ips=["127.0.0.1"])
    else:
        issued = tls.ca.server("mx.elsewhere.test")  # no 127.0.0.1 in its names
    sink = await tls_sinks(tls.server_context(issued, certificate))
    outcome = await deliver(tls.client, sink.port, "required")
    assert (outcome.kind, outcome.enhanced, outcome.reason) == (
        "deferred", "4.7.5", Reason.NEXT_HOP_UNTRUSTED)
    assert "not trusted" in outcome.text and "nothing was sent" in outcome.text
    assert sink.messages == []


async def test_opportunistic_reconnection_without_starttls_is_deferred_not_sent_in_clear(
    tls: Tls, tls_sinks: Callable[..., Any],
) -> None:
    """After a failed verification, opportunistic reconnects to encrypt without verifying; a
    next hop (or a man in the middle) that then stops offering STARTTLS gets nothing."""
    stranger = testpki.IgcSante.create().server("mx.hop.test", ips=["127.0.0.1"])
    sink = await tls_sinks(tls.server_context(stranger, "stranger"), plain_after_first=True)
    outcome = await deliver(tls.client, sink.port, "opportunistic")
    assert outcome.kind == "deferred"
    assert "stopped offering STARTTLS" in outcome.text
    assert sink.handler.connections == 2
    assert sink.messages == []


# -- helpers -------------------------------------------------------------------------------------


def audit_records(world: World) -> list[dict[str, Any]]:
    folder = world.root / "var" / "audit"
    return list(read_records(sorted(folder.glob("audit-*.jsonl"))))


async def until(condition: Callable[[], bool], timeout: float = 20.0) -> None:
    """Wait for `condition` (bounded, so a regression fails instead of hanging)."""
    async def poll() -> None:
        while not condition():
            await asyncio.sleep(0.05)
    await asyncio.wait_for(poll(), timeout)
