"""The plain relay's commit before a 250, with the spool and the audit trail alone (no sockets):
one worker-thread hop does the spool's fsyncs and then the audit fsync of the record the event
loop wrote meanwhile (`Alongside`); a failure at any step of the commit gives no 250 and leaves
nothing to deliver; the audit trail's fsync is shared by concurrent threads, and a failed one
fails every caller it was to cover; a folder fsync is one system call on a long-lived
descriptor; new queue ids sort after every id already in the spool, which is what lets the
enqueue rename without looking first."""

from __future__ import annotations

import asyncio
import errno
import os
import threading
from pathlib import Path

import pytest

import gateway.audit
from gateway.audit import AuditTrail, verify
from gateway.envelope import Envelope, Peer, Recipient
from gateway.errors import TemporaryFailure
from gateway.spool import Operation, Spool, SpoolFaults

T0 = 1_795_000_000.0
STEPS: list[Operation] = ["write", "fsync", "rename", "fsync_dir"]


def make_envelope(queue_id: str) -> Envelope:
    return Envelope(
        queue_id=queue_id, sender="dr.martin@clinique-test.fr",
        recipients=(Recipient("b@chu-test.fr", "hospital"),), source_network="clinic",
        peer=Peer("192.0.2.7", 25, "mx.clinique-test.fr", True), received_at=T0, size=100,
    )


def files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


class Recorder:
    """An `Alongside` that notes the thread and the moment of each call among the spool's
    operations (`log`, shared with the fault seam)."""

    def __init__(self, log: list[tuple[str, int]], fail_sync: bool = False) -> None:
        self.log = log
        self.fail_sync = fail_sync

    def write(self) -> None:
        self.log.append(("alongside.write", threading.get_ident()))

    def sync(self) -> None:
        self.log.append(("alongside.sync", threading.get_ident()))
        if self.fail_sync:
            raise RuntimeError("a defect in the caller's step")


async def test_the_worker_thread_syncs_alongside_once_the_message_is_durable(
    tmp_path: Path,
) -> None:
    log: list[tuple[str, int]] = []

    def hook(operation: Operation, path: Path) -> None:
        log.append((operation, threading.get_ident()))

    spool = Spool(tmp_path / "spool", faults=SpoolFaults(hook))
    spool.open()
    log.clear()
    await spool.enqueue(make_envelope(spool.new_queue_id()), b"hello\r\n", Recorder(log))
    names = [name for name, _thread in log]
    assert names.index("alongside.sync") == len(names) - 1  # last, once everything is durable
    assert names.index("fsync_dir") < names.index("alongside.sync")
    threads = {name: thread for name, thread in log}
    # The record is written on the event loop; every fsync, and the audit's, in one worker.
    assert threads["alongside.write"] == threading.get_ident()
    worker = {thread for name, thread in log if name != "alongside.write"}
    assert len(worker) == 1 and threading.get_ident() not in worker
    spool.close()


@pytest.mark.parametrize("step", STEPS)
async def test_a_failure_at_any_step_of_the_commit_gives_no_250_and_keeps_nothing(
    tmp_path: Path, step: Operation,
) -> None:
    log: list[tuple[str, int]] = []
    armed = [False]

    def hook(operation: Operation, path: Path) -> None:
        if armed[0] and operation == step:
            raise OSError(errno.EIO, os.strerror(errno.EIO), str(path))

    spool = Spool(tmp_path / "spool", faults=SpoolFaults(hook))
    spool.open()
    armed[0] = True
    with pytest.raises(TemporaryFailure):
        await spool.enqueue(make_envelope(spool.new_queue_id()), b"hello\r\n", Recorder(log))
    assert not any(name == "alongside.sync" for name, _ in log)  # no audit fsync vouched
    assert files(tmp_path / "spool") == []
    spool.close()


async def test_a_defect_in_the_alongside_step_takes_the_message_back_out(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    spool.open()
    with pytest.raises(RuntimeError):
        await spool.enqueue(make_envelope(spool.new_queue_id()), b"hello\r\n",
                            Recorder([], fail_sync=True))
    assert files(tmp_path / "spool") == []
    spool.close()


async def test_an_abandoned_enqueue_is_removed_durably(tmp_path: Path) -> None:
    """The session went away during the commit: no 250. The copy the worker thread made
    durable anyway is removed like a withdrawal, its folder fsync'ed, so that a crash cannot
    bring it back besides the peer's retry."""
    entered, proceed = threading.Event(), threading.Event()
    seen: list[tuple[Operation, str]] = []

    def hook(operation: Operation, path: Path) -> None:
        seen.append((operation, path.name if operation == "fsync_dir" else path.parent.name))
        if operation == "fsync_dir" and not entered.is_set():
            entered.set()
            proceed.wait(10)

    spool = Spool(tmp_path / "spool", faults=SpoolFaults(hook))
    spool.open()
    task = asyncio.ensure_future(spool.enqueue(make_envelope(spool.new_queue_id()), b"x\r\n"))
    await asyncio.to_thread(entered.wait, 10)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    seen.clear()
    proceed.set()
    for _ in range(500):  # bounded: the removal runs once the worker's fsync returns
        if ("fsync_dir", "active") in seen[1:] and files(tmp_path / "spool") == []:
            break
        await asyncio.sleep(0.01)
    assert ("unlink", "active") in seen
    assert seen.index(("unlink", "active")) < len(seen) - 1 - seen[::-1].index(
        ("fsync_dir", "active"))
    assert files(tmp_path / "spool") == []
    spool.close()


def test_audit_sync_is_shared_by_concurrent_threads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    trail = AuditTrail(tmp_path, clock=lambda: T0)
    trail.open()
    first_fsync, written = threading.Event(), threading.Event()
    real_fsync = os.fsync
    calls = [0]

    def fsync(fd: int) -> None:
        calls[0] += 1
        if calls[0] == 1:
            first_fsync.set()
            written.wait(10)  # held until every thread has written its record
        real_fsync(fd)

    monkeypatch.setattr(gateway.audit.os, "fsync", fsync)
    before = trail.fsyncs
    lock = threading.Lock()
    records = [0]
    count = 8

    def session(index: int) -> None:
        if index:
            first_fsync.wait(10)
        trail.record("received", queue_id=f"Q{index}")
        with lock:
            records[0] += 1
            if records[0] == count:
                written.set()
        trail.sync()

    threads = [threading.Thread(target=session, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    # The first fsync covers the first record; the others share at most two more.
    assert 2 <= trail.fsyncs - before <= 3
    assert not trail._dirty
    trail.close()
    assert verify(tmp_path)[1] is None


def test_a_failed_audit_fsync_fails_every_caller_it_was_to_cover(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    trail = AuditTrail(tmp_path, clock=lambda: T0)
    trail.open()
    trail.record("received", queue_id="Q1")

    def fsync(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(gateway.audit.os, "fsync", fsync)
    with pytest.raises(OSError):
        trail.sync()
    assert trail._dirty  # not vouched for: the next caller fsyncs again
    monkeypatch.undo()
    trail.sync()
    assert not trail._dirty
    trail.close()


def test_a_record_may_be_written_from_any_thread(tmp_path: Path) -> None:
    trail = AuditTrail(tmp_path, clock=lambda: T0)
    trail.open()

    def write(index: int) -> None:
        for number in range(50):
            trail.record("delivered", queue_id=f"Q{index}-{number}")

    threads = [threading.Thread(target=write, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    trail.close()
    assert verify(tmp_path) == (1 + 200, None)  # the link record, then every one, chained


async def test_a_folder_fsync_keeps_one_descriptor(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    spool.open()
    await spool.enqueue(make_envelope(spool.new_queue_id()), b"x\r\n")
    descriptors = len(os.listdir("/proc/self/fd"))
    dir_fsyncs = spool.stats.dir_fsyncs
    for _ in range(20):
        await spool.enqueue(make_envelope(spool.new_queue_id()), b"x\r\n")
    assert spool.stats.dir_fsyncs - dir_fsyncs == 20
    assert len(os.listdir("/proc/self/fd")) <= descriptors  # none opened per fsync
    spool.close()
    assert len(os.listdir("/proc/self/fd")) < descriptors


def test_new_ids_sort_after_every_id_in_the_spool(tmp_path: Path) -> None:
    """The enqueue renames into active/ without looking first (rename(2) would replace a file
    of the same name): ids made after recovery sort after every id found there, even one made
    with a clock that was ahead of this one."""
    spool = Spool(tmp_path)
    spool.open()
    ahead = Spool.new_queue_id()
    # An id from a clock one day ahead of ours: same form, larger leading microseconds.
    micros = 0
    alphabet = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
    for char in ahead[:11]:
        micros = micros << 5 | alphabet.index(char)
    micros += 86_400 * 1_000_000
    prefix = "".join(alphabet[(micros >> shift) & 31] for shift in range(50, -1, -5))
    future = prefix + ahead[11:]
    for folder in ("deferred", "hold", "corrupt"):
        (tmp_path / folder / future).write_bytes(b"")
    spool.recover()
    made = [Spool.new_queue_id() for _ in range(100)]
    assert all(queue_id > future for queue_id in made)
    assert made == sorted(made) and len(set(made)) == len(made)
