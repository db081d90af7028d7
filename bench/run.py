"""`make bench`: every system on the same load generator and the same sinks, in one run, on this
machine; medians of several runs and ratios side by side; results in BENCHMARKS.md.

Systems: the gateway (`bench.gateway_child`, i.e. `gateway serve` plus spool counters) on the
three routes; Postfix (private instance, default durability) on the plain route; the per-message
command-line filter (`bench.filter`) on the two translation routes; the adapters alone (the
pipeline's `prepare`, in-process, no SMTP, one thread) as the ceiling of the translation routes.

Phases, in this order (BENCH_PHASES picks some; the lead's `make bench` runs them all):
- throughput: 10 KiB and 1 MiB messages x 1 and 20 connections x 1 and 10 recipients
  (BENCH_SHAPES="10KiB/1/1,1MiB/20/10" to narrow); each run sends for BENCH_SECONDS (1.5)
  and ends when the sink (`smtp-sink`) has every accepted message. End-to-end throughput =
  messages at the sink / (last one at the sink - first byte sent). BENCH_RUNS (3) runs per
  cell, interleaved between systems; the median is reported. Then the adapters alone.
- scaling: one connection, throughput against size (1 KiB ... 25 MiB) and against recipients
  (1, 10, 50, 100) on the plain route (Passerelle and Postfix) and S/MIME → Apicrypt.
- latency: 10 KiB, one recipient, paced at half the route's best throughput cell, each
  message with its own Message-ID; `bench.stampsink` (the next hop of these cells, for every
  system) stamps its 250 and the load generator each 250 it got: p50/p90/p99 of the difference.
- memory: a fresh gateway per route, one 25 MiB message; peak RSS growth (VmHWM) of the
  gateway's process and its crypto worker processes.
- backlog: a fresh gateway on an empty spool, then on one filled with BENCH_BACKLOG (100,000)
  deferred messages (`bench.backlog`): start-up time, plain throughput and latency of new
  mail, as ratios.
- profile: the worst cells of the run again, under cProfile (`bench.gateway_child` in the
  gateway's process, `bench.worker_profile` in its workers), for "where the time goes".
Every gateway is warmed up with a few messages and left to settle (its crypto workers load
their keys after it listens) before it is measured.
Every wait is bounded (a drain that does not finish in DRAIN seconds is reported as such, a
relay that stops answering ends its cell), and every child process is stopped on any way out:
normal end, error, Ctrl-C, SIGTERM, or BENCH_TIMEOUT (default 45 min) for the whole run.

Outputs: BENCHMARKS.md, bench/results.json and bench/scaling.png, or the same three names in
BENCH_OUT when it is set (smoke runs).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import math
import os
import platform
import pstats
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench import loadgen, postfix
from bench.procs import (
    ROOT,
    Children,
    GatewayProcess,
    SmtpSink,
    StampSink,
    free_port,
    process_memory,
    reset_peak,
    wait_port,
)
from bench.site import (
    BIG,
    GATEWAY_PGP,
    RECIPIENTS,
    SCALING_RECIPIENTS,
    SCALING_ROUTES,
    SCALING_SIZES,
    SIZES,
    Site,
    build,
    tagged,
    variant,
)


def _env_list(name: str, default: str) -> list[str]:
    return [item.strip() for item in os.environ.get(name, default).split(",") if item.strip()]


RUNS = int(os.environ.get("BENCH_RUNS", "3"))
SECONDS = float(os.environ.get("BENCH_SECONDS", "1.5"))
DRAIN = 90.0
SHAPES = [(size, int(c), int(r)) for size, c, r in (
    item.split("/") for item in _env_list(
        "BENCH_SHAPES", ",".join(f"{s}/{c}/{r}" for s in SIZES for c in (1, 20)
                                 for r in (1, RECIPIENTS))))]
SCALING_LABELS = _env_list("BENCH_SCALING_SIZES", ",".join(SCALING_SIZES))
SCALING_COUNTS = [int(r) for r in _env_list("BENCH_SCALING_RECIPIENTS",
                                            ",".join(map(str, SCALING_RECIPIENTS)))]
LATENCY_SECONDS = float(os.environ.get("BENCH_LATENCY_SECONDS", "10"))
LATENCY_MESSAGES = (100, 1500)  # fewest and most messages in one latency cell
LATENCY_CONNECTIONS = 20
BACKLOG = int(os.environ.get("BENCH_BACKLOG", "100000"))
PROFILES = int(os.environ.get("BENCH_PROFILES", "3"))
PHASES = _env_list("BENCH_PHASES", "throughput,scaling,latency,memory,backlog,profile")
TIMEOUT = float(os.environ.get("BENCH_TIMEOUT", str(45 * 60)))
BASELINE = {"plain": "postfix", "smime-to-apicrypt": "filter", "apicrypt-to-smime": "filter"}
ROUTES = ("plain", "smime-to-apicrypt", "apicrypt-to-smime")
Shape = tuple[str, int, int]  # size, connections, recipients


class Interrupted(BaseException):
    """SIGTERM, SIGHUP or the run's time limit: unwinds like Ctrl-C, through the cleanup."""


@dataclass
class Run:
    system: str
    route: str
    size: str
    connections: int
    recipients: int
    accepted: int
    delivered: int
    seconds: float  # first byte sent -> last message at the sink
    accept_rate: float  # msg/s, 250 replies to the load generator
    rate: float  # msg/s end to end
    drained: bool
    spool: dict[str, int] | None = None  # gateway: spool counter deltas during the run


@dataclass
class Latency:
    system: str
    route: str
    spool: str  # "empty" or "backlog"
    rate: float  # msg/s offered
    best: float  # the best throughput it is half of
    sent: int
    matched: int
    missing: int  # a 250 from the relay, nothing at the sink within DRAIN
    p50: float  # seconds
    p90: float
    p99: float
    worst: float
    late_p99: float  # how far behind its schedule the load generator started a send


@dataclass
class Memory:
    route: str
    size: int  # wire bytes of the message
    rss_before: int  # the gateway's process and its workers, summed
    growth: int  # sum over those processes of their peak's growth (VmHWM)
    sampled: int  # growth of the summed RSS, sampled every 10 ms: the peak of the sum
    processes: int  # how many processes (the gateway and its crypto workers)
    peak_reset: bool  # VmHWM was reset to VmRSS before sending (else it holds start-up's peak)
    delivered: bool
    seconds: float


class TreeSampler:
    """The summed RSS of a process tree, polled in a thread, and its maximum."""

    def __init__(self, gateway: GatewayProcess) -> None:
        self.gateway = gateway
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        pids, refreshed = self.gateway.tree(), time.monotonic()
        while not self._stop.wait(0.01):
            if time.monotonic() - refreshed > 0.2:
                pids, refreshed = self.gateway.tree(), time.monotonic()
            self.peak = max(self.peak, sum(process_memory(pid).get("VmRSS", 0) for pid in pids))

    def stop(self) -> int:
        self._stop.set()
        self._thread.join(5)
        return self.peak


@dataclass
class Results:
    runs: list[Run] = field(default_factory=list)
    adapters_alone: dict[str, float] = field(default_factory=dict)
    latency: list[Latency] = field(default_factory=list)
    memory: list[Memory] = field(default_factory=list)
    backlog: dict[str, Any] = field(default_factory=dict)
    profiles: list[dict[str, Any]] = field(default_factory=list)
    events: dict[str, dict[str, int]] = field(default_factory=dict)
    phases: dict[str, float] = field(default_factory=dict)  # seconds each took
    failures: dict[str, str] = field(default_factory=dict)  # phase -> what went wrong


def median_rate(results: Results, system: str, route: str, size: str, connections: int,
                recipients: int) -> float | None:
    found = [r.rate for r in results.runs if (r.system, r.route, r.size, r.connections,
                                               r.recipients) == (system, route, size,
                                                                 connections, recipients)]
    return statistics.median(found) if found else None


class Sink:
    """What `measure` needs of a sink: a count of the messages it has taken."""

    def __init__(self, count: Callable[[], int]) -> None:
        self.count = count


def measure(system: str, port: int, sink: Sink, site: Site, route: str, size: str,
            connections: int, recipients: int, gateway: GatewayProcess | None,
            seconds: float = SECONDS) -> Run:
    chosen = site.routes[route]
    before = sink.count()
    stats_before = gateway.stats() if gateway else None
    start = time.monotonic()
    sent = asyncio.run(loadgen.load(port, chosen.sender, chosen.recipients[:recipients],
                                    chosen.messages[size], connections, seconds))
    end = time.monotonic()
    delivered = sink.count() - before
    while delivered < sent.accepted and time.monotonic() - end < DRAIN:
        time.sleep(0.01)
        now = sink.count() - before
        if now != delivered:
            delivered, end = now, time.monotonic()
    spool = None
    if gateway and stats_before is not None:
        after = gateway.stats()
        spool = {k: after[k] - stats_before[k] for k in after}
    elapsed = max(end - start, 1e-6)
    accept_seconds = max(sent.last - sent.first, 1e-6)
    return Run(system, route, size, connections, recipients, sent.accepted, delivered,
               elapsed, sent.accepted / accept_seconds, delivered / elapsed,
               delivered >= sent.accepted, spool)


def show(run: Run) -> None:
    print(f"{run.route:18} {run.system:8} {run.size:6} c={run.connections:2} "
          f"r={run.recipients:3}: {run.rate:8.1f} msg/s end to end "
          f"({run.delivered}/{run.accepted}{'' if run.drained else ', NOT DRAINED'})",
          flush=True)


def adapters_alone(site: Site, route: str, size: str, recipients: int) -> float:
    """Messages per second through `pipeline.prepare` alone (unwrap + wrap), one thread."""
    from gateway.envelope import Envelope, Peer, Recipient
    from gateway.pipeline import prepare
    from gateway.runtime import Runtime

    runtime = Runtime.load(site.config)
    chosen = site.routes[route]
    destination = "apicrypt" if route == "smime-to-apicrypt" else "medecin"
    source = "medecin" if route == "smime-to-apicrypt" else "apicrypt"
    raw = chosen.messages[size]
    envelope = Envelope("BENCH00000000000", chosen.sender,
                        tuple(Recipient(r, destination) for r in chosen.recipients[:recipients]),
                        source, Peer("127.0.0.1"), time.time(), len(raw))
    now = dt.datetime.now(dt.UTC)
    count, start = 0, time.monotonic()
    while time.monotonic() - start < SECONDS or count < 3:
        prepared = prepare(runtime, envelope, raw, envelope.recipients, now)
        if prepared.failed:
            raise RuntimeError(f"{route}: {next(iter(prepared.failed.values())).detail}")
        count += 1
    return count / (time.monotonic() - start)


def setup_gpg(site: Site) -> None:
    home = site.root / "work" / "gnupg"
    home.mkdir(mode=0o700, exist_ok=True)
    keys = [site.root / "pki" / "apicrypt.asc"]
    # The filter serves the throughput matrix only: the first RECIPIENTS correspondents.
    keys += [site.root / "pki" / "directory" / f"gp{i}.asc" for i in range(RECIPIENTS)]
    for key in keys:
        subprocess.run(["gpg", "--homedir", str(home), "--batch", "--import", str(key)],
                       capture_output=True, check=True, timeout=60)
    # The gateway's key must be usable for signing by the filter without a prompt.
    subprocess.run(["gpg", "--homedir", str(home), "--batch", "--list-secret-keys",
                    GATEWAY_PGP], capture_output=True, check=True, timeout=60)


def audit_events(site: Path) -> dict[str, dict[str, int]]:
    """Event counts in each gateway's audit trail: the sinks also count DSNs, so a run is only
    valid when nothing bounced (every transaction at a sink is then a delivery)."""
    from gateway.audit import read_records

    found: dict[str, dict[str, int]] = {}
    for folder in sorted((site / "var").glob("**/audit")):
        counts: dict[str, int] = {}
        for record in read_records(sorted(folder.glob("audit-*.jsonl"))):
            counts[record["event"]] = counts.get(record["event"], 0) + 1
        name = folder.parent.relative_to(site / "var").as_posix()
        found[name if name != "." else "throughput"] = counts
    return found


@contextmanager
def phase(results: Results, name: str) -> Iterator[None]:
    started = time.monotonic()
    print(f"== {name}", flush=True)
    try:
        yield
    finally:
        results.phases[name] = time.monotonic() - started
        print(f"== {name}: {results.phases[name]:.0f} s", flush=True)


# -- phases ---------------------------------------------------------------------------------------


class Bench:
    """The state shared by the phases: the site, the processes and the results so far."""

    def __init__(self, work: Path, children: Children) -> None:
        self.work = work
        self.children = children
        self.results = Results()
        self.smtp_sink = SmtpSink(children, work)
        self.stamp_sink = StampSink(children, work)
        self.gateway_port = free_port()
        print("building keys and messages...", flush=True)
        self.site = build(work / "site", self.smtp_sink.port, self.gateway_port)
        self.next_port = free_port()  # the fresh gateways of the later phases
        self.next_config = variant(self.site, "next", self.next_port, self.stamp_sink.port)
        self.postfix_port: int | None = None
        if postfix.available():
            self.postfix_port = free_port()
            postfix.start(postfix.DIRECTORY, self.postfix_port, self.smtp_sink.port)

    def ports(self) -> dict[str, int]:
        return {"postfix": self.postfix_port} if self.postfix_port else {}

    def cells(self, shapes: list[tuple[str, str, int, int]], systems: Callable[[str], list[str]],
              ports: dict[str, int], gateway: GatewayProcess) -> None:
        sink = Sink(self.smtp_sink.count)
        for route, size, connections, recipients in shapes:
            chosen = systems(route)
            for repetition in range(RUNS):
                for system in chosen if repetition % 2 == 0 else chosen[::-1]:
                    port = ports.get(system if system != "filter" else f"filter-{route}")
                    if port is None:
                        continue
                    run = measure(system, port, sink, self.site, route, size, connections,
                                  recipients, gateway if system == "gateway" else None)
                    self.results.runs.append(run)
                    show(run)

    def throughput_and_scaling(self) -> None:
        site = self.site
        gateway = GatewayProcess(self.children, site.config, self.gateway_port, self.work,
                                 "throughput")
        try:
            for route in ROUTES:  # the first cell must not measure start-up's leftovers
                self.warm_up(self.gateway_port, route, ("10KiB", 1, 1), Sink(self.smtp_sink.count))
            gateway.settle()
        except BaseException:
            gateway.stop()
            raise
        ports = {"gateway": self.gateway_port, **self.ports()}
        filters = []
        if "throughput" in PHASES:
            setup_gpg(site)
            env = {**os.environ, "PYTHONPATH": str(ROOT)}
            for route in ("smime-to-apicrypt", "apicrypt-to-smime"):
                port = free_port()
                ports[f"filter-{route}"] = port
                filters.append(self.children.start(
                    [sys.executable, "-m", "bench.filter", route, str(site.root), str(port),
                     str(self.smtp_sink.port)], env=env, stdin=subprocess.PIPE,
                    stdout=subprocess.DEVNULL,
                    stderr=(self.work / f"filter-{route}.log").open("wb")))
                wait_port(port, process=filters[-1])
        try:
            if "throughput" in PHASES:
                with phase(self.results, "throughput"):
                    self.cells([(route, *shape) for route in ROUTES for shape in SHAPES],
                               lambda route: ["gateway", BASELINE[route]], ports, gateway)
                    for route in ("smime-to-apicrypt", "apicrypt-to-smime"):
                        for size in sorted({s for s, _, _ in SHAPES}):
                            for recipients in sorted({r for _, _, r in SHAPES}):
                                rate = adapters_alone(site, route, size, recipients)
                                self.results.adapters_alone[f"{route}/{size}/{recipients}"] = rate
                                print(f"{route:18} adapters {size:6} r={recipients:3}: "
                                      f"{rate:8.1f} msg/s", flush=True)
            for process in filters:
                self.children.stop(process)
            if "scaling" in PHASES:
                with phase(self.results, "scaling"):
                    measured = {(r.route, r.size, r.connections, r.recipients)
                                for r in self.results.runs}
                    shapes = []
                    for route in SCALING_ROUTES:
                        wanted = [(route, label, 1, 1) for label in SCALING_LABELS]
                        wanted += [(route, "10KiB", 1, count) for count in SCALING_COUNTS]
                        shapes += [s for s in dict.fromkeys(wanted) if s not in measured]
                    self.cells(shapes, lambda route: ["gateway"] + (
                        ["postfix"] if route == "plain" else []), ports, gateway)
        finally:
            gateway.stop()

    def latency_cell(self, system: str, port: int, route: str, rate: float, best: float,
                     spool: str, prefix: str) -> Latency:
        if not rate > 0:
            raise RuntimeError(f"{route} on {system}: no throughput to take half of (nothing "
                               "reached the sink in the throughput cells)")
        count = max(LATENCY_MESSAGES[0], min(LATENCY_MESSAGES[1], round(rate * LATENCY_SECONDS)))
        messages = tagged(self.site, route, "10KiB", count, prefix)
        chosen = self.site.routes[route]
        sink = self.stamp_sink
        sink.read()
        seen = len(sink.arrivals)
        paced = asyncio.run(loadgen.paced(port, chosen.sender, chosen.recipients[:1], messages,
                                          rate, LATENCY_CONNECTIONS))
        wanted = set(paced.accepted)
        arrived: dict[str, float] = {}
        deadline = time.monotonic() + DRAIN
        while time.monotonic() < deadline:
            for arrival in sink.read()[seen:]:
                if arrival.message_id in wanted:
                    arrived.setdefault(arrival.message_id, arrival.at)
            seen = len(sink.arrivals)
            if len(arrived) >= len(wanted):
                break
            time.sleep(0.02)
        samples = sorted(arrived[m] - paced.accepted[m] for m in arrived)
        late = sorted(paced.late)

        def quantile(values: list[float], q: float) -> float:
            # Nearest rank: the smallest value with at least q of the samples at or below it.
            if not values:
                return float("nan")
            return values[max(0, math.ceil(q * len(values)) - 1)]

        cell = Latency(system, route, spool, rate, best, len(paced.accepted), len(samples),
                       len(wanted) - len(arrived), quantile(samples, 0.5),
                       quantile(samples, 0.9), quantile(samples, 0.99),
                       samples[-1] if samples else float("nan"), quantile(late, 0.99))
        print(f"{route:18} {system:8} latency ({spool}) at {rate:.1f} msg/s: p50 "
              f"{cell.p50 * 1e3:.1f} ms, p90 {cell.p90 * 1e3:.1f} ms, p99 {cell.p99 * 1e3:.1f} "
              f"ms ({cell.matched}/{cell.sent}, late p99 {cell.late_p99 * 1e3:.0f} ms)",
              flush=True)
        return cell

    def known_best(self, system: str, route: str) -> float | None:
        """The route's best end-to-end throughput at 10 KiB and one recipient in this run."""
        rates = [rate for c in (1, 20)
                 if (rate := median_rate(self.results, system, route, "10KiB", c, 1))]
        return max(rates) if rates else None

    def best_rate(self, system: str, route: str, port: int) -> float:
        """`known_best`, or measured now (20 connections) if the throughput phase did not
        run those cells."""
        known = self.known_best(system, route)
        if known is not None:
            return known
        run = measure(system, port, Sink(self.stamp_sink.count), self.site, route, "10KiB",
                      20, 1, None)
        show(run)
        return run.rate

    def fresh(self, name: str, route: str = "plain") -> GatewayProcess:
        """A gateway on the latency/backlog configuration, warmed up with a few messages of
        `route` and left to settle (its crypto workers load their keys after it listens)."""
        gateway = GatewayProcess(self.children, self.next_config, self.next_port, self.work,
                                 name)
        try:
            self.warm_up(self.next_port, route, ("10KiB", 1, 1), Sink(self.stamp_sink.count))
            gateway.settle()
        except BaseException:
            gateway.stop()
            raise
        return gateway

    def latency(self) -> None:
        results = self.results
        with phase(results, "latency"):
            gateway = self.fresh("latency")
            try:
                cells = [("gateway", route, self.next_port) for route in ROUTES]
                if self.postfix_port:
                    cells.append(("postfix", "plain", self.postfix_port))
                for system, route, port in cells:
                    try:
                        if system == "postfix":
                            gateway.stop()  # the machine to Postfix alone, as for the gateway
                            postfix.relay_to(postfix.DIRECTORY, self.stamp_sink.port)
                        best = self.best_rate(system, route, port)
                        cell = self.latency_cell(system, port, route, best / 2, best, "empty",
                                                 f"lat-{system}-{route}")
                    except (RuntimeError, OSError, subprocess.SubprocessError) as error:
                        results.failures[f"latency {system} {route}"] = str(error)
                        print(f"{route:18} {system:8} latency: FAILED: {error}", flush=True)
                        continue
                    results.latency.append(cell)
            finally:
                gateway.stop()

    def backlog(self) -> None:
        """The same cells on a fresh gateway twice: on an empty spool, then on BACKLOG
        deferred messages; same warm-up, same settling, same rate."""
        results = self.results
        spool_root = self.site.root / "var" / "next" / "spool"
        sink = Sink(self.stamp_sink.count)
        with phase(results, "backlog"):
            shutil.rmtree(spool_root, ignore_errors=True)
            sides: dict[str, tuple[float, list[Run], Latency]] = {}
            best = self.known_best("gateway", "plain")
            seed_seconds = 0.0
            for side in ("empty", "backlog"):
                if side == "backlog":
                    seeded = subprocess.run(
                        [sys.executable, "-m", "bench.backlog", str(spool_root), str(BACKLOG)],
                        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                        capture_output=True, text=True, timeout=1800, check=False)
                    if seeded.returncode != 0:
                        raise RuntimeError(f"bench.backlog failed:\n{seeded.stderr[-2000:]}")
                    seed_seconds = float(seeded.stdout.split()[1])
                    print(f"backlog: {BACKLOG} deferred messages written in "
                          f"{seed_seconds:.0f} s", flush=True)
                gateway = self.fresh(f"backlog-{side}")
                try:
                    print(f"backlog: gateway up in {gateway.startup:.1f} s ({side} spool)",
                          flush=True)
                    runs = [measure("gateway", self.next_port, sink, self.site, "plain",
                                    "10KiB", 20, 1, gateway) for _ in range(RUNS)]
                    for run in runs:
                        show(run)
                    if best is None:  # no throughput phase: this side's own best, then kept
                        best = max(r.rate for r in runs)
                    cell = self.latency_cell("gateway", self.next_port, "plain", best / 2,
                                             best, side, f"lat-{side}")
                finally:
                    gateway.stop()
                sides[side] = (gateway.startup, runs, cell)
            deferred = sum(1 for _ in os.scandir(spool_root / "deferred"))
            leaked = sum(1 for a in self.stamp_sink.read()
                         if a.message_id.startswith("<backlog-"))
            results.backlog = {
                "messages": BACKLOG, "seed_seconds": seed_seconds,
                "startup_empty": sides["empty"][0], "startup_backlog": sides["backlog"][0],
                "empty": [asdict(r) for r in sides["empty"][1]],
                "backlog": [asdict(r) for r in sides["backlog"][1]],
                "latency_empty": asdict(sides["empty"][2]),
                "latency_backlog": asdict(sides["backlog"][2]),
                "deferred_after": deferred, "backlog_delivered": leaked,
            }
            print(f"backlog: {deferred} still deferred after the run, {leaked} of them "
                  "reached the sink", flush=True)
            shutil.rmtree(spool_root, ignore_errors=True)

    def memory(self) -> None:
        spool = self.site.root / "var" / "next" / "spool"
        with phase(self.results, "memory"):
            for route in ROUTES:
                chosen = self.site.routes[route]
                # A Message-ID of its own: the cell waits for this message, not for any.
                [(message_id, raw)] = tagged(self.site, route, BIG, 1, f"memory-{route}")
                gateway = GatewayProcess(self.children, self.next_config, self.next_port,
                                         self.work, f"memory-{route}")
                try:
                    # One small message first: the crypto worker processes start on demand,
                    # and their start is not what a 25 MiB message costs.
                    self.warm_up(self.next_port, route, ("10KiB", 1, 1),
                                 Sink(self.stamp_sink.count), count=1)
                    gateway.settle()  # the allocations of start-up and warm-up too
                    pids = gateway.tree()
                    reset = all([reset_peak(pid) for pid in pids])
                    before = {pid: process_memory(pid) for pid in pids}
                    sampler = TreeSampler(gateway)
                    started = time.monotonic()
                    sent = asyncio.run(loadgen.load(self.next_port, chosen.sender,
                                                    chosen.recipients[:1], raw, 1, DRAIN,
                                                    limit=1))
                    delivered = False
                    while not delivered and time.monotonic() - started < DRAIN * 2:
                        time.sleep(0.05)
                        delivered = any(a.message_id == message_id
                                        for a in self.stamp_sink.read())
                    elapsed = time.monotonic() - started
                    time.sleep(0.5)  # the spool's removal after the next hop's 250
                    peak = sampler.stop()
                    pids = gateway.tree()
                    after = {pid: process_memory(pid) for pid in pids}
                finally:
                    gateway.stop()
                    # Each cell starts fresh: nothing left over is recovered by the next one.
                    shutil.rmtree(spool, ignore_errors=True)
                rss = sum(m.get("VmRSS", 0) for m in before.values())
                # A worker started during the cell counts whole: all of its peak is this
                # message's doing.
                growth = sum(m.get("VmHWM", 0) - before.get(pid, {}).get("VmHWM", 0)
                             for pid, m in after.items())
                cell = Memory(route, len(raw), rss, growth, max(0, peak - rss),
                              len(set(before) | set(after)), reset,
                              delivered and sent.accepted == 1, elapsed)
                self.results.memory.append(cell)
                print(f"{route:18} memory: {len(raw) / 2**20:.1f} MiB message, peak RSS +"
                      f"{cell.growth / 2**20:.1f} MiB ({cell.growth / len(raw):.2f}x; sampled "
                      f"+{cell.sampled / 2**20:.1f} MiB) over {cell.processes} process(es), "
                      f"{elapsed:.1f} s{'' if cell.delivered else ', NOT DELIVERED'}",
                      flush=True)

    def profile(self) -> None:
        from bench.report import worst_cells

        with phase(self.results, "profile"):
            for kind, route, shape, why in worst_cells(self.results_dict())[:PROFILES]:
                path = self.work / f"profile-{kind}-{route}.prof"
                # The cell's own set-up: the throughput gateway's configuration (next hop
                # `smtp-sink`), or the latency one's.
                config, port = ((self.next_config, self.next_port) if kind == "latency"
                                else (self.site.config, self.gateway_port))
                gateway = GatewayProcess(self.children, config, port, self.work,
                                         f"profile-{kind}-{route}", profile=path)
                try:
                    self.warm_up(port, route, shape or ("10KiB", 1, 1),
                                 Sink(self.stamp_sink.count if kind == "latency"
                                      else self.smtp_sink.count))
                    gateway.settle()
                    gateway.start_profile()
                    time.sleep(0.1)
                    started = time.monotonic()
                    if kind == "latency":
                        best = self.best_rate("gateway", route, self.next_port)
                        self.latency_cell("gateway", self.next_port, route, best / 2, best,
                                          "profiled", f"prof-{route}")
                        label = f"latency cell, 10KiB c≤{LATENCY_CONNECTIONS} r=1"
                    else:
                        assert shape is not None
                        size, connections, recipients = shape
                        run = measure("gateway", port, Sink(self.smtp_sink.count),
                                      self.site, route, size, connections, recipients, None,
                                      SECONDS * 2)
                        show(run)
                        label = f"{size} c={connections} r={recipients}"
                    window = time.monotonic() - started
                    workers = gateway.worker_profile_files()
                finally:
                    gateway.stop()
                if path.exists():
                    self.results.profiles.append({
                        "kind": kind, "route": route, "cell": label, "why": why,
                        "seconds": window, "worker_processes": len(workers),
                        **top_functions([path, *workers])})

    def warm_up(self, port: int, route: str, shape: Shape, sink: Sink, count: int = 4) -> None:
        """A few messages of the cell's shape first, so that the profile shows the steady
        state, not the first message's one-off costs (caches, imports, connections)."""
        size, connections, recipients = shape
        chosen = self.site.routes[route]
        before = sink.count()
        sent = asyncio.run(loadgen.load(port, chosen.sender, chosen.recipients[:recipients],
                                        chosen.messages[size], min(connections, count),
                                        DRAIN, limit=count))
        deadline = time.monotonic() + DRAIN
        while sink.count() - before < sent.accepted and time.monotonic() < deadline:
            time.sleep(0.02)

    def results_dict(self) -> dict[str, Any]:
        results = self.results
        return {
            "runs": [asdict(r) for r in results.runs],
            "adapters_alone": results.adapters_alone,
            "latency": [asdict(r) for r in results.latency],
            "memory": [asdict(m) for m in results.memory],
            "backlog": results.backlog, "profiles": results.profiles,
            "events": results.events, "phases": results.phases,
            "failures": results.failures,
        }


_SCAFFOLDING = ("asyncio/base_events.py", "asyncio/events.py", "asyncio/runners.py",
                "threading.py", "concurrent/futures/thread.py", "bench/gateway_child.py",
                "selectors.py")
# Containers of everything, and the idle wait of pool workers with nothing to do.
_LEFT_OUT = ("<method 'run' of 'Context' objects>", "<built-in method builtins.exec>",
             "<method 'enable' of '_lsprof.Profiler' objects>",
             "<method 'run' of '_contextvars.Context' objects>",
             "<method 'get' of '_queue.SimpleQueue' objects>")


def _where(filename: str, line: int, name: str) -> str:
    if filename == "~":
        return name  # a built-in: "{method 'poll' of 'select.epoll' objects}"
    for marker in ("site-packages/", "/lib/python3.11/", "/lib/python3.12/", f"{ROOT}/"):
        if marker in filename:
            filename = filename.split(marker, 1)[1]
            break
    return f"{filename}:{line}({name})"


def top_functions(paths: list[Path], count: int = 20) -> dict[str, Any]:
    """The profile's top functions by cumulative and by own time, scaffolding left out (the
    event loop's and the threads' run functions, which contain everything), each with the
    caller that accounts for most of its time (what a built-in such as `re.Pattern.sub` is
    doing only shows there)."""
    stats = pstats.Stats(*map(str, paths))
    rows = []
    for (filename, line, name), (_cc, calls, own, cumulative, callers) in \
            stats.stats.items():  # type: ignore[attr-defined]
        if filename.endswith(_SCAFFOLDING) or name in _LEFT_OUT:
            continue
        if filename.endswith("gateway/workers.py") and name in ("main", "_serve", "_read_frame",
                                                                 "_read_exact"):
            continue  # a crypto worker's loop, and its wait for the next job on the pipe
        caller = max(callers.items(), key=lambda item: item[1][3], default=None)
        if (caller and caller[0][0].endswith("gateway/workers.py") and filename == "~"
                and "read" in name):
            continue  # a crypto worker waiting for its next job on the pipe
        if (caller and caller[0][0].endswith("threading.py") and caller[0][2] == "wait"
                and name.startswith("<method 'acquire'")):
            # Threads asleep in Event/Condition.wait: the spool's removal timer and the
            # recovery thread's pauses, most of the window and no work. A thread waiting for
            # a shared fsync still shows, in the cumulative time of `GroupCommit.sync`.
            continue
        rows.append({"function": _where(filename, line, name), "calls": calls,
                     "own": own, "cumulative": cumulative,
                     "caller": _where(*caller[0]) if caller else ""})
    by_cumulative = sorted(rows, key=lambda r: -r["cumulative"])[:count]
    by_own = sorted(rows, key=lambda r: -r["own"])[: count // 2]
    return {"cumulative": by_cumulative, "own": by_own}


def main() -> None:
    out = Path(os.environ["BENCH_OUT"]) if os.environ.get("BENCH_OUT") else None
    if not shutil.which("smtp-sink"):
        sys.exit("smtp-sink is missing: install the Debian package postfix (make bench does)")

    def interrupted(number: int, _frame: object) -> None:
        raise Interrupted(signal.Signals(number).name)

    for number in (signal.SIGTERM, signal.SIGHUP, signal.SIGALRM):
        signal.signal(number, interrupted)
    signal.alarm(int(TIMEOUT))
    work = Path(tempfile.mkdtemp(prefix="passerelle-bench-"))
    started = time.monotonic()
    children = Children()
    bench: Bench | None = None
    interrupted_run = False
    try:
        bench = Bench(work, children)
        steps: list[tuple[tuple[str, ...], Callable[[], None]]] = [
            (("throughput", "scaling"), bench.throughput_and_scaling),
            (("memory",), bench.memory),
            (("latency",), bench.latency),
            (("backlog",), bench.backlog),
            (("profile",), bench.profile),
        ]
        for names, step in steps:
            if not any(name in PHASES for name in names):
                continue
            try:
                step()
            except Exception as error:
                # One broken phase (a gateway that stops delivering, say) must not cost the
                # other phases' results: it is reported, and the run ends non-zero.
                traceback.print_exc()
                bench.results.failures["/".join(names)] = f"{type(error).__name__}: {error}"
    except (KeyboardInterrupt, Interrupted) as stop:
        print(f"interrupted ({stop.__class__.__name__} {stop}); stopping every child process",
              file=sys.stderr, flush=True)
        interrupted_run = True
        raise SystemExit(130) from None
    except BaseException:
        print(f"failed; the work directory is kept for inspection: {work}", file=sys.stderr)
        raise
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the cleanup
        children.stop_all()
        if postfix.available() and postfix.DIRECTORY.exists():
            postfix.stop(postfix.DIRECTORY)
        if interrupted_run:
            shutil.rmtree(work, ignore_errors=True)  # a backlog spool is 200,000 files
    assert bench is not None
    bench.results.events = audit_events(work / "site")
    elapsed = time.monotonic() - started
    print(f"gateway audit: {bench.results.events}", flush=True)
    machine = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
               f"Python {platform.python_version()}")
    data = {**bench.results_dict(), "seconds": elapsed, "repetitions": RUNS,
            "load_seconds": SECONDS, "latency_seconds": LATENCY_SECONDS,
            "latency_messages": LATENCY_MESSAGES, "machine": machine,
            "date": dt.date.today().isoformat()}
    results_path = (out or ROOT / "bench") / "results.json"
    report_path = (out or ROOT) / "BENCHMARKS.md"
    plot_path = (out or ROOT / "bench") / "scaling.png"
    results_path.parent.mkdir(parents=True, exist_ok=True)
    results_path.write_text(json.dumps(data, indent=1))
    from bench.report import write

    write(report_path, data, plot_path)
    print(f"done in {elapsed:.0f} s; {report_path} written", flush=True)
    if bench.results.failures:
        print(f"phases failed: {', '.join(bench.results.failures)}; the work directory is kept "
              f"for inspection: {work}", file=sys.stderr, flush=True)
        raise SystemExit(1)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
