"""Never lose an accepted message, with a backlog: the real server (`python -m gateway.cli
serve`) starts on a spool of 20,000 deferred messages plus some that are due, takes new mail
at once, and is killed with SIGKILL while it is still recovering, twice; after the last restart
every message that was due and every message that got a 250 arrives, and the deferred backlog
is still there, each message once."""

from __future__ import annotations

import os
import signal
from collections import Counter
from pathlib import Path

import pytest

from tests.faults.test_kill9 import send_batch, start_server, wait_listening
from tests.support.world import build_world
from tests.unit.test_backlog_recovery import folder_counts, seed, until

pytestmark = pytest.mark.e2e

BACKLOG = 20_000


async def test_kill_minus_nine_while_recovering_a_backlog_loses_nothing_due(
    tmp_path: Path,
) -> None:
    world = build_world(tmp_path, retry="[1s]")
    root = world.root / "var" / "spool"
    backlog = await seed(root, later=BACKLOG, overdue=10, active=5)
    due = {f"overdue-{i}" for i in range(10)} | {f"active-{i}" for i in range(5)}
    sink = world.sinks["hospital"]
    await sink.start()
    log = world.root / "server.log"
    accepted: list[str] = []
    mid_recovery = 0
    process = start_server(world)
    try:
        for round_ in range(2):
            await wait_listening(world, process)
            accepted += await send_batch(world, 3, f"round{round_}")
            os.kill(process.pid, signal.SIGKILL)
            process.wait()
            starts = log.read_text().count(" start config=")
            mid_recovery += log.read_text().count("recovered ") < starts
            process = start_server(world)
        await wait_listening(world, process)

        def arrived() -> Counter[str]:
            return Counter(m.data.rsplit(b"\r\n\r\n", 1)[1].strip().decode()
                           for m in sink.messages)

        await until(lambda: due | set(accepted) <= set(arrived()), timeout=120)
        await until(lambda: folder_counts(root) == {
            "active": 0, "deferred": BACKLOG, "hold": 0, "corrupt": 0}, timeout=60)
        assert set(arrived()) == due | set(accepted)  # nothing of the deferred backlog
        duplicates = sum(n - 1 for n in arrived().values())
        print(f"kills during recovery: {mid_recovery}/2, duplicates: {duplicates}")
        assert duplicates <= 3  # at-least-once after a kill between the 250 and the removal
        assert sorted(os.listdir(root / "deferred")) == sorted(backlog.later)
        assert os.listdir(root / "incoming") == []

        def states() -> set[str]:
            return {name.removesuffix(".state") for name in os.listdir(root / "state")}

        # No orphan left: a finished message's state file goes once its removal is durable,
        # within the server's removal delay.
        await until(lambda: states() == set(backlog.later), timeout=30)
    finally:
        process.terminate()
        process.wait(timeout=30)
        await sink.stop()
