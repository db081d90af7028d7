"""Disk full or unwritable spool, end to end: the gateway answers 451 4.3.0 and never 250 while
the spool cannot make a message durable, and accepts and delivers again once it can.

The faults are injected through the spool's own seam (`SpoolFaults`): every write, fsync and
rename the spool makes first calls the hook, which raises the errno a full, failing or read-only
disk would give. The first test hits only the enqueue path (files in incoming/, renames into
active/ and state/, the group-commit fsync of active/), as when the disk fills while sessions
are open; the last one hits only the delivery state, after the next hop's 250.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import os
from collections.abc import Callable
from pathlib import Path

import aiosmtplib
import pytest

import gateway.server
from gateway.audit import read_records
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


async def test_disk_full_after_the_next_hops_250_delivers_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The next hop takes the message for one recipient and defers the other; recording that
    fails (ENOSPC on the new state file). The retry of the other recipient must not send the
    message again to the first, and once the disk has room the spool empties."""
    full = [False]
    hits = [0]

    def hook(operation: Operation, path: Path) -> None:
        # The delivery state is rewritten through a temporary file in incoming/.
        if full[0] and operation == "write" and path.suffix == ".tmp":
            hits[0] += 1
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(gateway.server, "Spool",
                        functools.partial(Spool, faults=SpoolFaults(hook)))
    world = build_world(tmp_path, retry="[1s]")
    sink = world.sinks["hospital"]
    other = "c@chu-test.fr"
    async with start(world) as running:
        running.gateway.qmgr.persist_retry = 0.2
        spool = running.gateway.spool
        sink.handler.rcpt_replies = {other: "451 4.2.1 Mailbox busy"}
        full[0] = True
        await running.send(SENDER, [RECIPIENT, other], message(SENDER, RECIPIENT))
        # Delivered to RECIPIENT, then the other one tried again: never recorded.
        await until(lambda: hits[0] >= 3)
        assert [m.recipients for m in sink.messages] == [[RECIPIENT]]
        full[0] = False
        sink.handler.rcpt_replies = {}
        await until(lambda: len(sink.messages) >= 2 and list(spool.entries()) == [])
        assert [m.recipients for m in sink.messages] == [[RECIPIENT], [other]]
    folder = world.root / "var" / "audit"
    delivered = [r for r in read_records(sorted(folder.glob("audit-*.jsonl")))
                 if r.get("event") == "delivered"]
    assert sorted(r["recipient"] for r in delivered) == [RECIPIENT, other]


async def until(condition: Callable[[], bool], timeout: float = 30.0) -> None:
    """Wait for `condition`, bounded so that a regression fails rather than hangs."""
    async def poll() -> None:
        while not condition():
            await asyncio.sleep(0.05)
    await asyncio.wait_for(poll(), timeout)
