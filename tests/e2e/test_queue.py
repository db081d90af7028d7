"""The queue as an operator sees it: `gateway queue ...` while the server runs, corrupt files,
encryption at rest, and `gateway check` from the command line."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from gateway.cli import main
from gateway.config import NetworkSettings
from gateway.delivery import Outcome
from gateway.envelope import Envelope, Peer, Recipient
from gateway.errors import Reason
from gateway.qmgr import QueueManager
from gateway.runtime import Runtime
from gateway.server import Gateway
from gateway.spool import LOCATIONS, Spool
from tests.e2e.conftest import start
from tests.support.world import World, message
from tests.unit.test_backlog_recovery import folder_counts, seed, until

pytestmark = pytest.mark.e2e


def cli(world: World, *args: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main([*args, "-c", str(world.config)])
    out = capsys.readouterr()
    return code, out.out + out.err


async def queued_id(world: World, capsys: pytest.CaptureFixture[str], location: str) -> str:
    for _ in range(100):
        code, out = cli(world, "queue", "list", capsys=capsys)
        assert code == 0
        rows = [line.split() for line in out.splitlines() if location in line.split()]
        if rows:
            return rows[0][0]
        await asyncio.sleep(0.1)
    raise AssertionError(f"nothing reached {location}: {out}")


async def test_list_show_hold_release_delete_retry(
    world_factory: Callable[..., World], capsys: pytest.CaptureFixture[str],
) -> None:
    world = world_factory(retry="[1h]")  # a deferred message waits an hour unless retried
    sink = world.sinks["hospital"]
    async with start(world) as running:
        await sink.stop()  # the next hop is down
        await running.send("a@clinique-test.fr", ["b@chu-test.fr"],
                           message("a@clinique-test.fr", "b@chu-test.fr", subject="one"))
        queue_id = await queued_id(world, capsys, "deferred")

        code, out = cli(world, "queue", "show", queue_id, capsys=capsys)
        assert code == 0
        assert "<b@chu-test.fr>  deferred  attempts=1" in out
        assert "4.4.1" in out or "4.4.2" in out  # why it waits: the next hop did not answer

        assert cli(world, "queue", "hold", queue_id, capsys=capsys)[0] == 0
        await sink.start()
        assert cli(world, "queue", "retry", queue_id, capsys=capsys)[0] == 1  # held: no retry
        await asyncio.sleep(2.5)
        assert sink.messages == []  # held mail is not delivered

        assert cli(world, "queue", "release", queue_id, capsys=capsys)[0] == 0
        await sink.wait(1, timeout=20)  # released: delivered at once, not in an hour

        await sink.stop()
        await running.send("a@clinique-test.fr", ["b@chu-test.fr"],
                           message("a@clinique-test.fr", "b@chu-test.fr", subject="two"))
        second = await queued_id(world, capsys, "deferred")
        await sink.start()
        assert cli(world, "queue", "retry", second, capsys=capsys)[0] == 0
        await sink.wait(2, timeout=20)

        await sink.stop()
        await running.send("a@clinique-test.fr", ["b@chu-test.fr"],
                           message("a@clinique-test.fr", "b@chu-test.fr", subject="three"))
        third = await queued_id(world, capsys, "deferred")
        assert cli(world, "queue", "delete", third, capsys=capsys)[0] == 0
        code, out = cli(world, "queue", "show", third, capsys=capsys)
        assert code == 1 and "no message" in out


async def test_corrupt_queue_file_is_set_aside_and_the_rest_flows(
    world_factory: Callable[..., World], capsys: pytest.CaptureFixture[str],
) -> None:
    world = world_factory(retry="[1s]")
    sink = world.sinks["hospital"]
    async with start(world) as running:
        await sink.stop()
        for index in range(3):
            await running.send("a@clinique-test.fr", ["b@chu-test.fr"],
                               message("a@clinique-test.fr", "b@chu-test.fr",
                                       subject=f"m{index}", body=f"m{index}\r\n"))
    spool = world.root / "var" / "spool"
    victim = sorted(p for p in (spool / "deferred").iterdir() if p.is_file())[0]
    victim.write_bytes(victim.read_bytes()[:40] + b"\x00garbage")
    async with start(world):
        await sink.wait(2, timeout=30)
        await asyncio.sleep(1.5)
        assert len(sink.messages) == 2
    assert victim.name in {p.name for p in (spool / "corrupt").iterdir()}
    assert not (spool / "deferred" / victim.name).exists()
    _code, out = cli(world, "queue", "list", capsys=capsys)
    assert victim.name in out and "corrupt" in out


async def test_encrypted_spool_holds_no_plaintext(world_factory: Callable[..., World]) -> None:
    world = world_factory(spool_key=True, retry="[1h]")
    async with start(world) as running:
        await world.sinks["hospital"].stop()
        secret = "DUPONT Jean né le 01/02/1950"
        await running.send("a@clinique-test.fr", ["b@chu-test.fr"],
                           message("a@clinique-test.fr", "b@chu-test.fr", subject=secret,
                                   body=secret + "\r\n"))
        await asyncio.sleep(0.5)
        spool = world.root / "var" / "spool"
        files = [p for p in spool.rglob("*") if p.is_file()]
        assert files
        for path in files:
            data = path.read_bytes()
            assert b"DUPONT" not in data and b"chu-test.fr" not in data, path


def test_check_command_line(tmp_path: Path, world_factory: Callable[..., World]) -> None:
    world = world_factory()
    ok = subprocess.run([sys.executable, "-m", "gateway.cli", "check", "-c", str(world.config)],
                        capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    broken = world.config.read_text().replace("to: [hospital]", "to: [hopital]")
    broken = broken.replace("adapter: mime\n    domains: [labo-test.fr]",
                            "adapter: mime\n    domains: [chu-test.fr]")
    bad = tmp_path / "broken.yaml"
    bad.write_text(broken)
    (tmp_path / "pki").mkdir(exist_ok=True)
    failed = subprocess.run([sys.executable, "-m", "gateway.cli", "-c", str(world.config),
                             "check", "--config", str(bad)],  # -c may stand anywhere; last wins
                            capture_output=True, text=True, timeout=60)
    assert failed.returncode == 1
    lines = failed.stdout.splitlines()
    assert any("hopital" in line and line.startswith(f"{bad}:") for line in lines), lines
    assert any("chu-test.fr" in line for line in lines), lines
    assert "fix them and run gateway check again" in failed.stderr


# -- the first attempt of a message this process just accepted -----------------------------------


class Hop:
    """A `Transport` double: 250 for every recipient but those in `bounce`."""

    def __init__(self, bounce: tuple[str, ...] = ()) -> None:
        self.bounce = bounce
        self.sent: list[tuple[str, bytes]] = []

    async def send(self, network: NetworkSettings, sender: str,
                   recipients: Sequence[Recipient], message: bytes, *, envid: str | None,
                   ret: str | None) -> list[Outcome]:
        outcomes = []
        for recipient in recipients:
            if recipient.address in self.bounce:
                outcomes.append(Outcome(recipient.address, "bounced", 550, "5.1.1",
                                        "No such user", Reason.DESTINATION_REFUSED))
            else:
                self.sent.append((recipient.address, message))
                outcomes.append(Outcome(recipient.address, "delivered", 250, "2.0.0", "Ok",
                                        None))
        return outcomes


@dataclass
class Manager:
    qm: QueueManager
    spool: Spool
    hop: Hop
    reads: list[str]  # queue ids whose file the queue manager read back

    async def accept(self, *addresses: str, remember: bool = True) -> Envelope:
        sender = "a@clinique-test.fr"
        envelope = Envelope(
            queue_id=self.spool.new_queue_id(), sender=sender,
            recipients=tuple(Recipient(a, "hospital") for a in addresses),
            source_network="clinic", peer=Peer("127.0.0.1"), received_at=time.time(),
            size=100, message_id="<m1@clinique-test.fr>",
        )
        raw = message(sender, addresses[0])
        await self.spool.enqueue(envelope, raw)
        if remember:
            self.qm.remember(envelope, raw)
        return envelope


@pytest.fixture
async def manager(tmp_path: Path, world_factory: Callable[..., World],
                  monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Manager]:
    world = world_factory()
    runtime = Runtime.load(world.config)
    spool = Spool(tmp_path / "spool")
    spool.open()
    reads: list[str] = []
    load = spool.load

    def counted(queue_id: str) -> tuple[Envelope, bytes]:
        reads.append(queue_id)
        return load(queue_id)

    monkeypatch.setattr(spool, "load", counted)
    hop = Hop(bounce=("nobody@chu-test.fr",))
    qm = QueueManager(spool, lambda: runtime, hop, fresh_budget=64 * 1024)
    yield Manager(qm, spool, hop, reads)
    qm.workers.threads.close()
    spool.close()


async def test_the_first_attempt_of_a_message_in_memory_does_not_read_the_spool(
    manager: Manager,
) -> None:
    envelope = await manager.accept("b@chu-test.fr")
    await manager.qm.attempt(envelope.queue_id)
    assert [address for address, _ in manager.hop.sent] == ["b@chu-test.fr"]
    assert manager.reads == []
    assert manager.qm.fresh == {}
    assert list(manager.spool.entries()) == []


async def test_a_message_not_in_memory_is_read_from_the_spool(manager: Manager) -> None:
    envelope = await manager.accept("b@chu-test.fr", remember=False)
    await manager.qm.attempt(envelope.queue_id)
    assert manager.reads == [envelope.queue_id]
    assert [address for address, _ in manager.hop.sent] == ["b@chu-test.fr"]


async def test_a_message_held_before_its_first_attempt_is_read_back_once_released(
    manager: Manager,
) -> None:
    envelope = await manager.accept("b@chu-test.fr")
    manager.spool.hold(envelope.queue_id)
    await manager.qm.attempt(envelope.queue_id)  # skipped: held
    assert manager.hop.sent == [] and manager.qm.fresh == {}
    manager.spool.release(envelope.queue_id)
    await manager.qm.attempt(envelope.queue_id)
    assert manager.reads == [envelope.queue_id]
    assert [address for address, _ in manager.hop.sent] == ["b@chu-test.fr"]


async def test_memory_kept_for_first_attempts_is_bounded(manager: Manager) -> None:
    manager.qm.fresh_budget = 1
    envelope = await manager.accept("b@chu-test.fr")
    assert manager.qm.fresh == {}
    await manager.qm.attempt(envelope.queue_id)
    assert manager.reads == [envelope.queue_id]


async def test_a_dsn_is_first_sent_from_memory(manager: Manager) -> None:
    envelope = await manager.accept("nobody@chu-test.fr")
    await manager.qm.attempt(envelope.queue_id)
    [notification] = [e for e in manager.spool.entries() if e.envelope and e.envelope.generated]
    assert notification.queue_id in manager.qm.fresh
    await manager.qm.attempt(notification.queue_id)
    [(address, body)] = manager.hop.sent
    assert address == "a@clinique-test.fr" and b"multipart/report" in body
    assert manager.reads == []


async def test_the_accept_stage_can_hand_the_message_to_the_queue_manager(
    world_factory: Callable[..., World],
) -> None:
    world = world_factory()
    gateway = Gateway(world.config)
    envelope = Envelope(
        queue_id=gateway.spool.new_queue_id(), sender="a@clinique-test.fr",
        recipients=(Recipient("b@chu-test.fr", "hospital"),), source_network="clinic",
        peer=Peer("127.0.0.1"), received_at=time.time(), size=100,
    )
    raw = message("a@clinique-test.fr", "b@chu-test.fr")
    gateway._accepted(envelope, raw)
    assert gateway.qmgr.fresh == {envelope.queue_id: (envelope, raw)}
    assert envelope.queue_id in gateway.qmgr.scheduled
    await gateway.workers.close()


# -- the queue gauge while operators work -------------------------------------------------------


async def test_the_queue_gauge_is_right_after_operators_tools_a_reload_and_a_restart(
    world_factory: Callable[..., World], capsys: pytest.CaptureFixture[str],
) -> None:
    world = world_factory(retry="[1h]")
    root = world.root / "var" / "spool"
    backlog = await seed(root, later=40, held=2)
    sink = world.sinks["hospital"]

    def gauge(gateway: Gateway) -> dict[str, int]:
        registry = gateway.events.metrics.registry
        return {state: int(registry.get_sample_value("gateway_queue_messages",
                                                     {"state": state}) or 0)
                for state in LOCATIONS}

    async def settled(gateway: Gateway, **expected: int) -> None:
        """Once the folders hold what is expected and the server is idle, so does the gauge."""
        wanted = {"active": 0, "hold": 2, "corrupt": 0, **expected}
        await until(lambda: not gateway.qmgr.running
                    and gauge(gateway) == folder_counts(root) == wanted)

    async with start(world, queue_recount=0.1) as running:
        await settled(running.gateway, deferred=40)
        await running.send("a@clinique-test.fr", ["b@chu-test.fr"],
                           message("a@clinique-test.fr", "b@chu-test.fr", subject="new"))
        await sink.wait(1)
        await sink.stop()
        await running.send("a@clinique-test.fr", ["b@chu-test.fr"],
                           message("a@clinique-test.fr", "b@chu-test.fr", subject="waits"))
        await queued_id(world, capsys, "active")
        await settled(running.gateway, deferred=41)

        assert cli(world, "queue", "hold", backlog.later[0], capsys=capsys)[0] == 0
        assert cli(world, "queue", "delete", backlog.later[1], capsys=capsys)[0] == 0
        assert cli(world, "queue", "release", backlog.held[0], capsys=capsys)[0] == 0
        assert cli(world, "queue", "retry", backlog.later[2], capsys=capsys)[0] == 0
        await settled(running.gateway, deferred=40)

        assert running.gateway.reload()
        assert cli(world, "queue", "delete", backlog.later[3], capsys=capsys)[0] == 0
        await settled(running.gateway, deferred=39)

    async with start(world) as running:  # the default recount period: counted at start
        await settled(running.gateway, deferred=39)
