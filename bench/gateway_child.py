"""`python -m bench.gateway_child routing.yaml STATS [PROFILE]`: the gateway as `gateway serve`
runs it, plus its spool counters written to STATS (JSON) on SIGUSR1, for the group-commit
figures. SIGTERM drains and exits, as `gateway serve` does.

With PROFILE, the first SIGUSR2 starts cProfile: on the event loop's thread at once, and in
every other thread (the spool's fsync workers, the crypto workers, asyncio's default executor)
at its next call once SIGUSR2 has come, each with a profiler of its own since a profiler
follows one thread only. Threads started before SIGUSR2 (a warm-up) are included from then on:
a light hook (`threading.setprofile`) waits in each thread and hands over to cProfile. At exit,
after the drain, the spool's workers are joined so that their profiles are complete, and
everything is merged into PROFILE (pstats format). The timer is the wall clock, so a thread
waiting in fsync or for the GIL counts as time spent where it waits.
"""

from __future__ import annotations

import asyncio
import cProfile
import dataclasses
import json
import pstats
import signal
import sys
import threading
from pathlib import Path
from types import FrameType

from gateway.server import Gateway


class Profiling:
    def __init__(self) -> None:
        self.active = False
        self.main = cProfile.Profile()
        self.threads: list[cProfile.Profile] = []
        self.lock = threading.Lock()
        threading.setprofile(self._hook)

    def _hook(self, frame: FrameType, event: str, arg: object) -> None:
        """Every thread's profile function until SIGUSR2; then it installs the thread's own
        cProfile, which replaces it."""
        del frame, event, arg
        if self.active:
            profile = cProfile.Profile()
            with self.lock:
                self.threads.append(profile)
            profile.enable()

    def start(self) -> None:
        if not self.active:
            self.active = True
            self.main.enable()

    def dump(self, path: Path) -> None:
        self.main.disable()
        stats = pstats.Stats(self.main)
        with self.lock:
            for profile in self.threads:
                stats.add(profile)
        stats.dump_stats(str(path))


async def main(config: Path, stats: Path, profiling: Profiling | None) -> Gateway:
    gateway = Gateway(config)
    loop = asyncio.get_running_loop()

    def dump() -> None:
        counters = {f.name: getattr(gateway.spool.stats, f.name)
                    for f in dataclasses.fields(gateway.spool.stats) if not f.name.startswith("_")}
        stats.write_text(json.dumps(counters))

    loop.add_signal_handler(signal.SIGUSR1, dump)
    loop.add_signal_handler(signal.SIGTERM, lambda: asyncio.ensure_future(gateway.stop(5)))
    if profiling is not None:
        loop.add_signal_handler(signal.SIGUSR2, profiling.start)
    # The handlers come first: the listener is bound before start() has finished (it still
    # counts the spool for the queue gauges), and a SIGUSR1 meanwhile would kill the process.
    await gateway.start()
    dump()
    await gateway.wait()
    return gateway


if __name__ == "__main__":
    profile_path = Path(sys.argv[3]) if len(sys.argv) > 3 else None
    profiler = Profiling() if profile_path is not None else None
    stopped = asyncio.run(main(Path(sys.argv[1]), Path(sys.argv[2]), profiler))
    if profiler is not None and profile_path is not None:
        stopped.spool.close()  # joins the spool's worker threads: their profiles end here
        profiler.dump(profile_path)
