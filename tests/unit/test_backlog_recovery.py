"""Recovery of a backlog at start: the queue manager schedules every message of active/ and
deferred/ from a thread of its own, a chunk at a time, while the event loop keeps serving;
nothing in the spool is left unscheduled, nothing is scheduled later than its state says, and
new mail accepted meanwhile is delivered once.

The queue manager runs over a real spool, the plain pipeline and a next hop double (no
sockets); a seam on `Spool.read_state` lets a test hold recovery in the middle."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from unittest import mock

import pytest

from gateway import qmgr as qmgr_module
from gateway.config import NetworkSettings
from gateway.delivery import Outcome
from gateway.envelope import DeliveryState, Envelope, Peer, Recipient, RecipientState, Status
from gateway.errors import Reason
from gateway.events import Events, Metrics
from gateway.qmgr import QueueManager
from gateway.runtime import Runtime
from gateway.spool import LOCATIONS, Spool
from tests.support.world import build_world, message

SENDER = "a@clinique-test.fr"
B = "b@chu-test.fr"
AWAY = 30 * 86400.0


# -- a backlog ----------------------------------------------------------------------------------


@dataclass
class Backlog:
    """What was seeded: queue id -> when its state says it is due."""

    due: dict[str, float] = field(default_factory=dict)
    later: list[str] = field(default_factory=list)  # deferred, due in 30 days
    overdue: list[str] = field(default_factory=list)  # in deferred/, due before now
    active: list[str] = field(default_factory=list)  # in active/, never attempted
    held: list[str] = field(default_factory=list)


def envelope_for(spool: Spool, tag: str, received_at: float) -> tuple[Envelope, bytes]:
    raw = message(SENDER, B, subject=tag, body=f"{tag}\r\n")
    envelope = Envelope(spool.new_queue_id(), SENDER, (Recipient(B, "hospital"),), "clinic",
                        Peer("127.0.0.1"), received_at, len(raw), message_id=f"<{tag}@test>")
    return envelope, raw


@contextlib.contextmanager
def without_fsync() -> Iterator[None]:
    """Seeding only: what a backlog test needs is the files, not their durability (flushed
    once at the end)."""
    with mock.patch.object(os, "fsync", lambda fd: None):
        yield
    os.sync()


async def seed(root: Path, *, later: int = 0, overdue: int = 0, active: int = 0,
               held: int = 0, now: float | None = None) -> Backlog:
    """A stopped gateway's spool: `later` messages deferred for 30 days, then `overdue`
    deferred ones whose time came while it was down (the newest, so recovery reaches them
    last), `active` ones accepted just before it stopped, `held` ones on hold."""
    now = time.time() if now is None else now
    backlog = Backlog()
    # Filed by a spool whose clock is an hour behind: an overdue message stays in deferred/,
    # as it does when its time comes while the gateway is down.
    spool = Spool(root, clock=lambda: now - 3600.0)
    spool.open()
    try:
        with without_fsync():
            for kind, count in (("later", later), ("overdue", overdue), ("held", held),
                                ("active", active)):
                for start in range(0, count, 256):
                    batch = [envelope_for(spool, f"{kind}-{index}", now - 60.0)
                             for index in range(start, min(count, start + 256))]
                    await asyncio.gather(*(spool.enqueue(e, raw) for e, raw in batch))
                    await asyncio.to_thread(_file, spool, kind, batch, now, backlog)
    finally:
        spool.close()
    return backlog


def _file(spool: Spool, kind: str, batch: Sequence[tuple[Envelope, bytes]], now: float,
          backlog: Backlog) -> None:
    for envelope, _raw in batch:
        queue_id = envelope.queue_id
        if kind == "active":
            backlog.active.append(queue_id)
            backlog.due[queue_id] = 0.0  # the initial state: due at once
            continue
        when = now + AWAY if kind == "later" else now - 10.0
        state = DeliveryState.initial(envelope).update(
            B, status=Status.DEFERRED, attempts=1, next_attempt=when,
            last_reply="451 4.4.1 Try again later", enhanced="4.4.1")
        assert spool.write_state(queue_id, state) == "deferred"
        if kind == "held":
            spool.hold(queue_id)
            backlog.held.append(queue_id)
            continue
        backlog.due[queue_id] = when
        (backlog.later if kind == "later" else backlog.overdue).append(queue_id)


def folder_counts(root: Path) -> dict[str, int]:
    counts = {}
    for location in LOCATIONS:
        folder = root / location
        names = os.listdir(folder) if folder.exists() else []
        counts[location] = sum(1 for name in names if "." not in name)
    return counts


# -- the queue manager --------------------------------------------------------------------------


class Hop:
    """A `Transport` double: 250 for every recipient, or the reply in `replies`."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []
        self.replies: dict[str, Outcome] = {}

    async def send(self, network: NetworkSettings, sender: str,
                   recipients: Sequence[Recipient], message: bytes, *, envid: str | None,
                   ret: str | None) -> list[Outcome]:
        outcomes = []
        for recipient in recipients:
            reply = self.replies.get(recipient.address)
            if reply is not None:
                outcomes.append(reply)
                continue
            self.sent.append(message)
            outcomes.append(Outcome(recipient.address, "delivered", 250, "2.0.0", "Ok", None))
        return outcomes

    def tags(self) -> list[str]:
        return [m.rsplit(b"\r\n\r\n", 1)[1].strip().decode() for m in self.sent]


DEFERRED = Outcome(B, "deferred", 451, "4.4.1", "Try again later", Reason.NEXT_HOP_UNAVAILABLE)


class Reads:
    """A seam on `Spool.read_state`: records the threads it ran on, and can hold the reader
    before a given queue id until `release` (bounded, so a test never hangs)."""

    def __init__(self, spool: Spool) -> None:
        self.threads: set[int] = set()
        self.calls = 0
        self.hold_at: str | None = None
        self.entered = threading.Event()
        self.released = threading.Event()
        self.fail: dict[str, OSError] = {}
        self._read = spool.read_state

    def __call__(self, queue_id: str) -> DeliveryState:
        self.threads.add(threading.get_ident())
        self.calls += 1
        if queue_id == self.hold_at:
            self.entered.set()
            self.released.wait(30)
        if queue_id in self.fail:
            raise self.fail[queue_id]
        return self._read(queue_id)

    def release(self) -> None:
        self.released.set()

    async def wait_entered(self) -> None:
        assert await asyncio.to_thread(self.entered.wait, 30), "recovery never got there"


@dataclass
class Manager:
    qm: QueueManager
    spool: Spool
    hop: Hop
    events: Events
    reads: Reads
    root: Path
    runtime: Runtime
    others: list[QueueManager] = field(default_factory=list)

    async def accept(self, tag: str) -> Envelope:
        envelope, raw = envelope_for(self.spool, tag, time.time())
        await self.spool.enqueue(envelope, raw)
        self.qm.accepted(envelope, raw)
        return envelope

    def gauge(self) -> dict[str, int]:
        registry = self.events.metrics.registry
        return {state: int(registry.get_sample_value("gateway_queue_messages",
                                                     {"state": state}) or 0)
                for state in LOCATIONS}

    def restarted(self, **kwargs: float) -> QueueManager:
        """Another queue manager on the same spool, as after a restart."""
        qm = QueueManager(self.spool, lambda: self.runtime, self.hop, events=self.events,
                          **kwargs)
        self.others.append(qm)
        return qm


@pytest.fixture
def world_config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_world(tmp_path_factory.mktemp("world")).config


@pytest.fixture
async def manager(tmp_path: Path, world_config: Path,
                  monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Manager]:
    runtime = Runtime.load(world_config)
    root = tmp_path / "spool"
    spool = Spool(root)
    spool.open()
    reads = Reads(spool)
    monkeypatch.setattr(spool, "read_state", reads)
    hop = Hop()
    events = Events(Metrics())
    qm = QueueManager(spool, lambda: runtime, hop, events=events)
    made = Manager(qm, spool, hop, events, reads, root, runtime)
    yield made
    for each in (qm, *made.others):
        await each.stop(1)
        each.workers.threads.close()
    spool.close()


async def until(condition: Callable[[], bool], timeout: float = 30.0) -> None:
    async def poll() -> None:
        while not condition():
            await asyncio.sleep(0.02)
    await asyncio.wait_for(poll(), timeout)


@contextlib.asynccontextmanager
async def running(qm: QueueManager) -> AsyncIterator[None]:
    task = asyncio.create_task(qm.run())
    try:
        yield
    finally:
        await qm.stop(5)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


# -- tests --------------------------------------------------------------------------------------


async def test_recovery_schedules_every_message_of_the_backlog_at_the_time_its_state_says(
    manager: Manager,
) -> None:
    backlog = await seed(manager.root, later=300, overdue=3, active=2, held=2)
    manager.qm.prepare_recovery()
    assert await manager.qm.recover_in_background() == 305
    assert manager.qm.scheduled == backlog.due  # held mail is not scheduled


async def test_recovery_reads_the_spool_in_a_thread_a_chunk_at_a_time(
    manager: Manager, monkeypatch: pytest.MonkeyPatch,
) -> None:
    await seed(manager.root, later=3 * qmgr_module.RECOVERY_CHUNK + 5)
    chunks: list[int] = []
    schedule_all = manager.qm._schedule_all

    def counted(chunk: Sequence[tuple[str, float]]) -> None:
        chunks.append(len(chunk))
        schedule_all(chunk)

    monkeypatch.setattr(manager.qm, "_schedule_all", counted)
    turns = 0

    async def meanwhile() -> None:
        nonlocal turns
        while True:
            turns += 1
            await asyncio.sleep(0)

    ticker = asyncio.create_task(meanwhile())
    manager.qm.prepare_recovery()
    await manager.qm.recover_in_background()
    ticker.cancel()
    assert threading.get_ident() not in manager.reads.threads  # never on the event loop
    assert manager.reads.threads
    assert len(chunks) == 4 and max(chunks) == qmgr_module.RECOVERY_CHUNK
    assert turns > len(chunks)  # the loop ran other work between the chunks


async def test_new_mail_accepted_during_recovery_is_delivered_once_and_the_backlog_after(
    manager: Manager,
) -> None:
    backlog = await seed(manager.root, later=200, overdue=2)
    manager.reads.hold_at = backlog.later[100]  # recovery stops half way through
    manager.qm.prepare_recovery()
    async with running(manager.qm):
        recovery = asyncio.create_task(manager.qm.recover_in_background())
        await manager.reads.wait_entered()
        fresh = await manager.accept("fresh")
        await until(lambda: manager.hop.tags() == ["fresh"])
        assert manager.spool.locate(fresh.queue_id) is None
        assert not recovery.done()
        manager.reads.release()
        assert await recovery == 202
        await until(lambda: sorted(manager.hop.tags()) == ["fresh", "overdue-0", "overdue-1"])
        await until(lambda: not manager.qm.running)
    assert sorted(manager.hop.tags()) == ["fresh", "overdue-0", "overdue-1"]  # each once
    assert folder_counts(manager.root)["deferred"] == 200


async def test_a_message_moved_or_attempted_while_recovery_reads_is_never_put_off(
    manager: Manager,
) -> None:
    """Recovery may read a state older than the message's: it can only bring an attempt
    forward, never put one off, and an early attempt finds nothing due."""
    backlog = await seed(manager.root, later=3)
    first = backlog.later[0]
    manager.qm.schedule(first, 5.0)  # e.g. an operator's retry seen before recovery got there
    manager.qm.prepare_recovery()
    await manager.qm.recover_in_background()
    assert manager.qm.scheduled[first] == 5.0
    assert manager.qm.scheduled[backlog.later[1]] == backlog.due[backlog.later[1]]


async def test_damaged_files_found_by_recovery_or_by_the_attempt_go_to_corrupt(
    manager: Manager,
) -> None:
    backlog = await seed(manager.root, later=2, overdue=1)
    damaged, swapped = backlog.later[0], backlog.overdue[0]
    state_file = manager.root / "state" / f"{damaged}.state"
    state_file.write_bytes(state_file.read_bytes()[:-3])
    # A state file that does not list the envelope's recipients: recovery reads only the
    # state, so it is the attempt that must refuse it.
    manager.spool.write_state(swapped, DeliveryState((RecipientState("z@chu-test.fr"),)))
    manager.qm.prepare_recovery()
    await manager.qm.recover_in_background()
    assert manager.spool.locate(damaged) == "corrupt"
    assert damaged not in manager.qm.scheduled
    await manager.qm.attempt(swapped)
    assert manager.spool.locate(swapped) == "corrupt"
    assert manager.hop.sent == []
    why = (manager.root / "corrupt" / f"{swapped}.why").read_text()
    assert "does not list the envelope's recipients" in why


async def test_incoming_is_cleared_before_serving_and_orphan_states_after_recovery(
    manager: Manager,
) -> None:
    backlog = await seed(manager.root, later=3)
    stale = manager.root / "incoming" / "0123456789ABCDEFGHJ"
    stale.write_bytes(b"never got a 250")
    orphan = manager.root / "state" / "0123456789ABCDEFGHK.state"
    orphan.write_bytes(b"its message was finished")
    manager.qm.prepare_recovery()
    assert list((manager.root / "incoming").iterdir()) == []
    await manager.qm.recover_in_background()
    assert not orphan.exists()
    assert {p.name for p in (manager.root / "state").iterdir()} == {
        f"{queue_id}.state" for queue_id in backlog.later}


async def test_an_unreadable_message_stays_where_it_is_and_is_looked_at_again(
    manager: Manager,
) -> None:
    backlog = await seed(manager.root, later=2)
    victim = backlog.later[1]
    manager.reads.fail[victim] = OSError(errno.EIO, "Input/output error")
    manager.qm.prepare_recovery()
    before = time.time()
    await manager.qm.recover_in_background()
    assert manager.spool.locate(victim) == "deferred"
    assert before + qmgr_module.READ_RETRY <= manager.qm.scheduled[victim]
    assert manager.qm.scheduled[victim] <= time.time() + qmgr_module.READ_RETRY


async def test_stop_ends_recovery_and_the_next_start_recovers_everything(
    manager: Manager,
) -> None:
    backlog = await seed(manager.root, later=300)
    manager.reads.hold_at = backlog.later[10]
    manager.qm.prepare_recovery()
    recovery = asyncio.create_task(manager.qm.recover_in_background())
    await manager.reads.wait_entered()
    stopping = asyncio.create_task(manager.qm.stop(1))
    manager.reads.release()
    await stopping  # the recovery thread is done, not left reading
    recovery.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await recovery
    assert manager.reads.calls <= 11 + qmgr_module.RECOVERY_CHUNK
    assert len(manager.qm.scheduled) < 300
    again = manager.restarted()
    again.prepare_recovery()
    assert await again.recover_in_background() == 300
    assert again.scheduled == backlog.due


async def test_new_mail_does_not_list_the_backlog(manager: Manager) -> None:
    """Per message, scheduling is a heap: once recovered, a backlog is never listed or read
    again for new mail (only requests/, the operators' drop box, is polled)."""
    await seed(manager.root, later=300)
    manager.qm.prepare_recovery()
    await manager.qm.recover_in_background()
    async with running(manager.qm):
        await until(lambda: manager.gauge()["deferred"] == 300)  # the first recount is done
        listed: list[str] = []
        listdir, scandir = os.listdir, os.scandir

        def counted_listdir(path: str | os.PathLike[str] = ".") -> list[str]:
            listed.append(os.fspath(path))
            return listdir(path)

        def counted_scandir(path: str | os.PathLike[str] = ".") -> Iterator[os.DirEntry[str]]:
            listed.append(os.fspath(path))
            return scandir(path)

        reads = manager.reads.calls
        with mock.patch.object(os, "listdir", counted_listdir), \
                mock.patch.object(os, "scandir", counted_scandir), \
                mock.patch.object(manager.spool, "entries", None):  # would fail if called
            for index in range(5):
                await manager.accept(f"new-{index}")
            await until(lambda: len(manager.hop.sent) == 5)
            await until(lambda: not manager.qm.running)
    assert {Path(path).name for path in listed} <= {"requests"}
    assert manager.reads.calls == reads  # delivered from memory, the backlog not touched


async def test_recovery_after_a_deferral_files_the_message_where_its_state_says(
    manager: Manager,
) -> None:
    """A message deferred by this process is recovered at its retry time, not at once."""
    manager.hop.replies[B] = DEFERRED
    envelope = await manager.accept("deferred-once")
    await manager.qm.attempt(envelope.queue_id)
    state = manager.spool.read_state(envelope.queue_id)
    again = manager.restarted()
    assert again.recover() == 1
    assert again.scheduled == {envelope.queue_id: state.next_attempt()}
