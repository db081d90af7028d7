"""What a message costs the disk, counted through the spool's fault seam and counters: one file
fsync and a share of one fsync of active/ before its 250, no state file until an attempt
changes the state, and a share of one folder fsync when it leaves; and that the sharing never
releases a caller before an fsync that covers its own change has returned."""

from __future__ import annotations

import asyncio
import errno
import os
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from gateway.envelope import DeliveryState, Envelope, Peer, Recipient
from gateway.errors import TemporaryFailure
from gateway.spool import CorruptQueueFile, NoSuchMessage, Operation, Spool, SpoolFaults

KEY = bytes(range(32))
T0 = 1_795_000_000.0


def make_envelope(spool: Spool, size: int) -> Envelope:
    return Envelope(
        queue_id=spool.new_queue_id(), sender="dr.martin@clinique-test.fr",
        recipients=(Recipient("b@chu-test.fr", "hospital"),), source_network="medecin",
        peer=Peer("192.0.2.7", 25, "mx.clinique-test.fr", True), received_at=T0, size=size,
        message_id="<m1@clinique-test.fr>",
    )


def content(size: int) -> bytes:
    return (b"Subject: compte rendu\r\n\r\n" + b"x" * 76 + b"\r\n") * (size // 104 + 1)


class Journal:
    """Every operation the spool announces through its seam, in order, as (operation, path
    relative to the spool root)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.seen: list[tuple[Operation, str]] = []
        self.lock = threading.Lock()
        self.before: Callable[[Operation, Path], None] | None = None

    def hook(self, operation: Operation, path: Path) -> None:
        if self.before is not None:
            self.before(operation, path)
        with self.lock:
            self.seen.append((operation, str(path.relative_to(self.root))))

    def take(self) -> list[tuple[Operation, str]]:
        with self.lock:
            seen, self.seen = self.seen, []
        return seen


def files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


@pytest.mark.parametrize("key", [None, KEY], ids=["plain", "encrypted"])
async def test_an_enqueue_costs_one_file_fsync_and_one_fsync_of_active(
    tmp_path: Path, key: bytes | None, monkeypatch: pytest.MonkeyPatch,
) -> None:
    journal = Journal(tmp_path)
    spool = Spool(tmp_path, key, faults=SpoolFaults(journal.hook))
    spool.open()
    writes = [0]
    writev = os.writev

    def counting_writev(fd: int, buffers: list[memoryview]) -> int:
        writes[0] += 1
        return writev(fd, buffers)

    monkeypatch.setattr(os, "writev", counting_writev)
    envelope = make_envelope(spool, 3 * 1024 * 1024)
    data = content(3 * 1024 * 1024)
    journal.take()
    before = (spool.stats.file_fsyncs, spool.stats.dir_fsyncs)
    await spool.enqueue(envelope, data)
    qid = envelope.queue_id
    assert journal.take() == [
        ("write", f"incoming/{qid}"), ("fsync", f"incoming/{qid}"),
        ("rename", f"active/{qid}"), ("fsync_dir", "active"),
    ]
    assert writes[0] == 1  # the whole queue file in one writev(2)
    assert (spool.stats.file_fsyncs, spool.stats.dir_fsyncs) == (before[0] + 1, before[1] + 1)
    # No state file: the initial state is rebuilt from the envelope.
    assert [p.relative_to(tmp_path).as_posix() for p in files(tmp_path)] == [f"active/{qid}"]
    recovered = Spool(tmp_path, key)
    [entry] = recovered.recover()
    assert entry.state == DeliveryState.initial(envelope)
    assert recovered.load(qid) == (envelope, data)


async def test_finish_fsyncs_the_folder_then_drops_the_state_file_without_fsync(
    tmp_path: Path,
) -> None:
    journal = Journal(tmp_path)
    spool = Spool(tmp_path, faults=SpoolFaults(journal.hook))
    spool.open()
    plain = make_envelope(spool, 100)
    await spool.enqueue(plain, content(100))
    attempted = make_envelope(spool, 100)
    await spool.enqueue(attempted, content(100))
    spool.write_state(attempted.queue_id, DeliveryState.initial(attempted).update(
        "b@chu-test.fr", attempts=1))
    journal.take()
    spool.finish(plain.queue_id)
    assert journal.take() == [
        ("unlink", f"active/{plain.queue_id}"), ("fsync_dir", "active"),
        ("unlink", f"state/{plain.queue_id}.state"),
    ]
    spool.finish(attempted.queue_id)
    # The state file goes last, once the queue file's removal is durable: a crash in between
    # leaves an orphan, never a queue file without its state.
    assert journal.take() == [
        ("unlink", f"active/{attempted.queue_id}"), ("fsync_dir", "active"),
        ("unlink", f"state/{attempted.queue_id}.state"),
    ]
    assert files(tmp_path) == []
    assert spool.stats.removed == 2


async def test_a_state_file_left_by_an_interrupted_finish_is_an_orphan_for_recovery(
    tmp_path: Path,
) -> None:
    broken = [False]

    def hook(operation: Operation, path: Path) -> None:
        if broken[0] and operation == "unlink" and path.parent.name == "state":
            raise OSError(errno.EIO, "Input/output error", str(path))

    spool = Spool(tmp_path, faults=SpoolFaults(hook))
    spool.open()
    envelope = make_envelope(spool, 100)
    await spool.enqueue(envelope, content(100))
    spool.write_state(envelope.queue_id, DeliveryState.initial(envelope).update(
        "b@chu-test.fr", attempts=1))
    broken[0] = True
    with pytest.raises(OSError):
        spool.finish(envelope.queue_id)
    assert spool.locate(envelope.queue_id) is None  # durably gone: never delivered again
    assert Spool(tmp_path).recover() == []
    assert files(tmp_path) == []


async def test_concurrent_finishes_share_one_fsync_of_the_folder(tmp_path: Path) -> None:
    count = 12
    gone = threading.Event()
    held = [True]  # armed once the messages are in

    def hook(operation: Operation, path: Path) -> None:
        # Hold the first fsync of active/ until every queue file is unlinked: one more fsync
        # must then release every remaining removal, whatever the machine's speed.
        if operation == "fsync_dir" and path.name == "active" and not held[0]:
            held[0] = True
            gone.wait(30)

    spool = Spool(tmp_path, faults=SpoolFaults(hook))
    spool.open()
    sent = []
    for _ in range(count):
        envelope = make_envelope(spool, 100)
        await spool.enqueue(envelope, content(100))
        sent.append(envelope.queue_id)
    held[0] = False  # armed
    before = spool.stats.dir_fsyncs

    def watch() -> None:
        while os.listdir(tmp_path / "active"):
            threading.Event().wait(0.01)
        gone.set()

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        threads = [threading.Thread(target=spool.finish, args=(qid,)) for qid in sent]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
    finally:
        gone.set()
        watcher.join(60)
    assert spool.stats.dir_fsyncs - before == 2
    assert spool.stats.removed == count
    assert files(tmp_path) == []


async def test_enqueues_and_removals_share_the_fsync_of_active(tmp_path: Path) -> None:
    changes = [0]
    lock = threading.Lock()
    all_done = threading.Event()
    held = [True]  # armed once the first message is in

    def hook(operation: Operation, path: Path) -> None:
        if operation in ("rename", "unlink") and path.parent.name == "active":
            with lock:
                changes[0] += 1
                if changes[0] == 3:
                    all_done.set()
        if operation == "fsync_dir" and path.name == "active" and not held[0]:
            held[0] = True
            all_done.wait(30)

    spool = Spool(tmp_path, faults=SpoolFaults(hook))
    spool.open()
    first = make_envelope(spool, 100)
    await spool.enqueue(first, content(100))
    held[0], changes[0] = False, 0  # armed
    before = spool.stats.dir_fsyncs
    second, third = make_envelope(spool, 100), make_envelope(spool, 100)
    # A removal from a worker thread (as the queue manager makes it) and two enqueues: the
    # first fsync covers whichever change came first, one more covers the two others.
    await asyncio.gather(asyncio.to_thread(spool.finish, first.queue_id),
                         spool.enqueue(second, content(100)),
                         spool.enqueue(third, content(100)))
    assert spool.stats.dir_fsyncs - before == 2
    assert sorted(e.queue_id for e in Spool(tmp_path).recover()) == sorted(
        [second.queue_id, third.queue_id])


async def test_a_failed_shared_fsync_fails_every_change_it_was_to_cover(
    tmp_path: Path,
) -> None:
    count = 8
    published = [0]
    lock = threading.Lock()
    all_in = threading.Event()
    rounds = [0]

    def hook(operation: Operation, path: Path) -> None:
        if operation == "rename" and path.parent.name == "active":
            with lock:
                published[0] += 1
                if published[0] == count:
                    all_in.set()
        if operation == "fsync_dir" and path.name == "active":
            with lock:
                rounds[0] += 1
                this = rounds[0]
            if this == 1:  # held until the other messages wait for the next fsync
                all_in.wait(30)
            elif this == 2:  # which fails
                raise OSError(errno.EIO, "Input/output error", str(path))

    spool = Spool(tmp_path, faults=SpoolFaults(hook), workers=count)
    spool.open()
    envelopes = [make_envelope(spool, 100) for _ in range(count)]
    results = await asyncio.gather(*(spool.enqueue(e, content(100)) for e in envelopes),
                                   return_exceptions=True)
    failed = [e for e, r in zip(envelopes, results, strict=True) if r is not None]
    assert all(isinstance(r, TemporaryFailure) for r in results if r is not None)
    # Every message that waited for the failed fsync gets its 451 (the peer sends it again),
    # none is released by a later fsync: all but the first, or all but two if the last rename
    # had not yet joined when the failed fsync began.
    assert count - 2 <= len(failed) <= count - 1
    assert spool.stats.enqueued == count - len(failed)
    assert {e.queue_id for e in Spool(tmp_path).recover()} == {
        e.queue_id for e in envelopes if e not in failed}


@pytest.mark.parametrize("key", [None, KEY], ids=["plain", "encrypted"])
async def test_load_with_state_reads_what_load_and_read_state_read(
    tmp_path: Path, key: bytes | None,
) -> None:
    spool = Spool(tmp_path, key)
    spool.open()
    fresh, attempted, damaged = (make_envelope(spool, 2000) for _ in range(3))
    for envelope in (fresh, attempted, damaged):
        await spool.enqueue(envelope, content(2000))
    spool.write_state(attempted.queue_id, DeliveryState.initial(attempted).update(
        "b@chu-test.fr", attempts=1))
    for envelope in (fresh, attempted):
        qid = envelope.queue_id
        assert spool.load_with_state(qid) == (*spool.load(qid), spool.read_state(qid))
    assert spool.load_with_state(fresh.queue_id)[2] == DeliveryState.initial(fresh)
    (tmp_path / "state" / f"{damaged.queue_id}.state").write_bytes(b"PSST\x01\x00garbage")
    with pytest.raises(CorruptQueueFile, match="state file"):
        spool.load_with_state(damaged.queue_id)
    spool.finish(fresh.queue_id)
    with pytest.raises(NoSuchMessage):
        spool.load_with_state(fresh.queue_id)
