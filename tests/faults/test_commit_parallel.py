"""The commit before a 250, end to end through the real gateway: the spool's fsyncs and the
audit trail's fsync are in flight at the same time (side by side, not one after the other); a
message costs one file fsync and one fsync of active/ before its 250 and writes no state file;
and a 250 still needs both: a spool that cannot fsync its folder, or an audit trail that
cannot fsync, answers 451 and keeps no copy to deliver.

Both fsyncs are made to wait for the other to have started, through the spool's fault seam
and a wrapper around the audit trail's `sync`: done one after the other, each would wait for
the other forever, and the bounded wait turns that into a failure rather than a hang.
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
from tests.support.world import build_world, message

pytestmark = pytest.mark.e2e

SENDER, RECIPIENT = "a@clinique-test.fr", "b@chu-test.fr"
BOUND = 20.0  # seconds: only a regression waits this long


class Seen:
    """The spool's operations on the way to one 250 (the fault seam sees every one)."""

    def __init__(self) -> None:
        self.operations: list[tuple[Operation, str]] = []
        self.lock = threading.Lock()
        self.spool_fsync_started = threading.Event()
        self.audit_fsync_started = threading.Event()
        self.meet = False  # while set, each fsync waits for the other to have started
        self.fail_active: int | None = None  # an errno for the fsync of active/

    def hook(self, operation: Operation, path: Path) -> None:
        with self.lock:
            self.operations.append((operation, path.name if operation == "fsync_dir"
                                    else f"{path.parent.name}/{path.suffix or 'queue file'}"))
        if operation == "fsync_dir" and path.name == "active":
            if self.meet:
                self.spool_fsync_started.set()
                if not self.audit_fsync_started.wait(BOUND):
                    raise OSError(errno.ETIMEDOUT, "the audit fsync never started alongside")
            if self.fail_active is not None:
                raise OSError(self.fail_active, os.strerror(self.fail_active), str(path))

    def take(self) -> list[tuple[Operation, str]]:
        with self.lock:
            seen, self.operations = self.operations, []
        return seen


async def test_the_spool_and_audit_fsyncs_before_a_250_run_side_by_side(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    seen = Seen()
    monkeypatch.setattr(gateway.server, "Spool",
                        functools.partial(Spool, faults=SpoolFaults(seen.hook)))
    world = build_world(tmp_path, retry="[1s]")
    async with start(world) as running:
        audit = running.gateway.audit
        original = audit.sync

        def sync() -> None:
            if seen.meet:
                seen.audit_fsync_started.set()
                if not seen.spool_fsync_started.wait(BOUND):
                    raise OSError(errno.ETIMEDOUT, "the spool fsync never started alongside")
            original()

        monkeypatch.setattr(audit, "sync", sync)
        seen.take()
        seen.meet = True
        _refused, reply = await running.send(SENDER, [RECIPIENT], message(SENDER, RECIPIENT))
        seen.meet = False
        assert "queued as" in reply
        # Before the 250: the queue file written and fsync'ed, renamed, the folder fsync'ed;
        # no state file (its initial state is rebuilt from the envelope when needed).
        assert seen.take()[:4] == [("write", "incoming/queue file"),
                                   ("fsync", "incoming/queue file"),
                                   ("rename", "active/queue file"), ("fsync_dir", "active")]
        await world.sinks["hospital"].wait(1, timeout=30)
        spool = running.gateway.spool
        for _ in range(200):  # the removal after the next hop's 250
            if not list(spool.entries()):
                break
            await asyncio.sleep(0.05)
        assert list(spool.entries()) == []
        after = seen.take()
        assert ("fsync_dir", "state") not in after
        assert not any(op == "write" for op, _ in after)  # no state file, ever
        assert (spool.stats.file_fsyncs, spool.stats.removed) == (1, 1)


async def test_a_folder_fsync_that_fails_answers_451_and_keeps_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    seen = Seen()
    monkeypatch.setattr(gateway.server, "Spool",
                        functools.partial(Spool, faults=SpoolFaults(seen.hook)))
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
