"""Never lose an accepted message: kill -9 the real server while its next hop is down, restart it,
and every message that got a 250 arrives."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import aiosmtplib
import pytest

from tests.support.world import World, build_world, message

pytestmark = pytest.mark.e2e


def start_server(world: World) -> subprocess.Popen[bytes]:
    log = open(world.root / "server.log", "ab")
    return subprocess.Popen(
        [sys.executable, "-m", "gateway.cli", "serve", "-c", str(world.config)],
        stdout=log, stderr=subprocess.STDOUT, cwd=world.root,
    )


async def wait_listening(world: World, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError((world.root / "server.log").read_text())
        try:
            _reader, writer = await asyncio.open_connection("127.0.0.1", world.port)
            writer.close()
            return
        except OSError:
            await asyncio.sleep(0.1)
    raise AssertionError("the gateway did not start listening")


async def send_batch(world: World, count: int, tag: str) -> list[str]:
    accepted = []
    smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=world.port, start_tls=True,
                           tls_context=world.client_context(None), timeout=20)
    await smtp.connect()
    for index in range(count):
        data = message("a@clinique-test.fr", "b@chu-test.fr", subject=f"{tag}-{index}",
                       body=f"{tag}-{index}\r\n")
        _refused, reply = await smtp.sendmail("a@clinique-test.fr", ["b@chu-test.fr"], data)
        accepted.append(f"{tag}-{index}")
        assert "queued as" in reply
    await smtp.quit()
    return accepted


async def test_kill_minus_nine_then_restart_delivers_everything(tmp_path: Path) -> None:
    world = build_world(tmp_path, retry="[1s]")
    sink = world.sinks["hospital"]
    process = start_server(world)
    try:
        await wait_listening(world, process)
        accepted = await send_batch(world, 20, "batch")
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
        # The spool holds them all; now the next hop comes back and the gateway restarts.
        await sink.start()
        process = start_server(world)
        await wait_listening(world, process)
        got = await sink.wait(len(accepted), timeout=60)
        bodies = {m.data.rsplit(b"\r\n\r\n", 1)[1].strip().decode() for m in got}
        assert set(accepted) <= bodies
        await asyncio.sleep(1.5)
        assert len(sink.messages) == len(accepted)  # nothing delivered twice here
        spool = world.root / "var" / "spool"
        leftovers = [p for p in spool.rglob("*")
                     if p.is_file() and "requests" not in p.parts and p.suffix != ".pid"]
        assert leftovers == []
    finally:
        process.terminate()
        process.wait(timeout=30)
        await sink.stop()


async def test_sigterm_drains_and_keeps_the_spool(tmp_path: Path) -> None:
    world = build_world(tmp_path, retry="[1s]")
    sink = world.sinks["hospital"]
    process = start_server(world)
    try:
        await wait_listening(world, process)
        await send_batch(world, 3, "drain")
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
        await sink.start()
        process = start_server(world)
        await wait_listening(world, process)
        await sink.wait(3, timeout=60)
    finally:
        process.terminate()
        process.wait(timeout=30)
        await sink.stop()


async def test_sighup_applies_a_clean_file_and_keeps_the_old_one_otherwise(
    tmp_path: Path,
) -> None:
    world = build_world(tmp_path, retry="[1s]")
    sink = world.sinks["hospital"]
    await sink.start()
    original = world.config.read_text()
    process = start_server(world)
    try:
        await wait_listening(world, process)
        # A broken file is refused by `gateway reload` and, signalled anyway, by the server.
        world.config.write_text(original.replace("to: [hospital]", "to: [nowhere]"))
        refused = subprocess.run(
            [sys.executable, "-m", "gateway.cli", "reload", "-c", str(world.config)],
            capture_output=True, text=True, timeout=60,
        )
        assert refused.returncode == 1
        process.send_signal(signal.SIGHUP)
        await asyncio.sleep(1)
        await send_batch(world, 1, "still-routed")  # old routes still apply
        await sink.wait(1, timeout=30)
        # A clean file that removes the route clinic -> hospital is applied.
        world.config.write_text(original.replace("  - {from: clinic, to: [hospital]}\n", ""))
        applied = subprocess.run(
            [sys.executable, "-m", "gateway.cli", "reload", "-c", str(world.config)],
            capture_output=True, text=True, timeout=60,
        )
        assert applied.returncode == 0, applied.stdout + applied.stderr
        for _ in range(50):
            smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=world.port, start_tls=True,
                                   tls_context=world.client_context(None), timeout=20)
            await smtp.connect()
            await smtp.mail("a@clinique-test.fr")
            try:
                await smtp.rcpt("b@chu-test.fr")
                accepted = True
            except aiosmtplib.SMTPRecipientRefused as error:
                accepted = False
                assert error.code == 550
            await smtp.quit()
            if not accepted:
                break
            await asyncio.sleep(0.2)
        else:
            raise AssertionError("the reloaded routes were never applied")
        audit = subprocess.run(
            [sys.executable, "-m", "gateway.cli", "audit", "verify", "-c", str(world.config)],
            capture_output=True, text=True, timeout=60,
        )
        assert audit.returncode == 0, audit.stdout + audit.stderr
    finally:
        process.terminate()
        process.wait(timeout=30)
        await sink.stop()
