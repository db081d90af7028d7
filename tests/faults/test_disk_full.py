"""Disk full or unwritable spool, end to end: the gateway answers 451 4.3.0 and never 250 while
the spool cannot make a message durable, and accepts and delivers again once it can.

The faults are injected through the spool's own seam (`SpoolFaults`): every write, fsync and
rename the spool makes first calls the hook, which raises the errno a full, failing or read-only
disk would give. Only the enqueue path (files in incoming/, renames into active/ and state/, the
group-commit fsync of active/) is hit, as when the disk fills while sessions are open.
"""

from __future__ import annotations

import errno
import functools
import os
from pathlib import Path

import aiosmtplib
import pytest

import gateway.server
from gateway.spool import Operation, Spool, SpoolFaults
from tests.e2e.conftest import start
from tests.support.world import build_world, message

pytestmark = pytest.mark.e2e

SENDER, RECIPIENT = "a@clinique-test.fr", "b@chu-test.fr"


class Disk:
    """A switchable fault: while `broken`, the chosen operation fails with `code`."""

    def __init__(self, operation: Operation, code: int) -> None:
        self.operation = operation
        self.code = code
        self.broken = False
        self.hits = 0

    def hook(self, operation: Operation, path: Path) -> None:
        if not self.broken or operation != self.operation:
            return
        enqueue_path = "incoming" in path.parts or path.name == "active" or (
            operation == "rename" and path.parent.name in ("active", "state"))
        if enqueue_path:
            self.hits += 1
            raise OSError(self.code, os.strerror(self.code), str(path))


@pytest.mark.parametrize(("operation", "code"), [
    ("write", errno.ENOSPC),  # disk full
    ("write", errno.EDQUOT),  # quota exceeded
    ("fsync", errno.EIO),  # the disk fails under the write
    ("rename", errno.EROFS),  # remounted read-only
    ("fsync_dir", errno.EIO),  # the group-commit fsync fails
], ids=["enospc", "edquot", "fsync-eio", "erofs", "dir-fsync-eio"])
async def test_spool_failure_answers_451_and_recovers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, operation: Operation, code: int,
) -> None:
    disk = Disk(operation, code)
    monkeypatch.setattr(gateway.server, "Spool",
                        functools.partial(Spool, faults=SpoolFaults(disk.hook)))
    world = build_world(tmp_path, retry="[1s]")
    async with start(world) as running:
        disk.broken = True
        for index in range(3):
            data = message(SENDER, RECIPIENT, subject=f"refused-{index}", body=f"refused-{index}\r\n")
            with pytest.raises(aiosmtplib.SMTPDataError) as refused:
                await running.send(SENDER, [RECIPIENT], data)
            assert refused.value.code == 451
            assert refused.value.message.startswith("4.3.0")
        assert disk.hits >= 3
        spool = running.gateway.spool
        assert list(spool.entries()) == []  # nothing half-accepted stays behind
        assert os.listdir(spool.root / "incoming") == []
        assert spool.stats.enqueued == 0 and spool.stats.enqueue_failures == 3

        disk.broken = False  # space is back
        data = message(SENDER, RECIPIENT, subject="after", body="after\r\n")
        _refused, reply = await running.send(SENDER, [RECIPIENT], data)
        assert "queued as" in reply
        [got] = await world.sinks["hospital"].wait(1, timeout=30)
        assert got.data.endswith(b"after\r\n")
        assert spool.stats.enqueued == 1
