"""Crash under load: the real server (`python -m gateway.cli serve`) takes mail on two routes
from several concurrent clients and delivers it to live next hops while it is killed with
SIGKILL at random moments and restarted each time.

After the last restart: every message that got a 250 reached every one of its recipients;
duplicates (at-least-once delivery after a crash between the next hop's 250 and the state
write) are counted and reported, and kept rare; no file is left in the spool; the audit chain
still verifies with `gateway audit verify`.

3 kills in the default run, 20 with PASSERELLE_LONG=1 (`make faults`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import aiosmtplib
import pytest

from tests.faults.test_kill9 import start_server, wait_listening
from tests.support.world import World, build_world, message

pytestmark = pytest.mark.e2e

KILLS = 20 if os.environ.get("PASSERELLE_LONG") else 3
CLIENTS = 4
QUEUE_FOLDERS = ("incoming", "active", "deferred", "hold", "corrupt", "state")


@dataclass
class Load:
    """What the clients were told: tag -> recipients, only for messages that got a 250."""

    accepted: dict[str, tuple[str, ...]] = field(default_factory=dict)
    cut: int = 0  # connections refused or lost (no 250: the client still holds the message)
    stop: bool = False


def route(world: World, index: int) -> tuple[str, tuple[str, ...], bool]:
    """Alternate the two routes; every third message has two recipients."""
    if index % 2:
        recipients = ("b@chu-test.fr", "c@chu-test.fr") if index % 3 == 0 else ("b@chu-test.fr",)
        return "a@clinique-test.fr", recipients, False
    return "x@chu-test.fr", ("y@clinique-test.fr",), True


async def client(world: World, load: Load, number: int) -> None:
    index = 0
    while not load.stop:
        smtp: aiosmtplib.SMTP | None = None
        try:
            smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=world.port, start_tls=True,
                                   tls_context=world.client_context(world.hospital_client),
                                   timeout=10)
            await smtp.connect()
            while not load.stop:
                index += 1
                tag = f"c{number}-{index}"
                sender, recipients, _hospital = route(world, index)
                data = message(sender, recipients[0], subject=tag, body=f"{tag}\r\n")
                _refused, reply = await smtp.sendmail(sender, list(recipients), data)
                if "queued as" in reply:
                    load.accepted[tag] = recipients
        except (aiosmtplib.SMTPException, OSError, TimeoutError):
            load.cut += 1  # the gateway is down or went away mid-transaction: no 250
            await asyncio.sleep(0.05)
        finally:
            if smtp is not None:
                with contextlib.suppress(Exception):
                    smtp.close()


def delivered(world: World) -> Counter[tuple[str, str]]:
    """(tag, recipient) -> how many times a next hop got it."""
    seen: Counter[tuple[str, str]] = Counter()
    for name in ("hospital", "clinic"):
        for received in world.sinks[name].messages:
            tag = received.data.rsplit(b"\r\n\r\n", 1)[1].strip().decode()
            for recipient in received.recipients:
                seen[(tag, recipient)] += 1
    return seen


async def test_sigkill_under_load_loses_nothing(tmp_path: Path) -> None:
    # The hospital client certificate is accepted for both routes: the clinic network peers by
    # address, and a peer matching several networks is resolved by the MAIL FROM domain.
    world = build_world(tmp_path, retry="[1s]")
    for sink in world.sinks.values():
        await sink.start()
    rng = random.Random(20260522)
    load = Load()
    clients = [asyncio.create_task(client(world, load, n)) for n in range(CLIENTS)]
    process = start_server(world)
    try:
        for _kill in range(KILLS):
            await wait_listening(world, process)
            await asyncio.sleep(rng.uniform(0.2, 1.5))  # accepting and delivering meanwhile
            os.kill(process.pid, signal.SIGKILL)
            process.wait()
            process = start_server(world)
        await wait_listening(world, process)
        await asyncio.sleep(0.5)
        load.stop = True
        await asyncio.gather(*clients)

        expected = {(tag, r) for tag, recipients in load.accepted.items() for r in recipients}
        assert expected, "no message was accepted"
        for _ in range(300):  # up to 30 s for the retries after the last restart
            if expected <= set(delivered(world)):
                break
            await asyncio.sleep(0.1)
        seen = delivered(world)
        missing = expected - set(seen)
        assert not missing, f"{len(missing)} accepted deliveries lost: {sorted(missing)[:5]}"
        duplicates = sum(count - 1 for count in seen.values())
        print(f"\n{KILLS} kills, {len(load.accepted)} messages accepted "
              f"({len(expected)} deliveries), {load.cut} connections refused or cut, "
              f"{duplicates} duplicate deliveries")
        # At-least-once: a duplicate needs a kill between the next hop's 250 and the state
        # write, so there can be at most a few per kill (one per delivery in flight).
        assert duplicates <= KILLS * 20

        # Let the queue manager remove what it delivered, then stop cleanly.
        spool = world.root / "var" / "spool"
        leftovers: list[Path] = []
        for _ in range(100):
            leftovers = [p for folder in QUEUE_FOLDERS for p in (spool / folder).glob("*")]
            if not leftovers:
                break
            await asyncio.sleep(0.1)
        assert leftovers == []
    finally:
        load.stop = True
        for task in clients:
            task.cancel()
        await asyncio.gather(*clients, return_exceptions=True)
        process.terminate()
        process.wait(timeout=30)
        for sink in world.sinks.values():
            await sink.stop()

    verify = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "audit", "verify", "-c", str(world.config)],
        capture_output=True, text=True, cwd=world.root, timeout=60,
    )
    assert verify.returncode == 0, verify.stdout + verify.stderr
