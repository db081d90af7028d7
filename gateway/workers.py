"""The crypto workers: where `pipeline.prepare` (unwrap + wrap, CPU-bound) runs, off the event
loop, bounded in number and in time.

Two pools, each with a watchdog per job. A job's time limit starts when a worker takes it, not
while it waits for one; a job that overruns it is answered with `Overrun` at once (the queue
manager defers the message with a reason), and its worker is put aside and replaced, so a
pathological input never takes the pool with it:

- `ThreadWorkers`: long-lived threads. A Python thread cannot be stopped, so an overrunning
  thread is abandoned: it leaves the pool, a new thread takes its place, and the abandoned one
  exits when its call returns (its result is dropped). At most `stuck_limit` abandoned threads
  at once: past that the pool shrinks instead of growing, and grows back as they return.
- `ProcessWorkers`: child processes (`python -m gateway.workers`), which escape the GIL, so
  S/MIME and OpenPGP work runs beside the event loop instead of taking turns with it. An
  overrunning worker is killed and a new one started; a worker that dies (a crash in a C
  library, the OOM killer, kill -9) fails its job with `WorkerLost` and is replaced. Parent
  and workers talk over pipes only: the message and everything made of it stay in memory
  (DESIGN §10, no plaintext at rest), and a worker refuses core dumps.

`Workers` puts the two together for the queue manager. For a plain MIME message (no crypto on
either side) copying it to a process and back costs more than the work, so with kind "auto" a
message goes to the processes only when its source network or one of its destinations uses a
crypto adapter; "process" sends everything there, "thread" nothing.

A worker process runs under the configuration of the parent: the parent sends its parsed
`Config`, the worker loads the key files it names and answers with a fingerprint of that key
material (`runtime.key_fingerprint`). If it differs from the parent's (a key file replaced
between the two loads) or the load fails, the workers are not used for that configuration
and its messages run in threads under the parent's own `Runtime` (`NotReady`).

Untrusted input: none is parsed here. Frames come from our own child processes (same user,
same code); the messages inside them are parsed by the adapters, in the workers.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import datetime as dt
import importlib
import logging
import os
import pickle
import queue
import resource
import signal
import struct
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Literal, TypeVar

from gateway import pki
from gateway.config import Config
from gateway.envelope import Envelope, Recipient
from gateway.pipeline import Prepared, prepare
from gateway.runtime import Runtime, key_fingerprint

__all__ = [
    "Kind",
    "NotReady",
    "Overrun",
    "ProcessWorkers",
    "ThreadWorkers",
    "WorkerLost",
    "Workers",
    "default_process_count",
    "needs_crypto",
]

log = logging.getLogger("gateway.workers")

T = TypeVar("T")
Kind = Literal["auto", "process", "thread"]

# How long a worker process may take to start and load the key material of a configuration.
LOAD_TIMEOUT = 120.0
_FRAME = struct.Struct(">Q")
_PIECE = 1024 * 1024


class Overrun(Exception):
    """The job ran past its time limit; its worker was put aside."""


class WorkerLost(Exception):
    """The worker process died while it had the job."""


class NotReady(Exception):
    """The worker processes cannot run this configuration; run the job in a thread."""


# -- threads ------------------------------------------------------------------------------------


@dataclass(eq=False)
class _ThreadJob:
    function: Callable[[], Any]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Any]
    timeout: float
    worker: _Thread | None = None
    started: float | None = None  # time.monotonic() when a worker took it (set by the worker)
    timer: asyncio.TimerHandle | None = None


@dataclass(eq=False)
class _Thread:
    """One worker thread of a `ThreadWorkers` (a plain `threading.Thread` runs it, so that
    anything that wraps `Thread.run`, a profiler say, sees it too)."""

    pool: ThreadWorkers
    abandoned: bool = False

    def run(self) -> None:
        pool = self.pool
        while True:
            job = pool._jobs.get()
            if job is None:
                return
            with pool._lock:
                if job.future.done():  # given up while it waited (shutdown, cancelled)
                    continue
                job.worker = self
                job.started = time.monotonic()
            outcome: tuple[bool, Any]
            try:
                outcome = (True, job.function())
            except BaseException as raised:  # handed to the waiting task, whatever it is
                outcome = (False, raised)
            pool._post(job.loop, pool._settle, job, outcome)
            if self.abandoned:
                pool._post(job.loop, pool._returned, self)
                return


class ThreadWorkers:
    """`count` threads with a watchdog per job (see the module docstring)."""

    def __init__(self, count: int = 4, *, stuck_limit: int | None = None,
                 name: str = "crypto") -> None:
        self.count = max(1, count)
        self.stuck_limit = stuck_limit if stuck_limit is not None else 8 * self.count
        self.name = name
        self._jobs: queue.SimpleQueue[_ThreadJob | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._live: set[_Thread] = set()
        self._stuck: set[_Thread] = set()
        self._serial = 0
        self._closed = False
        self.overruns = 0

    @property
    def threads(self) -> int:
        """Threads alive now, abandoned ones included."""
        return len(self._live) + len(self._stuck)

    def _grow(self) -> None:
        while not self._closed and len(self._live) < self.count and (
            len(self._live) + len(self._stuck) < self.count + self.stuck_limit
        ):
            self._serial += 1
            worker = _Thread(self)
            self._live.add(worker)
            # A daemon: an abandoned one never holds up the exit.
            threading.Thread(target=worker.run, name=f"{self.name}-{self._serial}",
                             daemon=True).start()

    async def run(self, timeout: float, function: Callable[[], T]) -> T:
        """`function()` on a worker thread; `Overrun` if it takes longer than `timeout`
        seconds once started. Exceptions it raises are raised here."""
        if self._closed:
            raise RuntimeError("the crypto workers are closed")
        loop = asyncio.get_running_loop()
        job = _ThreadJob(function, loop, loop.create_future(), timeout)
        self._grow()
        # The watchdog looks at the job when its limit would be up were it running already,
        # and again until it is up since the job started (no call from the worker needed).
        job.timer = loop.call_later(timeout, self._watch, job)
        self._jobs.put(job)
        try:
            result: T = await job.future
        except asyncio.CancelledError:
            with self._lock:
                job.future.cancel()  # a worker that has not taken it yet skips it
            raise
        return result

    @staticmethod
    def _post(loop: asyncio.AbstractEventLoop, callback: Callable[..., None],
              *args: Any) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits any more
            loop.call_soon_threadsafe(callback, *args)

    def _watch(self, job: _ThreadJob) -> None:
        if job.future.done():
            return
        started = job.started
        left = job.timeout if started is None else started + job.timeout - time.monotonic()
        if left > 0:
            job.timer = job.loop.call_later(left, self._watch, job)
        else:
            self._expire(job)

    def _settle(self, job: _ThreadJob, outcome: tuple[bool, Any]) -> None:
        if job.timer is not None:
            job.timer.cancel()
        if job.future.done():
            return  # overran (answered already) or given up
        ok, value = outcome
        if ok:
            job.future.set_result(value)
        else:
            job.future.set_exception(value)

    def _expire(self, job: _ThreadJob) -> None:
        if job.future.done():
            return
        worker = job.worker
        if worker is not None and not worker.abandoned:
            worker.abandoned = True
            self._live.discard(worker)
            self._stuck.add(worker)
            self.overruns += 1
            if len(self._stuck) >= self.stuck_limit:
                log.error("%d crypto threads are stuck in calls that overran; the pool runs "
                          "with fewer threads until they return", len(self._stuck))
            self._grow()
        job.future.set_exception(Overrun(f"overran {job.timeout:g}s"))

    def _returned(self, worker: _Thread) -> None:
        self._stuck.discard(worker)
        self._grow()

    def close(self) -> None:
        """No new jobs; idle threads exit. Threads busy in a call finish it (they are daemons,
        so they never hold up the process exit)."""
        self._closed = True
        for _ in range(len(self._live) + len(self._stuck)):
            self._jobs.put(None)


# -- processes ----------------------------------------------------------------------------------


class _Lost(Exception):
    """The worker's pipe closed (it died or exited)."""


@dataclass(frozen=True)
class _Generation:
    number: int
    runtime: Runtime
    fingerprint: str
    loaded_at: dt.datetime


@dataclass(eq=False)
class _ProcessJob:
    generation: _Generation
    request: tuple[Any, ...] | None  # None: load the generation only
    blob: bytes  # the message, sent as is beside the request
    timeout: float
    future: asyncio.Future[Prepared] | None


@dataclass(eq=False)
class _Child:
    process: asyncio.subprocess.Process
    generation: int | None = None
    jobs: int = 0

    @property
    def alive(self) -> bool:
        return self.process.returncode is None

    async def call(self, request: tuple[Any, ...], blob: bytes = b"") -> tuple[Any, ...]:
        """Send `request` (pickled) and `blob` (the message, as is), then read the answer."""
        stdin, stdout = self.process.stdin, self.process.stdout
        assert stdin is not None and stdout is not None
        try:
            payload = pickle.dumps(request, protocol=pickle.HIGHEST_PROTOCOL)
            stdin.write(_FRAME.pack(len(payload)) + payload + _FRAME.pack(len(blob)))
            # In pieces that wait for the pipe: a 25 MiB message is not copied whole into
            # the pipe's buffer.
            view = memoryview(blob)
            for start in range(0, len(blob), _PIECE):
                stdin.write(view[start:start + _PIECE])
                await stdin.drain()
            await stdin.drain()
            size = _FRAME.unpack(await stdout.readexactly(_FRAME.size))[0]
            reply: tuple[Any, ...] = pickle.loads(await stdout.readexactly(size))
        except (asyncio.IncompleteReadError, ConnectionError, BrokenPipeError) as error:
            raise _Lost(str(error) or type(error).__name__) from error
        return reply

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.process.kill()


class ProcessWorkers:
    """`count` worker processes with a watchdog per job (see the module docstring).

    `initializer` ("module:function") is called in each worker before it serves: a seam for
    fault tests, which need a crash or a hang inside the worker itself."""

    def __init__(self, count: int, *, initializer: str | None = None,
                 load_timeout: float = LOAD_TIMEOUT) -> None:
        self.count = max(1, count)
        self.initializer = initializer
        self.load_timeout = load_timeout
        self._jobs: asyncio.Queue[_ProcessJob] | None = None
        self._runners: list[asyncio.Task[None]] = []
        self._children: set[_Child] = set()
        self._generations: list[_Generation] = []
        self._refused: set[int] = set()  # generations the workers could not load as the parent
        self._closed = False
        self.started = 0  # worker processes started, replacements included
        self.overruns = 0
        self.lost = 0

    @property
    def pids(self) -> list[int]:
        """The worker processes alive now."""
        return [c.process.pid for c in self._children if c.alive]

    def _generation(self, runtime: Runtime) -> _Generation:
        for generation in self._generations:
            if generation.runtime is runtime:
                return generation
        number = self._generations[-1].number + 1 if self._generations else 1
        generation = _Generation(number, runtime, key_fingerprint(runtime.keyring),
                                 dt.datetime.now(dt.UTC))
        # Attempts still running under an older configuration keep theirs; older ones go.
        self._generations = [*self._generations[-3:], generation]
        return generation

    def start(self, runtime: Runtime) -> None:
        """Start the workers now (they also start on first use) and have each load `runtime`
        ahead of the first message that needs it."""
        known = any(g.runtime is runtime for g in self._generations)
        generation = self._generation(runtime)
        self._ensure_runners()
        assert self._jobs is not None
        if not known:
            for _ in range(self.count):
                self._jobs.put_nowait(_ProcessJob(generation, None, b"", 0.0, None))

    def _ensure_runners(self) -> None:
        if self._jobs is None:
            self._jobs = asyncio.Queue()
        self._runners = [runner for runner in self._runners if not runner.done()]
        while len(self._runners) < self.count:
            self._runners.append(asyncio.get_running_loop().create_task(self._runner()))

    async def prepare(self, timeout: float, runtime: Runtime, envelope: Envelope, raw: bytes,
                      recipients: Sequence[Recipient], now: dt.datetime) -> Prepared:
        """`pipeline.prepare` in a worker process; `Overrun`, `WorkerLost`, or `NotReady` (run
        it in a thread instead)."""
        if self._closed:
            raise NotReady("the worker processes are closed")
        generation = self._generation(runtime)
        if generation.number in self._refused:
            raise NotReady("the worker processes could not load this configuration")
        self._ensure_runners()
        assert self._jobs is not None
        future: asyncio.Future[Prepared] = asyncio.get_running_loop().create_future()
        request = ("prepare", envelope, tuple(recipients), now)
        self._jobs.put_nowait(_ProcessJob(generation, request, raw, timeout, future))
        return await future

    async def _runner(self) -> None:
        """One worker slot: its process (started again whenever it is gone) takes the jobs one
        at a time, each under its watchdog."""
        assert self._jobs is not None
        child: _Child | None = None
        try:
            while True:
                job = await self._jobs.get()
                if job.future is not None and job.future.done():
                    continue  # given up while it waited
                try:
                    child = await self._run(child, job)
                except Exception:
                    # A defect here must not leave the message waiting for ever: it goes to a
                    # thread, and this slot starts again with a new process.
                    log.exception("crypto worker slot failed; the message goes to a thread")
                    self._settle(job, exception=NotReady("the worker slot failed"))
                    if child is not None:
                        await self._retire(child, kill=True)
                    child = None
                    await asyncio.sleep(1.0)
        finally:
            if child is not None:
                await self._retire(child, kill=True)

    async def _run(self, child: _Child | None, job: _ProcessJob) -> _Child | None:
        """`job` on `child` (or a new process); the process to keep for the next job."""
        if child is None or not child.alive:
            child = await self._spawn()
            if child is None:
                # No process can be started now: this job and those waiting go to threads,
                # and the next one tries again.
                self._settle(job, exception=NotReady("no worker process could start"))
                await self._refuse_waiting("no worker process could be started")
                await asyncio.sleep(1.0)
                return None
        try:
            await self._load(child, job.generation)
        except NotReady as refusal:
            self._settle(job, exception=refusal)
            return child
        except _Lost:
            # Died between jobs, or while loading: not this message's doing.
            self._settle(job, exception=NotReady("the worker process stopped"))
            await self._retire(child, kill=True)
            return None
        if job.request is None:
            return child  # only loading ahead of the messages (`start`)
        child.jobs += 1
        try:
            reply = await asyncio.wait_for(child.call(job.request, job.blob), job.timeout)
        except TimeoutError:
            self.overruns += 1
            log.error("crypto worker %d overran %gs; killed and replaced", child.process.pid,
                      job.timeout)
            await self._retire(child, kill=True)
            self._settle(job, exception=Overrun(f"overran {job.timeout:g}s"))
            return None
        except _Lost:
            self.lost += 1
            code = await self._retire(child, kill=True)
            log.error("crypto worker %d died (%s) while preparing a message; replaced",
                      child.process.pid, _exit_text(code))
            self._settle(job, exception=WorkerLost(f"worker died ({_exit_text(code)})"))
            return None
        if reply[0] == "done":
            self._settle(job, result=reply[1])
        else:
            # prepare raised past its own handlers, or its answer could not be sent: the
            # worker said so, and is still usable.
            self._settle(job, exception=WorkerLost(str(reply[1])))
        return child

    async def _refuse_waiting(self, why: str) -> None:
        assert self._jobs is not None
        while not self._jobs.empty():
            self._settle(self._jobs.get_nowait(), exception=NotReady(why))

    @staticmethod
    def _settle(job: _ProcessJob, *, result: Prepared | None = None,
                exception: BaseException | None = None) -> None:
        if job.future is None or job.future.done():
            return
        if exception is not None:
            job.future.set_exception(exception)
        else:
            assert result is not None
            job.future.set_result(result)

    async def _spawn(self) -> _Child | None:
        root = str(Path(__file__).resolve().parents[1])
        path = os.environ.get("PYTHONPATH")
        environment = {**os.environ, "PYTHONPATH": root + (os.pathsep + path if path else "")}
        command = [sys.executable, "-m", "gateway.workers"]
        if self.initializer:
            command.append(self.initializer)
        try:
            process = await asyncio.create_subprocess_exec(
                *command, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                env=environment,
            )
        except OSError as error:
            log.error("could not start a crypto worker process: %s", error)
            return None
        child = _Child(process)
        self._children.add(child)
        self.started += 1
        return child

    async def _load(self, child: _Child, generation: _Generation) -> None:
        """Have `child` run under `generation`; NotReady if it cannot, as the parent does."""
        if child.generation == generation.number:
            return
        if generation.number in self._refused:
            raise NotReady("the worker processes could not load this configuration")
        request = ("load", generation.runtime.config, generation.loaded_at)
        try:
            reply = await asyncio.wait_for(child.call(request), self.load_timeout)
        except TimeoutError:
            await self._retire(child, kill=True)
            raise _Lost("loading the configuration took too long") from None
        if reply[0] != "loaded" or reply[1] != generation.fingerprint:
            self._refused.add(generation.number)
            why = reply[1] if reply[0] != "loaded" else "its key material differs"
            log.error("the crypto worker processes cannot run the current configuration (%s); "
                      "its messages are prepared in threads instead", why)
            raise NotReady(str(why))
        child.generation = generation.number

    async def _retire(self, child: _Child, *, kill: bool) -> int | None:
        if kill:
            child.kill()
        elif child.process.stdin is not None:
            child.process.stdin.close()  # end of input: the worker exits
        try:
            code = await asyncio.wait_for(child.process.wait(), 5.0)
        except TimeoutError:
            child.kill()
            code = await child.process.wait()
        self._children.discard(child)
        return code

    async def close(self) -> None:
        """Stop the workers: idle ones exit at once, busy ones are killed (their messages stay
        in the spool and are prepared again at the next start)."""
        self._closed = True
        for runner in self._runners:
            runner.cancel()
        for runner in self._runners:
            with contextlib.suppress(asyncio.CancelledError):
                await runner
        self._runners.clear()
        for child in list(self._children):
            await self._retire(child, kill=True)
        if self._jobs is not None:
            await self._refuse_waiting("the worker processes are closed")


def _exit_text(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
        return f"killed by signal {-code}"
    return f"exit status {code}"


# -- the two together ---------------------------------------------------------------------------


def needs_crypto(runtime: Runtime, envelope: Envelope, recipients: Sequence[Recipient]) -> bool:
    """Whether preparing this message unwraps or wraps anything but plain MIME."""
    networks = runtime.config.networks
    names = {r.network for r in recipients}
    if not envelope.generated:
        names.add(envelope.source_network)
    return any(n in networks and networks[n].adapter != "mime" for n in names)


@dataclass
class Workers:
    """What the queue manager prepares messages on: threads always, worker processes for the
    messages `kind` sends there (see the module docstring)."""

    threads: ThreadWorkers = field(default_factory=ThreadWorkers)
    processes: ProcessWorkers | None = None
    kind: Kind = "thread"

    def wants_process(self, runtime: Runtime, envelope: Envelope,
                      recipients: Sequence[Recipient]) -> bool:
        if self.processes is None or self.kind == "thread":
            return False
        return self.kind == "process" or needs_crypto(runtime, envelope, recipients)

    def start(self, runtime: Runtime) -> None:
        """Start the worker processes ahead of the first message that needs them (a process
        takes a moment to start), unless no configured network would ever use them."""
        if self.processes is None or self.kind == "thread":
            return
        if self.kind == "process" or any(
            n.adapter != "mime" for n in runtime.config.networks.values()
        ):
            self.processes.start(runtime)

    async def close(self) -> None:
        self.threads.close()
        if self.processes is not None:
            await self.processes.close()


def default_process_count() -> int:
    """One worker process per core, and one core left to the event loop where there are
    more than two."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cores = cores or 1
    return cores - 1 if cores > 2 else cores


# -- the worker process -------------------------------------------------------------------------


def _protect() -> None:
    """What a worker holds is plaintext: never in a core file, never outliving the gateway."""
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE 0: no core, even through a core pipe
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG: die with the gateway


def _read_request(source: BinaryIO) -> tuple[tuple[Any, ...], bytes] | None:
    """The next request and its blob; None at the end of input."""
    body = _read_frame(source)
    blob = _read_frame(source) if body is not None else None
    if body is None or blob is None:
        return None
    request: tuple[Any, ...] = pickle.loads(body)
    return request, blob


def _read_frame(source: BinaryIO) -> bytes | None:
    header = _read_exact(source, _FRAME.size)
    return None if header is None else _read_exact(source, _FRAME.unpack(header)[0])


def _read_exact(source: BinaryIO, size: int) -> bytes | None:
    buffer = bytearray(size)
    view = memoryview(buffer)
    done = 0
    while done < size:
        count = source.readinto(view[done:])  # type: ignore[attr-defined]
        if not count:
            return None
        done += count
    view.release()
    return bytes(buffer)


def _write_frame(sink: BinaryIO, reply: tuple[Any, ...]) -> None:
    try:
        payload = pickle.dumps(reply, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as error:  # an answer that cannot cross: say so instead
        payload = pickle.dumps(("failed", f"the answer could not be sent: {error!r}"))
    sink.write(_FRAME.pack(len(payload)))
    sink.write(payload)
    sink.flush()


def _serve(source: BinaryIO, sink: BinaryIO) -> None:
    runtime: Runtime | None = None
    while True:
        received = _read_request(source)
        if received is None:
            return  # the gateway closed the pipe: its end, or ours
        request, raw = received
        if request[0] == "load":
            config: Config = request[1]
            try:
                keyring = pki.load_keyring(config, request[2])
            except Exception as error:
                runtime = None
                _write_frame(sink, ("refused", f"{type(error).__name__}: {error}"))
                continue
            runtime = Runtime(config, keyring, None)
            _write_frame(sink, ("loaded", key_fingerprint(keyring)))
        elif request[0] == "prepare":
            if runtime is None:
                _write_frame(sink, ("failed", "no configuration loaded"))
                continue
            _, envelope, recipients, now = request
            try:
                reply: tuple[Any, ...] = ("done", prepare(runtime, envelope, raw, recipients,
                                                          now))
            except BaseException as error:  # prepare catches Exception; this is the rest
                reply = ("failed", f"{type(error).__name__}: {error}")
            _write_frame(sink, reply)


def main(argv: Sequence[str]) -> None:
    _protect()
    # Frames travel on the original stdout; anything a library prints goes to stderr instead.
    sink = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    source = os.fdopen(os.dup(0), "rb", buffering=0)
    logging.basicConfig(level=logging.WARNING, format="crypto worker %(process)d: %(message)s")
    if argv:
        module, _, name = argv[0].partition(":")
        getattr(importlib.import_module(module), name)()
    _serve(source, sink)


if __name__ == "__main__":
    main(sys.argv[1:])
