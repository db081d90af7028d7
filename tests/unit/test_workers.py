"""The crypto thread pool (`gateway.workers.ThreadWorkers`): a bounded set of long-lived
threads with a watchdog per job. A job that overruns is answered with `Overrun` at once, its
thread is abandoned and replaced, and the time limit counts only from when a worker takes
the job. Every blocking call here waits on an Event the test sets, so no thread outlives it.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable

import pytest

from gateway.workers import Overrun, ThreadWorkers

LONG = 30.0  # a time limit no job here comes near, unless it hangs on purpose


@pytest.fixture
async def pools() -> AsyncIterator[Callable[..., ThreadWorkers]]:
    made: list[ThreadWorkers] = []

    def make(count: int = 2, stuck_limit: int | None = None) -> ThreadWorkers:
        pool = ThreadWorkers(count, stuck_limit=stuck_limit)
        made.append(pool)
        return pool

    yield make
    for pool in made:
        pool.close()


async def until(condition: Callable[[], bool]) -> None:
    async def poll() -> None:
        while not condition():
            await asyncio.sleep(0.01)
    await asyncio.wait_for(poll(), 10)


def blocker(release: threading.Event, started: threading.Event | None = None,
            value: str = "done") -> Callable[[], str]:
    def work() -> str:
        if started is not None:
            started.set()
        release.wait(LONG)
        return value
    return work


async def test_results_and_exceptions_come_back(pools: Callable[..., ThreadWorkers]) -> None:
    pool = pools()
    assert await pool.run(LONG, lambda: 6 * 7) == 42

    def broken() -> None:
        raise RecursionError("maximum recursion depth exceeded")

    with pytest.raises(RecursionError):
        await pool.run(LONG, broken)
    assert pool.threads == 2  # an exception is not a hang: the thread stays


async def test_the_pool_is_bounded_and_reuses_its_threads(
    pools: Callable[..., ThreadWorkers],
) -> None:
    pool = pools(3)
    names = await asyncio.gather(*(pool.run(LONG, lambda: threading.current_thread().name)
                                   for _ in range(30)))
    assert len(set(names)) <= 3
    assert pool.threads == 3


async def test_an_overrun_is_answered_at_once_and_its_thread_replaced(
    pools: Callable[..., ThreadWorkers],
) -> None:
    pool = pools(1)
    release = threading.Event()
    try:
        with pytest.raises(Overrun):
            await pool.run(0.1, blocker(release))
        # The stuck thread is still in its call; a new one serves the next jobs meanwhile.
        assert pool.overruns == 1
        assert pool.threads == 2
        assert await pool.run(LONG, lambda: "next") == "next"
    finally:
        release.set()
    await until(lambda: pool.threads == 1)  # the abandoned thread left once its call returned
    assert await pool.run(LONG, lambda: "after") == "after"


async def test_more_hangs_than_threads_do_not_stop_the_pool(
    pools: Callable[..., ThreadWorkers],
) -> None:
    pool = pools(2)
    release = threading.Event()
    try:
        hung = await asyncio.gather(*(pool.run(0.1, blocker(release)) for _ in range(5)),
                                    return_exceptions=True)
        assert all(isinstance(result, Overrun) for result in hung)
        assert await pool.run(LONG, lambda: "still serving") == "still serving"
    finally:
        release.set()
    await until(lambda: pool.threads == 2)


async def test_the_time_limit_starts_when_a_thread_takes_the_job(
    pools: Callable[..., ThreadWorkers],
) -> None:
    pool = pools(1)
    release, started = threading.Event(), threading.Event()
    first = asyncio.ensure_future(pool.run(LONG, blocker(release, started, "first")))
    await until(started.is_set)
    # Queued behind the busy thread for longer than its own limit: waiting is not running.
    second = asyncio.ensure_future(pool.run(0.2, lambda: "second"))
    await asyncio.sleep(0.5)
    assert not second.done()
    release.set()
    assert await first == "first"
    assert await second == "second"
    assert pool.overruns == 0


async def test_past_the_stuck_limit_the_pool_shrinks_then_grows_back(
    pools: Callable[..., ThreadWorkers],
) -> None:
    pool = pools(1, stuck_limit=1)
    release = threading.Event()
    try:
        with pytest.raises(Overrun):
            await pool.run(0.1, blocker(release))
        # One stuck thread is the limit: its replacement is the last thread started.
        assert pool.threads == 2
        with pytest.raises(Overrun):
            await pool.run(0.1, blocker(release))
        assert pool.threads == 2
        waiting = asyncio.ensure_future(pool.run(LONG, lambda: "served"))
        await asyncio.sleep(0.2)
        assert not waiting.done()  # no thread to run it until a stuck one returns
    finally:
        release.set()
    assert await waiting == "served"
    await until(lambda: pool.threads == 1)


async def test_a_job_given_up_before_it_starts_never_runs(
    pools: Callable[..., ThreadWorkers],
) -> None:
    pool = pools(1)
    release, started = threading.Event(), threading.Event()
    ran: list[str] = []
    first = asyncio.ensure_future(pool.run(LONG, blocker(release, started)))
    await until(started.is_set)
    second = asyncio.ensure_future(pool.run(LONG, lambda: ran.append("second")))
    await asyncio.sleep(0)
    second.cancel()
    release.set()
    await first
    assert await pool.run(LONG, lambda: "third") == "third"
    assert ran == []


async def test_a_closed_pool_takes_no_more_jobs(pools: Callable[..., ThreadWorkers]) -> None:
    pool = pools(1)
    assert await pool.run(LONG, lambda: 1) == 1
    pool.close()
    with pytest.raises(RuntimeError):
        await pool.run(LONG, lambda: 2)
