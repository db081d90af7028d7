"""`make bench`'s "where the time goes" tables: a thread asleep in Event.wait (the spool's
removal timer, the recovery thread's pauses) is not reported as the window's top cost, while
the work done meanwhile is."""

from __future__ import annotations

import cProfile
import threading
from pathlib import Path

from bench.run import top_functions


def busy() -> int:
    return sum(i * i for i in range(200_000))


def test_threads_asleep_in_wait_are_left_out_and_work_is_kept(tmp_path: Path) -> None:
    profile = cProfile.Profile()
    profile.enable()
    threading.Event().wait(0.2)
    busy()
    profile.disable()
    path = tmp_path / "run.prof"
    profile.dump_stats(path)
    rows = top_functions([path])
    names = [row["function"] for row in rows["cumulative"] + rows["own"]]
    assert not any(name.startswith("<method 'acquire'") for name in names), names
    assert any(name.endswith("(busy)") for name in names), names
