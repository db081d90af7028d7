"""kill -9 a process writing the audit trail the way the gateway does (`received` records made
durable before a 250, the records after delivery written without an fsync of their own): the
chain still verifies after each restart, and no record is lost, neither one whose `durable()`
returned nor one whose write returned (a SIGKILL loses the process, not the page cache; what a
power cut may lose is the unsynced tail, which the next start cuts cleanly if it is torn).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from gateway.audit import AuditTrail, read_records, verify

ROOT = Path(__file__).resolve().parents[2]
KILLS = 20 if os.environ.get("PASSERELLE_LONG") else 3

# The child: 4 sessions; each prints "durable Q" once its received record is durable, and
# "written Q" once its delivered record's write returned.
CHILD = r"""
import asyncio, sys
from pathlib import Path
from gateway.audit import AuditTrail

async def main(folder, tag):
    trail = AuditTrail(Path(folder))
    trail.open()
    print("ready", flush=True)

    async def session(number):
        index = 0
        while True:
            index += 1
            queue_id = f"{tag}-{number}-{index}"
            trail.record("received", queue_id=queue_id, sender="a@clinique-test.fr",
                         recipients=["b@chu-test.fr"], size=index)
            await trail.durable()
            sys.stdout.write(f"durable {queue_id}\n")
            trail.record("delivered", queue_id=queue_id, recipient="b@chu-test.fr",
                         reply="250 2.0.0 Ok")
            sys.stdout.write(f"written {queue_id}\n")
            sys.stdout.flush()
            await asyncio.sleep(0)

    await asyncio.gather(*(session(n) for n in range(4)))

asyncio.run(main(sys.argv[1], sys.argv[2]))
"""


def run_and_kill(folder: Path, tag: str, delay: float) -> list[str]:
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(folder), tag],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT,
                             env={**os.environ, "PYTHONPATH": str(ROOT)})
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


def test_kill_minus_nine_while_auditing_loses_no_record_and_verifies(tmp_path: Path) -> None:
    rng = random.Random(20261201)
    announced: list[str] = []
    for kill in range(KILLS):
        announced += run_and_kill(tmp_path, f"k{kill}", rng.uniform(0.1, 0.6))
        count, broken = verify(tmp_path)
        assert broken is None, str(broken)
        assert count > 0
    durable = {line.split()[1] for line in announced if line.startswith("durable ")}
    written = {line.split()[1] for line in announced if line.startswith("written ")}
    assert durable and written
    # The next start finds no torn record to cut, and appends to the same chain.
    trail = AuditTrail(tmp_path)
    trail.open()
    trail.close()
    records = list(read_records(sorted(tmp_path.iterdir())))
    assert not any(r.get("event") == "repair" for r in records)
    received = {r["queue_id"] for r in records if r.get("event") == "received"}
    delivered = {r["queue_id"] for r in records if r.get("event") == "delivered"}
    assert durable <= received
    assert written <= delivered
    assert verify(tmp_path)[1] is None
