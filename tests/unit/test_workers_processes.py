"""The crypto worker processes (`gateway.workers.ProcessWorkers`): `pipeline.prepare` in child
processes that run under the gateway's own configuration, over pipes only.

What must hold: a worker answers what `prepare` in the gateway's process answers; it runs the
`Config` the gateway loaded (sent to it, not read again from a routing.yaml that may have
changed since); a worker whose key material differs from the gateway's is never used, the
message is prepared in a thread instead; a worker killed between two messages is replaced
without failing the next one.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import os
import signal
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest

from gateway.config import NetworkSettings
from gateway.delivery import Outcome
from gateway.envelope import Envelope, Peer, Recipient
from gateway.pipeline import prepare
from gateway.qmgr import QueueManager
from gateway.runtime import Runtime
from gateway.spool import Spool
from gateway.workers import NotReady, ProcessWorkers, ThreadWorkers, Workers, needs_crypto
from tests.support.world import build_world, message

SENDER, RECIPIENT = "a@clinique-test.fr", "b@chu-test.fr"
NOW = dt.datetime(2026, 11, 23, 9, 0, tzinfo=dt.UTC)
LONG = 60.0


def envelope(queue_id: str = "1K1K0000000000AAA") -> Envelope:
    return Envelope(queue_id, SENDER, (Recipient(RECIPIENT, "hospital"),), "clinic",
                    Peer("127.0.0.1"), time.time(), 100, message_id="<m1@test>")


@pytest.fixture
def world_runtime(tmp_path: Path) -> tuple[Path, Runtime]:
    world = build_world(tmp_path)
    return world.config, Runtime.load(world.config)


@pytest.fixture
async def processes() -> AsyncIterator[ProcessWorkers]:
    pool = ProcessWorkers(1)
    yield pool
    await pool.close()


async def test_a_worker_answers_what_prepare_answers_in_the_gateway(
    world_runtime: tuple[Path, Runtime], processes: ProcessWorkers,
) -> None:
    _config, runtime = world_runtime
    raw = message(SENDER, RECIPIENT)
    here = prepare(runtime, envelope(), raw, envelope().recipients, NOW)
    there = await processes.prepare(LONG, runtime, envelope(), raw, envelope().recipients, NOW)
    assert [b.content for b in there.batches] == [b.content for b in here.batches]
    assert [b.recipients for b in there.batches] == [b.recipients for b in here.batches]
    assert there.verdict == here.verdict and dict(there.failed) == {}


async def test_a_worker_runs_the_configuration_the_gateway_loaded_not_the_file(
    world_runtime: tuple[Path, Runtime], processes: ProcessWorkers,
) -> None:
    config, first = world_runtime
    raw = message(SENDER, RECIPIENT)
    prepared = await processes.prepare(LONG, first, envelope(), raw, envelope().recipients, NOW)
    assert b"by passerelle.test" in prepared.batches[0].content
    config.write_text(config.read_text().replace("hostname: passerelle.test",
                                                 "hostname: relais.test"))
    second = Runtime.load(config)  # a reload
    config.write_text(config.read_text().replace("hostname: relais.test",
                                                 "hostname: ailleurs.test"))
    prepared = await processes.prepare(LONG, second, envelope(), raw, envelope().recipients, NOW)
    assert b"by relais.test" in prepared.batches[0].content
    # An attempt that began under the first configuration still gets the first.
    prepared = await processes.prepare(LONG, first, envelope(), raw, envelope().recipients, NOW)
    assert b"by passerelle.test" in prepared.batches[0].content


async def test_a_worker_whose_key_material_differs_is_not_used(
    world_runtime: tuple[Path, Runtime], processes: ProcessWorkers,
) -> None:
    _config, runtime = world_runtime
    # As if a key file had been replaced between the gateway's load and the worker's.
    other = dataclasses.replace(runtime, keyring=dataclasses.replace(
        runtime.keyring, trust=dataclasses.replace(runtime.keyring.trust, anchors=())))
    raw = message(SENDER, RECIPIENT)
    with pytest.raises(NotReady):
        await processes.prepare(LONG, other, envelope(), raw, envelope().recipients, NOW)
    with pytest.raises(NotReady):  # and not tried again for that configuration
        await processes.prepare(LONG, other, envelope(), raw, envelope().recipients, NOW)
    prepared = await processes.prepare(LONG, runtime, envelope(), raw, envelope().recipients,
                                       NOW)
    assert prepared.batches


class Accepting:
    """A `Transport` that takes every message."""

    def __init__(self) -> None:
        self.messages: list[bytes] = []

    async def send(self, network: NetworkSettings, sender: str,
                   recipients: Sequence[Recipient], message: bytes, *, envid: str | None,
                   ret: str | None) -> list[Outcome]:
        self.messages.append(message)
        return [Outcome(r.address, "delivered", 250, "2.0.0", "Ok", None) for r in recipients]


async def test_without_usable_worker_processes_the_message_is_prepared_in_a_thread(
    tmp_path: Path, world_runtime: tuple[Path, Runtime], processes: ProcessWorkers,
) -> None:
    _config, runtime = world_runtime
    other = dataclasses.replace(runtime, keyring=dataclasses.replace(
        runtime.keyring, trust=dataclasses.replace(runtime.keyring.trust, anchors=())))
    spool = Spool(tmp_path / "spool")
    spool.open()
    hop = Accepting()
    workers = Workers(ThreadWorkers(1), processes, kind="process")
    manager = QueueManager(spool, lambda: other, hop, workers)
    try:
        queued = envelope(spool.new_queue_id())
        await spool.enqueue(queued, message(SENDER, RECIPIENT))
        await manager.attempt(queued.queue_id)
        assert len(hop.messages) == 1
        assert list(spool.entries()) == []
    finally:
        workers.threads.close()
        spool.close()


async def test_a_worker_killed_between_messages_is_replaced_without_failing_the_next(
    world_runtime: tuple[Path, Runtime], processes: ProcessWorkers,
) -> None:
    _config, runtime = world_runtime
    raw = message(SENDER, RECIPIENT)
    await processes.prepare(LONG, runtime, envelope(), raw, envelope().recipients, NOW)
    [victim] = processes.pids
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while victim in processes.pids and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    prepared = await processes.prepare(LONG, runtime, envelope(), raw, envelope().recipients,
                                       NOW)
    assert prepared.batches and not prepared.failed
    assert processes.lost == 0
    assert victim not in processes.pids


def test_only_crypto_messages_need_a_process(world_runtime: tuple[Path, Runtime]) -> None:
    _config, runtime = world_runtime
    assert not needs_crypto(runtime, envelope(), envelope().recipients)
    smime = dataclasses.replace(runtime.config.networks["hospital"], adapter="smime")
    config = dataclasses.replace(runtime.config,
                                 networks={**runtime.config.networks, "hospital": smime})
    crypto = dataclasses.replace(runtime, config=config)
    assert needs_crypto(crypto, envelope(), envelope().recipients)
    workers = Workers(ThreadWorkers(1), ProcessWorkers(1), kind="auto")
    assert workers.wants_process(crypto, envelope(), envelope().recipients)
    assert not workers.wants_process(runtime, envelope(), envelope().recipients)
    workers.threads.close()
