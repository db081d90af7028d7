"""Regression: `AuditTrail.durable` froze the event loop under concurrent SMTP sessions.

A session that called `durable()` after the shared fsync task had finished, but before the
session that started it had cleared it, looped on `await shield(finished_task)`, which never
yields: the loop spun at 100% CPU, no reply, no delivery, no SIGTERM (found by
test_crash_under_load.py). The state is set up directly here, in a child process, so that the
old behaviour fails this test by timeout instead of hanging the test run.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

CHILD = r"""
import asyncio, sys
from pathlib import Path
from gateway.audit import AuditTrail, verify

async def main(folder):
    trail = AuditTrail(Path(folder))
    trail.open()
    finished = asyncio.get_running_loop().create_future()
    finished.set_result(None)
    trail._sync_task = finished  # done, but its creator has not resumed to clear it yet
    trail.record("received", queue_id="X")
    await asyncio.gather(*(trail.durable() for _ in range(5)))
    assert trail._sync_task is None and not trail._dirty
    trail.close()
    count, broken = verify(Path(folder))
    assert broken is None and count >= 2, (count, broken)
    print("ok")

asyncio.run(main(sys.argv[1]))
"""


def test_durable_after_a_finished_fsync_does_not_spin(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path)], capture_output=True,
                          text=True, timeout=30, cwd=ROOT)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr
