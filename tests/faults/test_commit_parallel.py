"""The commit before a 250, end to end through the real gateway: one hop off the event loop per
message, in which one spool worker thread fsyncs the queue file, renames it into active/,
fsyncs active/ and then the audit trail (the `received` record, written by the event loop
meanwhile); a message costs one file fsync and one fsync of active/ before its 250 and writes
no state file; and a 250 still needs both: a spool that cannot fsync its folder, or an audit
trail that cannot fsync, answers 451 and keeps no copy to deliver; a peer that leaves while
the audit fsync hangs gets no 250, and its message is withdrawn at once.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import os
import threading
from pathlib import Path

import aiosmtplib
import pytest

import gateway.server
from gateway.spool import Operation, Spool, SpoolFaults
from tests.e2e.conftest import start
from tests.security.test_smtp_session import Session
from tests.support.world import build_world, message

pytestmark = pytest.mark.e2e

SENDER, RECIPIENT = "a@clinique-test.fr", "b@chu-test.fr"
BOUND = 20.0  # seconds: only a regression waits this long


class Seen:
    """The spool's operations on the way to one 250 (the fault seam sees every one), with the
    thread that made each."""

    def __init__(self) -> None:
        self.operations: list[tuple[str, str]] = []
        self.threads: list[int] = []
        self.lock = threading.Lock()
        self.fail_active: int | None = None  # an errno for the fsync of active/

    def hook(self, operation: Operation, path: Path) -> None:
        with self.lock:
            self.operations.append((operation, path.name if operation == "fsync_dir"
                                    else f"{path.parent.name}/{path.suffix or 'queue file'}"))
            self.threads.append(threading.get_ident())
        if operation == "fsync_dir" and path.name == "active" and self.fail_active is not None:
            raise OSError(self.fail_active, os.strerror(self.fail_active), str(path))

    def note(self, operation: str) -> None:
        with self.lock:
            self.operations.append((operation, "audit"))
            self.threads.append(threading.get_ident())

    def take(self) -> tuple[list[tuple[str, str]], list[int]]:
        with self.lock:
            seen, threads = self.operations, self.threads
            self.operations, self.threads = [], []
        return seen, threads


@pytest.fixture
def seen(monkeypatch: pytest.MonkeyPatch) -> Seen:
    """What every spool the gateway makes does, through the spool's fault seam."""
    watched = Seen()
    monkeypatch.setattr(gateway.server, "Spool",
                        functools.partial(Spool, faults=SpoolFaults(watched.hook)))
    return watched


async def test_the_commit_before_a_250_is_one_worker_thread_hop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, seen: Seen,
) -> None:
    world = build_world(tmp_path, retry="[1s]")
    async with start(world) as running:
        audit = running.gateway.audit
        original_record, original_sync = audit.record, audit.sync

        def record(event: str, **fields: object) -> dict[str, object]:
            if event == "received":
                seen.note("record")
            return original_record(event, **fields)

        def sync() -> None:
            seen.note("fsync")
            original_sync()

        monkeypatch.setattr(audit, "record", record)
        monkeypatch.setattr(audit, "sync", sync)
        loop_thread = threading.get_ident()
        seen.take()
        _refused, reply = await running.send(SENDER, [RECIPIENT], message(SENDER, RECIPIENT))
        assert "queued as" in reply
        operations, threads = seen.take()
        # Before the 250: the queue file written and fsync'ed, renamed, the folder fsync'ed,
        # then the audit trail fsync'ed, after its `received` record was written; no state
        # file (its initial state is rebuilt from the envelope when needed).
        spool_ops = [op for op in operations if op[1] != "audit"]
        assert spool_ops[:4] == [("write", "incoming/queue file"),
                                 ("fsync", "incoming/queue file"),
                                 ("rename", "active/queue file"), ("fsync_dir", "active")]
        assert operations.index(("record", "audit")) < operations.index(("fsync", "audit"))
        assert operations.index(("fsync_dir", "active")) < operations.index(("fsync", "audit"))
        # One worker thread made every fsync of the commit; the event loop made none.
        commit = [thread for op, thread in zip(operations, threads, strict=True)
                  if op[0] in ("write", "fsync", "rename", "fsync_dir")]
        assert len(set(commit)) == 1 and loop_thread not in commit
        await world.sinks["hospital"].wait(1, timeout=30)
        spool = running.gateway.spool
        for _ in range(200):  # the removal after the next hop's 250
            if not list(spool.entries()):
                break
            await asyncio.sleep(0.05)
        assert list(spool.entries()) == []
        after, _threads = seen.take()
        assert ("fsync_dir", "state") not in after
        assert not any(op == "write" for op, _ in after)  # no state file, ever
        assert (spool.stats.file_fsyncs, spool.stats.removed) == (1, 1)


async def test_peer_gone_while_the_audit_fsync_hangs_leaves_nothing_to_deliver(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The peer hangs up while the audit record is being made durable, on a disk that does
    not answer: it never got a 250 and will send again, so the spooled copy is withdrawn now
    rather than left to be delivered after a restart."""
    world = build_world(tmp_path, retry="[1s]")
    async with start(world) as running:
        reached, release = threading.Event(), threading.Event()
        original = running.gateway.audit.sync

        def sync() -> None:
            reached.set()
            release.wait(BOUND)  # a disk that does not answer (for the test's length)
            original()

        monkeypatch.setattr(running.gateway.audit, "sync", sync)
        try:
            session = await Session.open(world)
            await session.command(b"MAIL FROM:<a@clinique-test.fr>")
            await session.command(b"RCPT TO:<b@chu-test.fr>")
            await session.command(b"DATA")
            await session.send(message(SENDER, RECIPIENT) + b".\r\n")
            assert await asyncio.to_thread(reached.wait, BOUND)
            session.writer.transport.abort()
            spool = running.gateway.spool
            for _ in range(200):
                if not list(spool.entries()):
                    break
                await asyncio.sleep(0.05)
            assert list(spool.entries()) == []  # while the audit fsync still hangs
        finally:
            release.set()
        await asyncio.sleep(0.5)
        assert world.sinks["hospital"].messages == []
        assert list(running.gateway.spool.entries()) == []


async def test_a_folder_fsync_that_fails_answers_451_and_keeps_nothing(
    tmp_path: Path, seen: Seen,
) -> None:
    world = build_world(tmp_path, retry="[1s]")
    async with start(world) as running:
        seen.fail_active = errno.EIO
        with pytest.raises(aiosmtplib.SMTPDataError) as refused:
            await running.send(SENDER, [RECIPIENT], message(SENDER, RECIPIENT, subject="lost"))
        assert refused.value.code == 451 and refused.value.message.startswith("4.3.0")
        spool = running.gateway.spool
        assert list(spool.entries()) == []
        assert os.listdir(spool.root / "incoming") == []
        seen.fail_active = None
        _refused, reply = await running.send(SENDER, [RECIPIENT],
                                             message(SENDER, RECIPIENT, subject="kept"))
        assert "queued as" in reply
        [got] = await world.sinks["hospital"].wait(1, timeout=30)
        assert b"Subject: kept" in got.data
