"""The queue gauge, `gateway_queue_messages{state}` (DESIGN.md §8), without reading the spool:
the server's own moves adjust it at once, a recount of the folders' listings (no file opened)
brings in what other processes moved, and moves made during a recount are not lost."""

from __future__ import annotations

import asyncio
import threading
from unittest import mock

import pytest

from gateway.spool import Spool
from tests.unit.test_backlog_recovery import (
    DEFERRED,
    Manager,
    folder_counts,
    manager,
    running,
    seed,
    until,
    world_config,
)

__all__ = ["manager", "world_config"]  # fixtures, shared with the recovery tests

B = "b@chu-test.fr"


async def test_the_gauge_follows_the_servers_own_moves_without_reading_the_spool(
    manager: Manager,
) -> None:
    await seed(manager.root, later=50, held=2)
    manager.qm.prepare_recovery()
    await manager.qm.recover_in_background()
    await manager.qm.recount()
    assert manager.gauge() == folder_counts(manager.root) == {
        "active": 0, "deferred": 50, "hold": 2, "corrupt": 0}
    with mock.patch.object(manager.spool, "entries", None), \
            mock.patch.object(manager.qm, "_count", None):  # neither a scan nor a recount
        delivered = await manager.accept("delivered")
        assert manager.gauge()["active"] == 1
        await manager.qm.attempt(delivered.queue_id)
        assert manager.gauge() == folder_counts(manager.root)

        manager.hop.replies[B] = DEFERRED
        deferred = await manager.accept("deferred")
        await manager.qm.attempt(deferred.queue_id)
        assert manager.spool.locate(deferred.queue_id) == "deferred"
        assert manager.gauge() == folder_counts(manager.root)

        damaged = await manager.accept("damaged")
        manager.qm.fresh.clear()  # read back from the spool, and found damaged
        queue_file = manager.root / "active" / damaged.queue_id
        queue_file.write_bytes(queue_file.read_bytes()[:-5])
        await manager.qm.attempt(damaged.queue_id)
        assert manager.spool.locate(damaged.queue_id) == "corrupt"
        assert manager.gauge() == folder_counts(manager.root) == {
            "active": 0, "deferred": 51, "hold": 2, "corrupt": 1}


async def test_a_recount_brings_in_what_the_operators_tools_moved(manager: Manager) -> None:
    backlog = await seed(manager.root, later=20, held=1)
    manager.qm.prepare_recovery()
    await manager.qm.recover_in_background()
    await manager.qm.recount()
    tools = Spool(manager.root)  # `gateway queue ...` in another process
    tools.hold(backlog.later[0])
    tools.hold(backlog.later[1])
    tools.delete(backlog.later[2])
    tools.release(backlog.held[0])
    assert manager.gauge() != folder_counts(manager.root)
    await manager.qm.recount()
    assert manager.gauge() == folder_counts(manager.root) == {
        "active": 1, "deferred": 17, "hold": 2, "corrupt": 0}


async def test_moves_made_while_a_recount_lists_the_folders_are_kept(
    manager: Manager, monkeypatch: pytest.MonkeyPatch,
) -> None:
    await seed(manager.root, later=10)
    listing, release = threading.Event(), threading.Event()
    count = manager.qm._count

    def slow_count() -> dict[str, int]:
        counts = count()
        listing.set()
        release.wait(30)
        return counts

    monkeypatch.setattr(manager.qm, "_count", slow_count)
    recount = asyncio.create_task(manager.qm.recount())
    assert await asyncio.to_thread(listing.wait, 30)
    await manager.accept("during")  # after the listing: the recount did not see it
    release.set()
    await recount
    assert manager.gauge() == folder_counts(manager.root) == {
        "active": 1, "deferred": 10, "hold": 0, "corrupt": 0}


async def test_the_gauge_is_recounted_at_start_and_every_queue_recount_seconds(
    manager: Manager,
) -> None:
    backlog = await seed(manager.root, later=30)
    qm = manager.restarted(queue_recount=0.05)
    qm.prepare_recovery()
    async with running(qm):
        await until(lambda: manager.gauge()["deferred"] == 30)
        Spool(manager.root).hold(backlog.later[0])
        await until(lambda: manager.gauge() == {
            "active": 0, "deferred": 29, "hold": 1, "corrupt": 0})
