"""kill -9 a process that is enqueueing, at random moments: every queue id it announced (only
after `enqueue` returned, i.e. when a 250 would have been sent) is recovered intact.

A SIGKILL loses the process, not the page cache, so this proves the crash atomicity of the
write/rename sequence and the recovery code; survival of a power cut rests on the fsyncs that
the unit tests check are made (file, then directory) before `enqueue` returns.
"""

from __future__ import annotations

import hashlib
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from gateway.spool import Spool

KEY = bytes(range(32))
ROOT = Path(__file__).resolve().parents[2]
KILLS = 20 if os.environ.get("PASSERELLE_LONG") else 3

# The child: 8 concurrent sessions, each prints its queue id once `enqueue` has returned.
CHILD = r"""
import asyncio, hashlib, sys
from pathlib import Path
from gateway.envelope import Envelope, Peer, Recipient
from gateway.spool import Spool

def content(queue_id):
    seed = hashlib.sha256(queue_id.encode()).digest()
    return seed * (1 + seed[0] * 64)  # 32 B to 520 KiB

async def main(root, key):
    spool = Spool(Path(root), key)
    spool.open()
    spool.recover()
    print("ready", flush=True)

    async def session():
        while True:
            queue_id = spool.new_queue_id()
            data = content(queue_id)
            envelope = Envelope(queue_id, "a@clinique-test.fr",
                                (Recipient("b@chu-test.fr", "hospital"),), "medecin",
                                Peer("127.0.0.1"), 0.0, len(data))
            await spool.enqueue(envelope, data)
            sys.stdout.write(queue_id + "\n")
            sys.stdout.flush()

    await asyncio.gather(*(session() for _ in range(8)))

asyncio.run(main(sys.argv[1], bytes.fromhex(sys.argv[2]) or None))
"""


def content(queue_id: str) -> bytes:
    seed = hashlib.sha256(queue_id.encode()).digest()
    return seed * (1 + seed[0] * 64)


def run_and_kill(root: Path, key: bytes | None, delay: float) -> list[str]:
    """Start the child, let it enqueue for `delay` seconds after it is ready, SIGKILL it."""
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(root), (key or b"").hex()],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    lines: list[str] = []
    ready = threading.Event()

    def read() -> None:
        assert child.stdout is not None
        for raw in child.stdout:
            if raw.endswith(b"\n"):  # a line cut by the kill was never fully announced
                lines.append(raw.decode().strip())
                if lines[-1] == "ready":
                    ready.set()

    reader = threading.Thread(target=read)
    reader.start()
    try:
        assert ready.wait(30), "the child did not start"
        time.sleep(delay)
        os.kill(child.pid, signal.SIGKILL)
    finally:
        if child.poll() is None:
            child.kill()
        child.wait(30)
        reader.join(30)
    stderr = child.stderr.read().decode() if child.stderr else ""
    assert child.returncode == -signal.SIGKILL, stderr
    return [line for line in lines if line != "ready"]


@pytest.mark.parametrize("key", [None, KEY], ids=["plain", "encrypted"])
def test_kill_minus_nine_while_enqueueing_loses_nothing(tmp_path: Path, key: bytes | None) -> None:
    rng = random.Random(20260521)
    announced: list[str] = []
    for _ in range(KILLS):
        announced += run_and_kill(tmp_path, key, rng.uniform(0.05, 0.6))
    assert announced, "the child never finished an enqueue"

    spool = Spool(tmp_path, key)
    recovered = {entry.queue_id: entry for entry in spool.recover()}
    assert set(announced) <= set(recovered)
    for queue_id in announced:
        envelope, data = spool.load(queue_id)
        assert envelope.queue_id == queue_id
        assert data == content(queue_id)
    assert list((tmp_path / "corrupt").iterdir()) == []  # no torn file, ever
    assert list((tmp_path / "incoming").iterdir()) == []
