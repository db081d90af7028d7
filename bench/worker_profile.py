"""cProfile inside the gateway's crypto worker processes (`python -m gateway.workers`), for
the profile cells: the work those processes do is invisible to a profile of the gateway's own
process.

`bench.run` starts the profiled gateway with a generated `sitecustomize` on PYTHONPATH, which
the workers inherit; it calls `install` in each worker process at interpreter start. The
worker then answers SIGUSR2: the first starts its profiler, the second writes it to
`<directory>/worker-<pid>.prof` and stops it. A `ready-<pid>` file says the hook is in place,
so that only workers that have it are signalled (SIGUSR2 would end any other process).
"""

from __future__ import annotations

import cProfile
import os
import signal
import sys
from pathlib import Path
from types import FrameType

SITECUSTOMIZE = '''\
import os, sys
if os.environ.get("BENCH_WORKER_PROFILE") and sys.orig_argv[1:3] == ["-m", "gateway.workers"]:
    from bench.worker_profile import install
    install(os.environ["BENCH_WORKER_PROFILE"])
'''


def install(directory: str) -> None:
    folder = Path(directory)
    profile = cProfile.Profile()
    running = [False]

    def toggle(number: int, frame: FrameType | None) -> None:
        del number, frame
        if not running[0]:
            running[0] = True
            profile.enable()
            return
        profile.disable()
        running[0] = False
        path = folder / f"worker-{os.getpid()}.prof"
        profile.dump_stats(str(path.with_suffix(".tmp")))
        os.replace(path.with_suffix(".tmp"), path)  # complete when it appears

    signal.signal(signal.SIGUSR2, toggle)
    (folder / f"ready-{os.getpid()}").touch()


def hooked(directory: Path) -> list[int]:
    """The worker processes whose hook is in place (and still alive)."""
    found = []
    for marker in directory.glob("ready-*"):
        pid = int(marker.name.removeprefix("ready-"))
        if Path(f"/proc/{pid}").exists():
            found.append(pid)
    return found


def signal_all(directory: Path) -> list[int]:
    pids = hooked(directory)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGUSR2)
        except ProcessLookupError:
            print(f"crypto worker {pid} is gone", file=sys.stderr)
    return pids
