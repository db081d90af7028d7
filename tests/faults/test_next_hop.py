"""The next hop misbehaves, the gateway keeps every accepted message and delivers it once the
next hop is back, on the retry schedule; one bad next hop never holds up another network.

Everything runs in-process on loopback with the e2e world (tests/support/world.py): clinic
mail goes to the "hospital" sink, hospital mail (client certificate) to the "clinic" sink.
The retry schedule is `[1s]`, so each scenario takes a few seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import itertools
from pathlib import Path
from typing import Any

import pytest

from gateway.audit import read_records
from tests.e2e.conftest import Running, start
from tests.support.world import World, build_world, message

pytestmark = pytest.mark.e2e

SENDER, RECIPIENT = "a@clinique-test.fr", "b@chu-test.fr"
HOSPITAL_SENDER, CLINIC_RECIPIENT = "x@chu-test.fr", "y@clinique-test.fr"


def audit_records(world: World) -> list[dict[str, Any]]:
    folder = world.root / "var" / "audit"
    return list(read_records(sorted(folder.glob("audit-*.jsonl"))))


def seconds(record: dict[str, Any]) -> float:
    return dt.datetime.fromisoformat(str(record["time"])).timestamp()


def bodies(world: World, sink: str) -> list[str]:
    return [m.data.rsplit(b"\r\n\r\n", 1)[1].strip().decode() for m in world.sinks[sink].messages]


async def send_tagged(running: Running, tags: list[str], *, to_clinic: bool = False) -> None:
    """clinic -> hospital (relay tls: required), or hospital -> clinic (relay tls:
    opportunistic, so a next hop without STARTTLS gets the message in clear)."""
    sender, recipient = (HOSPITAL_SENDER, CLINIC_RECIPIENT) if to_clinic else (SENDER, RECIPIENT)
    client = running.world.hospital_client if to_clinic else None
    for tag in tags:
        _refused, reply = await running.send(
            sender, [recipient], message(sender, recipient, subject=tag, body=f"{tag}\r\n"),
            client=client,
        )
        assert reply.startswith("2.0.0") or "queued" in reply, reply


async def test_next_hop_down_then_back_delivers_everything_on_schedule(tmp_path: Path) -> None:
    world = build_world(tmp_path, retry="[1s, 2s]")
    async with start(world) as running:
        sink = world.sinks["hospital"]
        await sink.stop()  # the next hop goes down before the messages arrive
        tags = [f"down-{index}" for index in range(5)]
        await send_tagged(running, tags)
        # Wait until every message has had at least two failed attempts.
        for _ in range(100):
            deferred = [r for r in audit_records(world) if r.get("event") == "deferred"]
            if len({r["queue_id"] for r in deferred}) == 5 and len(deferred) >= 10:
                break
            await asyncio.sleep(0.1)
        assert sink.messages == []
        await sink.start()
        got = await sink.wait(5, timeout=30)
        assert sorted(bodies(world, "hospital")) == sorted(tags)
        assert len(got) == 5

    records = audit_records(world)
    for queue_id in {r["queue_id"] for r in records if r.get("event") == "delivered"}:
        mine = [r for r in records if r.get("queue_id") == queue_id
                and r.get("event") in ("received", "deferred", "delivered")]
        events = [r["event"] for r in mine]
        assert events[0] == "received" and events[-1] == "delivered"
        assert events.count("deferred") >= 2
        assert all(r["reason"] == "next_hop_unavailable" for r in mine
                   if r["event"] == "deferred")
        # The schedule is [1s, 2s] then 2s again: attempt n+1 never comes before its delay.
        attempts = [seconds(r) for r in mine[1:]]
        for number, (before, after) in enumerate(itertools.pairwise(attempts), 1):
            assert after - before >= (1.0 if number == 1 else 2.0) - 0.25


@pytest.mark.parametrize("reply", [
    "421 4.3.2 System shutting down",
    "451 4.3.0 Local error, try again",
    "452 4.3.1 Insufficient system storage",
])
async def test_temporary_replies_then_250(tmp_path: Path, reply: str) -> None:
    world = build_world(tmp_path, retry="[1s]")
    async with start(world) as running:
        sink = world.sinks["hospital"]
        sink.handler.data_replies = [reply, reply]  # two refusals, then the sink's 250
        await send_tagged(running, ["temporary"])
        await sink.wait(1, timeout=30)
        await asyncio.sleep(1.5)  # a duplicate would be one retry away
        assert bodies(world, "hospital") == ["temporary"]
        assert world.sinks["clinic"].messages == []  # delivered: no DSN to the sender
    events = [r for r in audit_records(world) if r.get("event") in ("deferred", "delivered")]
    assert [r["event"] for r in events] == ["deferred", "deferred", "delivered"]
    assert all(r["reply"].startswith(reply.split()[0]) for r in events[:2])


class DroppingNextHop(asyncio.Protocol):
    """Answers like an SMTP server until DATA, takes a few bytes of the message, then hangs up."""

    def __init__(self, dropped: list[int]) -> None:
        self.dropped = dropped
        self.buffer = b""
        self.in_data = False
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.write(b"220 dropper ESMTP\r\n")

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        if self.in_data:
            self.dropped.append(len(data))
            self.transport.abort()  # mid-DATA: no final reply, no QUIT
            return
        self.buffer += data
        while b"\r\n" in self.buffer:
            line, self.buffer = self.buffer.split(b"\r\n", 1)
            verb = line[:4].upper()
            if verb == b"EHLO":
                self.transport.write(b"250-dropper\r\n250 8BITMIME\r\n")
            elif verb == b"DATA":
                self.in_data = True
                self.transport.write(b"354 go ahead\r\n")
                return
            elif verb == b"QUIT":
                self.transport.write(b"221 bye\r\n")
                self.transport.close()
                return
            else:
                self.transport.write(b"250 OK\r\n")


async def test_next_hop_dropping_mid_data_then_back(tmp_path: Path) -> None:
    world = build_world(tmp_path, retry="[1s]")
    sink = world.sinks["clinic"]
    async with start(world) as running:
        await sink.stop()
        dropped: list[int] = []
        loop = asyncio.get_running_loop()
        dropper = await loop.create_server(lambda: DroppingNextHop(dropped), "127.0.0.1",
                                           sink.port)
        try:
            await send_tagged(running, ["dropped-0", "dropped-1"], to_clinic=True)
            for _ in range(100):
                if len(dropped) >= 3:
                    break
                await asyncio.sleep(0.1)
            assert len(dropped) >= 3, "the gateway did not retry after the drop"
        finally:
            dropper.close()
            await dropper.wait_closed()
        await sink.start()
        await sink.wait(2, timeout=30)
        await asyncio.sleep(1.5)
        assert sorted(bodies(world, "clinic")) == ["dropped-0", "dropped-1"]
    deferred = [r for r in audit_records(world) if r.get("event") == "deferred"]
    assert deferred and all(r["reply"].startswith("4") for r in deferred)


class SlowNextHop(asyncio.Protocol):
    """Every reply goes out at one byte per second (a tarpit)."""

    def __init__(self, writers: set[asyncio.Task[None]]) -> None:
        self.writers = writers
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.writers.add(asyncio.ensure_future(self._drip(b"220 slow ESMTP\r\n")))

    def data_received(self, data: bytes) -> None:
        self.writers.add(asyncio.ensure_future(self._drip(b"250 OK\r\n" * data.count(b"\r\n"))))

    async def _drip(self, reply: bytes) -> None:
        for index in range(len(reply)):
            if self.transport is None or self.transport.is_closing():
                return
            self.transport.write(reply[index:index + 1])
            await asyncio.sleep(1.0)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None


async def test_a_slow_next_hop_does_not_slow_other_routes(tmp_path: Path) -> None:
    world = build_world(tmp_path, retry="[1s]")
    slow_sink, fast_sink = world.sinks["hospital"], world.sinks["clinic"]
    writers: set[asyncio.Task[None]] = set()
    async with start(world) as running:
        await slow_sink.stop()
        loop = asyncio.get_running_loop()
        tarpit = await loop.create_server(lambda: SlowNextHop(writers), "127.0.0.1",
                                          slow_sink.port)
        try:
            # Fill the slow route first, so that it holds whatever it can hold.
            await send_tagged(running, [f"slow-{index}" for index in range(5)])
            await send_tagged(running, [f"fast-{index}" for index in range(10)], to_clinic=True)
            # The slow greeting alone is 16 seconds long: the fast route must be done before
            # the slow one has delivered anything.
            await fast_sink.wait(10, timeout=12)
            assert len(fast_sink.messages) == 10
            assert slow_sink.messages == []
            # The slow route's messages are all still safely queued.
            waiting = [e for e in running.gateway.spool.entries() if e.envelope is not None
                       and e.envelope.recipients[0].address == RECIPIENT]
            assert len(waiting) == 5
        finally:
            tarpit.close()
            for task in writers:
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.gather(*writers, return_exceptions=True)
