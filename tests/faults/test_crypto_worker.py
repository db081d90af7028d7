"""A crypto worker crashes or hangs on a pathological input: that message is bounced or deferred
with a reason, the worker pool recovers, and the other messages keep flowing.

The fault is injected through the adapters registry (the seam the pipeline already uses to
find an adapter): the `mime` adapter is wrapped so that its unwrap raises on a message marked
CRASH and blocks on a message marked HANG, as a library bug or a pathological input would.
Every hang is bounded (an Event the test sets at the end) so that no thread outlives the test.
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import adapters
from adapters.base import Adapter, UnwrapContext, Unwrapped
from gateway.audit import read_records
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
