"""Removal of a finished message with `removal_delay`: `finish` unlinks the queue file and
returns, the fsync that makes the removal durable is the next one of its folder (an enqueue's,
or the timer's within the delay, or `close`'s), and only then does the state file go, so a
queue file that survives a crash never loses its state. A kill -9 brings back no message that
`finish` removed (the kernel keeps the unlink), only orphan state files that recovery removes.
"""

from __future__ import annotations

import asyncio
import errno
import os
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

from gateway.envelope import DeliveryState, Envelope, Peer, Recipient
from gateway.spool import Operation, Spool, SpoolFaults

ROOT = Path(__file__).resolve().parents[2]
T0 = 1_795_000_000.0


def make_envelope(queue_id: str) -> Envelope:
    return Envelope(
        queue_id=queue_id, sender="dr.martin@clinique-test.fr",
        recipients=(Recipient("b@chu-test.fr", "hospital"),), source_network="clinic",
        peer=Peer("192.0.2.7", 25, "mx.clinique-test.fr", True), received_at=T0, size=100,
    )


class Journal:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.seen: list[tuple[Operation, str]] = []
        self.lock = threading.Lock()
        self.fail_fsync_dir = 0  # fail this many fsyncs of a folder

    def hook(self, operation: Operation, path: Path) -> None:
        with self.lock:
            self.seen.append((operation, str(path.relative_to(self.root))))
            if operation == "fsync_dir" and self.fail_fsync_dir:
                self.fail_fsync_dir -= 1
                raise OSError(errno.EIO, os.strerror(errno.EIO), str(path))

    def take(self) -> list[tuple[Operation, str]]:
        with self.lock:
            seen, self.seen = self.seen, []
        return seen


async def put(spool: Spool, attempted: bool = True) -> str:
    envelope = make_envelope(spool.new_queue_id())
    await spool.enqueue(envelope, b"Subject: x\r\n\r\nbody\r\n")
    if attempted:  # a state file, as after an attempt that changed the state
        spool.write_state(envelope.queue_id, DeliveryState.initial(envelope).update(
            "b@chu-test.fr", attempts=1))
    return envelope.queue_id


async def until(condition: Callable[[], bool], bound: float = 20.0) -> None:
    """Wait for `condition`, bounded so that a regression fails rather than hangs."""
    async def poll() -> None:
        while not condition():
            await asyncio.sleep(0.01)
    await asyncio.wait_for(poll(), bound)


async def test_finish_leaves_the_fsync_to_the_next_enqueue(tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    spool = Spool(tmp_path, faults=SpoolFaults(journal.hook), removal_delay=3600)
    spool.open()
    finished = await put(spool)
    journal.take()
    spool.finish(finished)
    assert journal.take() == [("unlink", f"active/{finished}")]  # no fsync, state kept
    assert spool.locate(finished) is None
    assert (tmp_path / "state" / f"{finished}.state").exists()
    assert spool.stats.removed == 1
    fresh = await put(spool, attempted=False)
    seen = journal.take()
    # The enqueue's fsync of active/ covers the unlink; the state file goes after it.
    assert seen.index(("fsync_dir", "active")) < seen.index(("unlink", f"state/{finished}.state"))
    assert not (tmp_path / "state" / f"{finished}.state").exists()
    assert spool.locate(fresh) == "active"
    spool.close()


async def test_without_an_enqueue_the_timer_makes_the_removal_durable(tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    spool = Spool(tmp_path, faults=SpoolFaults(journal.hook), removal_delay=0.05)
    spool.open()
    finished = await put(spool)
    journal.take()
    spool.finish(finished)
    state = tmp_path / "state" / f"{finished}.state"
    await until(lambda: not state.exists())
    seen = journal.take()
    assert seen[0] == ("unlink", f"active/{finished}")
    assert seen.index(("fsync_dir", "active")) < seen.index(("unlink", f"state/{finished}.state"))
    spool.close()


async def test_a_failed_fsync_keeps_the_state_file_until_one_succeeds(tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    spool = Spool(tmp_path, faults=SpoolFaults(journal.hook), removal_delay=0.05)
    spool.open()
    finished = await put(spool)
    journal.fail_fsync_dir = 2
    spool.finish(finished)
    state = tmp_path / "state" / f"{finished}.state"
    await until(lambda: not state.exists())  # tried again after each failure
    assert journal.fail_fsync_dir == 0
    spool.close()


async def test_close_makes_pending_removals_durable(tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    spool = Spool(tmp_path, faults=SpoolFaults(journal.hook), removal_delay=3600)
    spool.open()
    done = [await put(spool) for _ in range(5)]
    journal.take()
    for queue_id in done:
        spool.finish(queue_id)
    spool.close()
    seen = journal.take()
    assert seen.count(("fsync_dir", "active")) == 1  # one fsync for all five
    assert sorted(p.name for p in (tmp_path / "state").iterdir()) == []
    assert Spool(tmp_path).recover() == []


async def test_finish_of_a_message_gone_already_is_durable_at_once(tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    spool = Spool(tmp_path, faults=SpoolFaults(journal.hook), removal_delay=3600)
    spool.open()
    journal.take()
    spool.finish("0000000000000ABCDE")  # an earlier call may have failed before its fsync
    assert {op for op in journal.take() if op[0] == "fsync_dir"} == {
        ("fsync_dir", "active"), ("fsync_dir", "deferred"), ("fsync_dir", "hold")}
    spool.close()


CHILD = r"""
import asyncio, sys
from pathlib import Path
from gateway.envelope import DeliveryState, Envelope, Peer, Recipient
from gateway.spool import Spool

async def main(root):
    spool = Spool(Path(root), removal_delay=3600)  # nothing but the kill ends the wait
    spool.open()
    for _ in range(20):
        queue_id = spool.new_queue_id()
        envelope = Envelope(queue_id, "a@clinique-test.fr",
                            (Recipient("b@chu-test.fr", "hospital"),), "clinic",
                            Peer("127.0.0.1"), 0.0, 5)
        await spool.enqueue(envelope, b"x\r\n\r\n")
        spool.write_state(queue_id, DeliveryState.initial(envelope).update(
            "b@chu-test.fr", attempts=1))
        spool.finish(queue_id)
        print(queue_id, flush=True)
    print("done", flush=True)
    await asyncio.sleep(60)

asyncio.run(main(sys.argv[1]))
"""


def test_a_kill_brings_back_no_finished_message(tmp_path: Path) -> None:
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path)],
                             stdout=subprocess.PIPE, text=True, cwd=ROOT,
                             env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert child.stdout is not None
    finished = []
    for line in child.stdout:
        if line.strip() == "done":
            break
        finished.append(line.strip())
    child.kill()
    child.wait(30)
    assert len(finished) == 20
    assert len(list((tmp_path / "state").iterdir())) >= 1  # left for recovery
    assert Spool(tmp_path).recover() == []
    assert list((tmp_path / "state").iterdir()) == []  # the orphans are gone
    assert list((tmp_path / "active").iterdir()) == []
