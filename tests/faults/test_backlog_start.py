"""A gateway restarted on a backlog (its next hop refused mail for days, or it crashed under
load) serves at once: it answers 250 to new mail, durably, and delivers it, while the messages
already in its spool are still being read; then everything due in the backlog is delivered too.

The real gateway over SMTP and TLS on 127.0.0.1; a seam on `Spool.read_state` holds recovery
in the middle for as long as the test needs."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from gateway.server import Gateway
from tests.e2e.conftest import Running
from tests.support.world import World, build_world, message
from tests.unit.test_backlog_recovery import Backlog, Reads, folder_counts, seed, until

pytestmark = pytest.mark.e2e


def body(data: bytes) -> str:
    return data.rsplit(b"\r\n\r\n", 1)[1].strip().decode()


@contextlib.asynccontextmanager
async def serving(world: World,
                  hold_at: str | None = None) -> AsyncIterator[tuple[Running, Reads]]:
    """The gateway with the seam on its spool from the start (holding recovery before
    `hold_at`, if given)."""
    for sink in world.sinks.values():
        await sink.start()
    gateway = Gateway(world.config)
    reads = Reads(gateway.spool)
    reads.hold_at = hold_at
    gateway.spool.read_state = reads  # type: ignore[method-assign]
    try:
        await gateway.start()
        yield Running(world, gateway), reads
    finally:
        reads.release()
        await gateway.stop(5)
        for sink in world.sinks.values():
            await sink.stop()


async def backlog_world(tmp_path: Path) -> tuple[World, Backlog]:
    world = build_world(tmp_path, retry="[1s]")
    return world, await seed(world.root / "var" / "spool", later=400, overdue=3, active=2)


async def test_new_mail_gets_its_250_and_is_delivered_while_the_backlog_is_still_read(
    tmp_path: Path,
) -> None:
    world, backlog = await backlog_world(tmp_path)
    root = world.root / "var" / "spool"
    sink = world.sinks["hospital"]
    async with serving(world, hold_at=backlog.later[200]) as (running, reads):
        await reads.wait_entered()  # start() has returned, recovery is held in its thread
        _refused, reply = await running.send(
            "a@clinique-test.fr", ["b@chu-test.fr"],
            message("a@clinique-test.fr", "b@chu-test.fr", subject="new", body="new\r\n"))
        assert "queued as" in reply
        await until(lambda: "new" in {body(m.data) for m in sink.messages})
        assert not reads.released.is_set()  # all of that while recovery was held
        reads.release()
        due = {f"overdue-{i}" for i in range(3)} | {f"active-{i}" for i in range(2)}
        got = await sink.wait(1 + len(due), timeout=60)
        assert {body(m.data) for m in got} == due | {"new"}
        qmgr = running.gateway.qmgr
        await until(lambda: not qmgr.running and folder_counts(root) == {
            "active": 0, "deferred": 400, "hold": 0, "corrupt": 0})
        assert set(backlog.later) <= set(qmgr.scheduled)
    assert len(sink.messages) == 1 + len(due)  # nothing twice


async def test_start_reads_nothing_of_the_backlog_on_the_event_loop(tmp_path: Path) -> None:
    world, backlog = await backlog_world(tmp_path)
    async with serving(world) as (running, reads):
        qmgr = running.gateway.qmgr
        await until(lambda: set(backlog.later) <= set(qmgr.scheduled))
        assert reads.threads and threading.get_ident() not in reads.threads
