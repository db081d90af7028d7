"""The benchmark's child processes: the sinks and the gateways it starts, each bounded in time
and each stopped by `Children.stop_all`, which `bench.run` calls on every way out (normal end,
error, Ctrl-C, SIGTERM, SIGHUP)."""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from bench import worker_profile

ROOT = Path(__file__).resolve().parents[1]
STOP_GRACE = 30.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_port(port: int, seconds: float = 60,
              process: subprocess.Popen[bytes] | None = None, greeting: bool = False) -> None:
    """Until something accepts connections on `port` or, with `greeting`, until it also
    sends an SMTP 220 greeting: a listener can be bound before its server is ready to talk."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"process {process.args!r} exited ({process.returncode}) "
                               f"before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as connection:
                if not greeting:
                    return
                connection.settimeout(max(0.1, deadline - time.monotonic()))
                if connection.recv(3) == b"220":
                    return
        except OSError:
            time.sleep(0.02)
    raise RuntimeError(f"nothing {'greets' if greeting else 'listens'} on {port} after "
                       f"{seconds:g} s")


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM when the benchmark dies, even by SIGKILL (Linux
    PR_SET_PDEATHSIG), so that no gateway or sink outlives it."""
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG = 1


class Children:
    """Every process started, stopped in reverse order: SIGTERM, then SIGKILL after a grace."""

    def __init__(self) -> None:
        self.processes: list[subprocess.Popen[bytes]] = []

    def start(self, command: list[str], **options: object) -> subprocess.Popen[bytes]:
        # A session of its own: Ctrl-C reaches only this process, which then stops its
        # children in order (a gateway draining, not dying mid-write).
        process: subprocess.Popen[bytes] = subprocess.Popen(  # type: ignore[call-overload]
            command, start_new_session=True, preexec_fn=_die_with_parent, **options)
        self.processes.append(process)
        return process

    def stop(self, process: subprocess.Popen[bytes], grace: float = STOP_GRACE) -> None:
        if process.stdin is not None:
            with contextlib.suppress(OSError):
                process.stdin.close()
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(grace)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)
        if process in self.processes:
            self.processes.remove(process)

    def stop_all(self) -> None:
        for process in reversed(list(self.processes)):
            with contextlib.suppress(Exception):
                self.stop(process)


class SmtpSink:
    """`smtp-sink -c`: counts transactions; its counter line is read from its output file."""

    def __init__(self, children: Children, work: Path) -> None:
        self.port = free_port()
        self.output = work / "sink.out"
        self.process = children.start(
            ["smtp-sink", "-u", "postfix", "-c", f"127.0.0.1:{self.port}", "1000"],
            stdout=self.output.open("wb"), stderr=subprocess.STDOUT)
        wait_port(self.port, process=self.process)

    def count(self) -> int:
        with self.output.open("rb") as handle:
            handle.seek(max(0, self.output.stat().st_size - 200))
            found = re.findall(rb"mesg=(\d+)", handle.read())
        return int(found[-1]) if found else 0


@dataclass(frozen=True)
class Arrival:
    at: float  # CLOCK_MONOTONIC when the sink said 250
    message_id: str
    recipients: int
    size: int


class StampSink:
    """`bench.stampsink`: a line per message with the time of its 250 and its Message-ID."""

    def __init__(self, children: Children, work: Path) -> None:
        self.port = free_port()
        self.log = work / "stampsink.log"
        self.log.touch()
        self._offset = 0
        self._partial = b""
        self.arrivals: list[Arrival] = []
        self.process = children.start(
            [sys.executable, "-m", "bench.stampsink", str(self.port), str(self.log)],
            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
            stdout=subprocess.DEVNULL, stderr=(work / "stampsink.err").open("wb"))
        wait_port(self.port, process=self.process)

    def read(self) -> list[Arrival]:
        """Every arrival so far (read incrementally)."""
        with self.log.open("rb") as handle:
            handle.seek(self._offset)
            data = self._partial + handle.read()
        self._offset += len(data) - len(self._partial)
        lines = data.split(b"\n")
        self._partial = lines.pop()
        for line in lines:
            at, message_id, recipients, size = line.decode("ascii").split(" ")
            self.arrivals.append(Arrival(float(at), message_id, int(recipients), int(size)))
        return self.arrivals

    def count(self) -> int:
        return len(self.read())


def descendants(pid: int) -> list[int]:
    """Every process under `pid` (its crypto workers), from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        parent = int(stat[stat.rindex(")") + 2:].split()[1])
        children.setdefault(parent, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def process_memory(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) in bytes, from /proc/PID/status; {} if it is gone."""
    found: dict[str, int] = {}
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return found
    for line in lines:
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            found[name] = int(value.split()[0]) * 1024
    return found


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (0 if it is gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat[stat.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def reset_peak(pid: int) -> bool:
    """Reset VmHWM to the current RSS (Linux clear_refs, value 5); False if refused."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


class GatewayProcess:
    """One `bench.gateway_child`: `startup` is the seconds from spawn to its first SMTP
    greeting (once it has recovered its spool)."""

    def __init__(self, children: Children, config: Path, port: int, work: Path, name: str,
                 profile: Path | None = None, ready_within: float = 600.0) -> None:
        self.children = children
        self.stats_path = work / f"gateway-{name}-stats.json"
        command = [sys.executable, "-m", "bench.gateway_child", str(config),
                   str(self.stats_path)] + ([str(profile)] if profile else [])
        environment = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.worker_profiles: Path | None = None
        if profile is not None:
            # The crypto worker processes profile themselves (bench.worker_profile).
            self.worker_profiles = profile.with_suffix(".workers")
            self.worker_profiles.mkdir(exist_ok=True)
            hook = profile.with_suffix(".site")
            hook.mkdir(exist_ok=True)
            (hook / "sitecustomize.py").write_text(worker_profile.SITECUSTOMIZE)
            environment.update(PYTHONPATH=f"{ROOT}{os.pathsep}{hook}",
                               BENCH_WORKER_PROFILE=str(self.worker_profiles))
        started = time.monotonic()
        self.process = children.start(
            command, cwd=config.parent, env=environment,
            stdout=(work / f"gateway-{name}.log").open("ab"), stderr=subprocess.STDOUT)
        self.port = port
        wait_port(port, ready_within, self.process, greeting=True)
        self.startup = time.monotonic() - started

    @property
    def pid(self) -> int:
        return self.process.pid

    def stats(self) -> dict[str, int]:
        """The spool counters, written by the child on SIGUSR1."""
        path = self.stats_path
        before = path.stat().st_mtime_ns if path.exists() else 0
        self.process.send_signal(signal.SIGUSR1)
        for _ in range(200):
            if path.exists() and path.stat().st_mtime_ns != before:
                break
            time.sleep(0.01)
        time.sleep(0.02)
        data: dict[str, int] = json.loads(path.read_text())
        return data

    def tree(self) -> list[int]:
        """The gateway's process and its crypto worker processes."""
        return [self.pid, *descendants(self.pid)]

    def settle(self, seconds: float = 60.0, window: float = 0.5, share: float = 0.05) -> float:
        """Wait until the gateway and its workers are quiet (under `share` of a core over
        `window`): the workers load their key material after the listener is up, and a cell
        measured meanwhile would measure that. Returns the seconds waited (bounded)."""
        started = time.monotonic()
        while time.monotonic() - started < seconds:
            pids = self.tree()
            before = sum(cpu_seconds(pid) for pid in pids)
            time.sleep(window)
            if sum(cpu_seconds(pid) for pid in pids) - before < share * window:
                break
        return time.monotonic() - started

    def start_profile(self) -> None:
        self.process.send_signal(signal.SIGUSR2)
        if self.worker_profiles is not None:
            worker_profile.signal_all(self.worker_profiles)

    def worker_profile_files(self, seconds: float = 10.0) -> list[Path]:
        """Have the profiled workers write their profiles; the files, once written."""
        if self.worker_profiles is None:
            return []
        pids = worker_profile.signal_all(self.worker_profiles)
        wanted = [self.worker_profiles / f"worker-{pid}.prof" for pid in pids]
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and not all(p.exists() for p in wanted):
            time.sleep(0.05)
        time.sleep(0.1)  # the last one's write to finish
        return [p for p in wanted if p.exists()]

    def stop(self) -> None:
        self.children.stop(self.process, STOP_GRACE)
