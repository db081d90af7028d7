"""swaks, an independent SMTP client from Debian (installed by `make test`), through the gateway:
STARTTLS with a client certificate, pipelining, DSN parameters, and the refusals it sees."""

from __future__ import annotations

import asyncio
import shutil
import subprocess

import pytest

from tests.e2e.conftest import Running
from tests.e2e.test_relay import split_trace

pytestmark = pytest.mark.e2e

SWAKS = shutil.which("swaks") or "swaks"  # `make test` installs it when missing


async def swaks(running: Running, *args: str) -> subprocess.CompletedProcess[str]:
    world = running.world
    command = [SWAKS, "--server", "127.0.0.1", "--port", str(world.port), "--tls",
               "--tls-verify", "--tls-ca-path", str(world.anchor), "--ehlo", "swaks.test",
               "--pipeline", *args]
    return await asyncio.to_thread(
        subprocess.run, command, capture_output=True, text=True, timeout=60,
    )


async def test_swaks_with_client_certificate_reaches_the_clinic(running: Running) -> None:
    world = running.world
    client = world.hospital_client
    cert, key = world.root / "swaks.pem", world.root / "swaks.key"
    cert.write_bytes(client.chain_pem())
    key.write_bytes(client.key_pem)
    done = await swaks(
        running, "--tls-cert", str(cert), "--tls-key", str(key),
        "--from", "dr.martin@chu-test.fr", "--to", "secretariat@clinique-test.fr",
        "--header", "Subject: swaks", "--body", "Bonjour depuis swaks",
        "--tls-sni", "localhost",
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "250 2.0.0 Ok: queued as" in done.stdout
    [got] = await world.sinks["clinic"].wait()
    _trace, rest = split_trace(got.data)
    assert b"Bonjour depuis swaks" in rest


async def test_swaks_sees_the_relay_refusal(running: Running) -> None:
    done = await swaks(running, "--from", "a@clinique-test.fr", "--to", "x@evil.example",
                       "--tls-sni", "localhost")
    assert done.returncode != 0
    assert "550 5.1.2" in done.stdout
