"""A crypto worker crashes, hangs or dies on a pathological input: that message is bounced or
deferred with a reason, the worker pool recovers, and the other messages keep flowing. Both
pools: threads (the default for plain MIME) and worker processes (S/MIME, OpenPGP, Apicrypt).

The fault is injected through the adapters registry (the seam the pipeline already uses to
find an adapter): the `mime` adapter is wrapped so that its unwrap raises on a message marked
CRASH and blocks on a message marked HANG, as a library bug or a pathological input would.
In worker processes the same wrapper is installed by the pool's `initializer`, and released
through a file, since an Event does not cross processes; a message marked DIE blocks the
first time it is seen so that the test can kill its worker with SIGKILL. Every hang is bounded
(the test releases it at the end, a killed worker takes its hang with it) so that nothing
outlives the test.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import adapters
import gateway.qmgr
from adapters.base import Adapter, UnwrapContext, Unwrapped
from gateway.audit import read_records
from gateway.workers import ProcessWorkers, ThreadWorkers, Workers
from tests.e2e.conftest import start
from tests.support.world import World, build_world, message

pytestmark = pytest.mark.e2e

SENDER, RECIPIENT = "a@clinique-test.fr", "b@chu-test.fr"


@dataclass
class Pathological:
    """The mime adapter, with a worker that crashes on CRASH and hangs on HANG."""

    inner: Adapter
    released: threading.Event

    @property
    def name(self) -> str:
        return self.inner.name

    @property
    def method(self) -> str:
        return self.inner.method

    def option_problems(self, options: object) -> list[str]:
        return self.inner.option_problems(options)  # type: ignore[arg-type]

    def unwrap(self, raw: bytes, context: UnwrapContext) -> Unwrapped:
        if b"CRASH" in raw:
            raise RecursionError("maximum recursion depth exceeded (pathological nesting)")
        if b"HANG" in raw and not self.released.is_set():
            self.released.wait(60)  # bounded: the test releases it
        return self.inner.unwrap(raw, context)

    def wrap(self, message: Unwrapped, context: object) -> object:
        return self.inner.wrap(message, context)  # type: ignore[arg-type]


FAULTS = "PASSERELLE_TEST_FAULTS"  # the folder through which a worker process is released


class Released:
    """`threading.Event`'s is_set/wait, for a worker process: set once `<folder>/released`
    exists."""

    def __init__(self, folder: Path) -> None:
        self.marker = folder / "released"

    def is_set(self) -> bool:
        return self.marker.exists()

    def wait(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not self.is_set() and time.monotonic() < deadline:
            time.sleep(0.02)
        return self.is_set()


@dataclass
class Mortal(Pathological):
    """In a worker process: also, the first time a message marked DIE is seen, say which
    process has it (`<folder>/dying`) and wait for the test to kill it."""

    folder: Path | None = None

    def unwrap(self, raw: bytes, context: UnwrapContext) -> Unwrapped:
        assert self.folder is not None
        dying = self.folder / "dying"
        if b"DIE" in raw and not dying.exists():
            dying.write_text(str(os.getpid()))
            time.sleep(60)  # bounded: the test kills this process long before
        return super().unwrap(raw, context)


def install_in_worker() -> None:
    """`ProcessWorkers(initializer=...)`: runs in each worker process before it serves."""
    folder = Path(os.environ[FAULTS])
    adapters.REGISTRY["mime"] = Mortal(adapters.REGISTRY["mime"], Released(folder),  # type: ignore[arg-type]
                                       folder)


def process_workers(count: int) -> Workers:
    return Workers(ThreadWorkers(2), ProcessWorkers(
        count, initializer="tests.faults.test_crypto_worker:install_in_worker"), kind="process")


async def until(condition: Any, timeout: float = 30.0) -> None:
    async def poll() -> None:
        while not condition():
            await asyncio.sleep(0.05)
    await asyncio.wait_for(poll(), timeout)


def audit(world: World) -> list[dict[str, Any]]:
    return list(read_records(sorted((world.root / "var" / "audit").glob("*.jsonl"))))


def body(raw: bytes) -> str:
    return raw.rsplit(b"\r\n\r\n", 1)[1].strip().decode()


async def test_worker_crash_and_hang_do_not_stop_the_flow(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    released = threading.Event()
    monkeypatch.setitem(adapters.REGISTRY, "mime",
                        Pathological(adapters.REGISTRY["mime"], released))
    world = build_world(tmp_path, retry="[1s]")
    try:
        async with start(world) as running:
            running.gateway.qmgr.prepare_timeout = 0.5
            # More hanging messages than the pool has workers (4): without recovery, nothing
            # else could be prepared after them.
            for index in range(6):
                await running.send(SENDER, [RECIPIENT],
                                   message(SENDER, RECIPIENT, body=f"HANG-{index}\r\n"))
            await running.send(SENDER, [RECIPIENT], message(SENDER, RECIPIENT, body="CRASH\r\n"))
            for index in range(5):
                await running.send(SENDER, [RECIPIENT],
                                   message(SENDER, RECIPIENT, body=f"normal-{index}\r\n"))
            hospital, clinic = world.sinks["hospital"], world.sinks["clinic"]
            await hospital.wait(5, timeout=30)
            assert sorted(body(m.data) for m in hospital.messages) == [
                f"normal-{index}" for index in range(5)]
            # The crash: bounced with a reason, and the sender told so (never delivered).
            [dsn] = await clinic.wait(1, timeout=30)
            assert b"Status: 5.6.0" in dsn.data
            # The hang: deferred with a reason, retried once the worker is healthy again.
            deferred: list[dict[str, Any]] = []
            for _ in range(100):  # each hanging message overruns once it gets a worker
                deferred = [r for r in audit(world) if r.get("event") == "deferred"]
                if len({r["queue_id"] for r in deferred}) == 6:
                    break
                await asyncio.sleep(0.1)
            assert len({r["queue_id"] for r in deferred}) == 6
            assert all(r["reason"] == "internal" and "longer than" in r["reply"]
                       for r in deferred)
            released.set()
            await hospital.wait(11, timeout=30)
            await asyncio.sleep(1.5)
            delivered = sorted(body(m.data) for m in hospital.messages)
            assert delivered == sorted([f"HANG-{i}" for i in range(6)]
                                       + [f"normal-{i}" for i in range(5)])
            assert list(running.gateway.spool.entries()) == []
    finally:
        released.set()


async def test_prepare_runs_on_a_bounded_set_of_threads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Not one thread per message: the pool's threads take message after message."""
    threads: set[str] = set()
    real = gateway.qmgr.prepare

    def watched(*args: Any) -> Any:
        threads.add(threading.current_thread().name)
        return real(*args)

    monkeypatch.setattr(gateway.qmgr, "prepare", watched)
    world = build_world(tmp_path)
    async with start(world, workers=Workers(ThreadWorkers(2))) as running:
        for index in range(12):
            await running.send(SENDER, [RECIPIENT],
                               message(SENDER, RECIPIENT, body=f"normal-{index}\r\n"))
        await world.sinks["hospital"].wait(12, timeout=30)
        assert running.gateway.workers.threads.threads <= 2
    assert 1 <= len(threads) <= 2


async def test_worker_process_crash_and_hang_do_not_stop_the_flow(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    faults = tmp_path / "faults"
    faults.mkdir()
    monkeypatch.setenv(FAULTS, str(faults))
    world = build_world(tmp_path / "world", retry="[1s]")
    try:
        async with start(world, workers=process_workers(2)) as running:
            running.gateway.qmgr.prepare_timeout = 2.0
            processes = running.gateway.workers.processes
            assert processes is not None
            # More hanging messages than the pool has processes.
            for index in range(3):
                await running.send(SENDER, [RECIPIENT],
                                   message(SENDER, RECIPIENT, body=f"HANG-{index}\r\n"))
            await running.send(SENDER, [RECIPIENT], message(SENDER, RECIPIENT, body="CRASH\r\n"))
            for index in range(3):
                await running.send(SENDER, [RECIPIENT],
                                   message(SENDER, RECIPIENT, body=f"normal-{index}\r\n"))
            hospital, clinic = world.sinks["hospital"], world.sinks["clinic"]
            await hospital.wait(3, timeout=60)
            assert sorted(body(m.data) for m in hospital.messages) == [
                f"normal-{index}" for index in range(3)]
            # The crash: an exception inside the worker bounces like in a thread, with a reason.
            [dsn] = await clinic.wait(1, timeout=60)
            assert b"Status: 5.6.0" in dsn.data
            # The hangs: each worker killed when it overran, replaced, the message deferred.
            await until(lambda: len({r["queue_id"] for r in audit(world)
                                     if r.get("event") == "deferred"}) == 3, timeout=60)
            deferred = [r for r in audit(world) if r.get("event") == "deferred"]
            assert all(r["reason"] == "internal" and "longer than" in r["reply"]
                       for r in deferred)
            assert processes.overruns >= 3
            (faults / "released").touch()
            await hospital.wait(6, timeout=60)
            await until(lambda: list(running.gateway.spool.entries()) == [])
            assert sorted(body(m.data) for m in hospital.messages) == sorted(
                [f"HANG-{i}" for i in range(3)] + [f"normal-{i}" for i in range(3)])
            assert len(processes.pids) <= 2
    finally:
        (faults / "released").touch()


async def test_a_worker_process_killed_mid_message_is_replaced_and_the_message_deferred(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    faults = tmp_path / "faults"
    faults.mkdir()
    (faults / "released").touch()  # nothing hangs here but the DIE message
    monkeypatch.setenv(FAULTS, str(faults))
    world = build_world(tmp_path / "world", retry="[1s]")
    async with start(world, workers=process_workers(1)) as running:
        processes = running.gateway.workers.processes
        assert processes is not None
        await running.send(SENDER, [RECIPIENT], message(SENDER, RECIPIENT, body="DIE\r\n"))
        await until(lambda: (faults / "dying").exists())
        victim = int((faults / "dying").read_text())
        assert victim in processes.pids
        os.kill(victim, signal.SIGKILL)
        # Deferred with a reason, never lost: tried again on the replacement, and delivered.
        hospital = world.sinks["hospital"]
        for index in range(3):
            await running.send(SENDER, [RECIPIENT],
                               message(SENDER, RECIPIENT, body=f"normal-{index}\r\n"))
        await hospital.wait(4, timeout=60)
        assert sorted(body(m.data) for m in hospital.messages) == sorted(
            ["DIE"] + [f"normal-{i}" for i in range(3)])
        [deferred] = [r for r in audit(world) if r.get("event") == "deferred"]
        assert deferred["reason"] == "internal"
        assert "worker" in deferred["reply"] and "stopped" in deferred["reply"]
        assert processes.lost == 1
        assert victim not in processes.pids and len(processes.pids) == 1
        await until(lambda: list(running.gateway.spool.entries()) == [])
