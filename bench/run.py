"""`make bench`: every system on the same load generator and the same sink, in one run, on this
machine; medians of several runs and ratios side by side; results in BENCHMARKS.md.

Systems: the gateway (`bench.gateway_child`, i.e. `gateway serve` plus spool counters) on the
three routes; Postfix (private instance, default durability) on the plain route; the per-message
command-line filter (`bench.filter`) on the two translation routes; the adapters alone (the
pipeline's `prepare`, in-process, no SMTP, one thread) as the ceiling of the translation routes.

Load (`bench.loadgen`): 10 KiB and 1 MiB messages x 1 and 20 connections x 1 and 10 recipients;
each run sends for BENCH_SECONDS (1.5) and ends when the sink has every accepted message.
End-to-end throughput = messages at the sink / (last one at the sink - first byte sent).
BENCH_RUNS (3) runs per cell, interleaved between systems; the median is reported.
Every run is bounded: a drain that does not finish in DRAIN seconds is reported as such.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from bench import loadgen, postfix
from bench.site import GATEWAY_PGP, RECIPIENTS, SIZES, Site, build

ROOT = Path(__file__).resolve().parents[1]
RUNS = int(os.environ.get("BENCH_RUNS", "3"))
SECONDS = float(os.environ.get("BENCH_SECONDS", "1.5"))
DRAIN = 90.0
SHAPES = [(size, connections, recipients) for size in SIZES for connections in (1, 20)
          for recipients in (1, 10)]
BASELINE = {"plain": "postfix", "smime-to-apicrypt": "filter", "apicrypt-to-smime": "filter"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_port(port: int, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listens on {port}")


class Sink:
    """`smtp-sink -c`: counts transactions; its counter line is read from its output file."""

    def __init__(self, work: Path) -> None:
        self.port = free_port()
        self.output = work / "sink.out"
        self.process = subprocess.Popen(
            ["smtp-sink", "-u", "postfix", "-c", f"127.0.0.1:{self.port}", "1000"],
            stdout=self.output.open("wb"), stderr=subprocess.STDOUT)
        wait_port(self.port)

    def count(self) -> int:
        with self.output.open("rb") as handle:
            handle.seek(max(0, self.output.stat().st_size - 200))
            found = re.findall(rb"mesg=(\d+)", handle.read())
        return int(found[-1]) if found else 0

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(30)


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


def gateway_stats(process: subprocess.Popen[bytes], path: Path) -> dict[str, int]:
    before = path.stat().st_mtime_ns if path.exists() else 0
    process.send_signal(signal.SIGUSR1)
    for _ in range(200):
        if path.exists() and path.stat().st_mtime_ns != before:
            break
        time.sleep(0.01)
    time.sleep(0.02)
    data: dict[str, int] = json.loads(path.read_text())
    return data


def measure(system: str, port: int, sink: Sink, site: Site, route: str, size: str,
            connections: int, recipients: int, gateway: tuple[subprocess.Popen[bytes], Path]
            | None) -> Run:
    chosen = site.routes[route]
    before = sink.count()
    stats_before = gateway_stats(*gateway) if gateway else None
    start = time.monotonic()
    sent = asyncio.run(loadgen.load(port, chosen.sender, chosen.recipients[:recipients],
                                    chosen.messages[size], connections, SECONDS))
    end = time.monotonic()
    delivered = sink.count() - before
    while delivered < sent.accepted and time.monotonic() - end < DRAIN:
        time.sleep(0.01)
        now = sink.count() - before
        if now != delivered:
            delivered, end = now, time.monotonic()
    spool = None
    if gateway and stats_before is not None:
        after = gateway_stats(*gateway)
        spool = {k: after[k] - stats_before[k] for k in after}
    seconds = max(end - start, 1e-6)
    accept_seconds = max(sent.last - sent.first, 1e-6)
    return Run(system, route, size, connections, recipients, sent.accepted, delivered,
               seconds, sent.accepted / accept_seconds, delivered / seconds,
               delivered >= sent.accepted, spool)


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
    keys += sorted((site.root / "pki" / "directory").glob("gp*.asc"))
    for key in keys:
        subprocess.run(["gpg", "--homedir", str(home), "--batch", "--import", str(key)],
                       capture_output=True, check=True, timeout=60)
    # The gateway's key must be usable for signing by the filter without a prompt.
    subprocess.run(["gpg", "--homedir", str(home), "--batch", "--list-secret-keys",
                    GATEWAY_PGP], capture_output=True, check=True, timeout=60)


def audit_events(site: Path) -> dict[str, int]:
    """Event counts in the gateway's audit trail: the sink also counts DSNs, so a run is only
    valid when nothing bounced (every transaction at the sink is then a delivery)."""
    from gateway.audit import read_records

    counts: dict[str, int] = {}
    for record in read_records(sorted((site / "var" / "audit").glob("audit-*.jsonl"))):
        counts[record["event"]] = counts.get(record["event"], 0) + 1
    return counts


def main() -> None:
    if not shutil.which("smtp-sink"):
        sys.exit("smtp-sink is missing: install the Debian package postfix (make bench does)")
    work = Path(tempfile.mkdtemp(prefix="passerelle-bench-"))
    started = time.monotonic()
    processes: list[subprocess.Popen[bytes]] = []
    postfix_dir = postfix.DIRECTORY
    sink = Sink(work)
    results: list[Run] = []
    ceilings: dict[str, float] = {}
    try:
        gateway_port = free_port()
        print("building keys and messages...", flush=True)
        site = build(work / "site", sink.port, gateway_port)
        setup_gpg(site)
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        stats = work / "gateway-stats.json"
        log = (work / "gateway.log").open("wb")
        gateway = subprocess.Popen([sys.executable, "-m", "bench.gateway_child",
                                    str(site.config), str(stats)], cwd=site.root, env=env,
                                   stdout=log, stderr=subprocess.STDOUT)
        processes.append(gateway)
        wait_port(gateway_port)
        ports = {"gateway": gateway_port}
        if postfix.available():
            ports["postfix"] = free_port()
            postfix.start(postfix_dir, ports["postfix"], sink.port)
        for route in ("smime-to-apicrypt", "apicrypt-to-smime"):
            port = free_port()
            ports[f"filter-{route}"] = port
            processes.append(subprocess.Popen(
                [sys.executable, "-m", "bench.filter", route, str(site.root), str(port),
                 str(sink.port)], env=env, stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL, stderr=(work / f"filter-{route}.log").open("wb")))
            wait_port(port)

        for route in site.routes:
            for size, connections, recipients in SHAPES:
                systems = ["gateway", BASELINE[route]]
                for repetition in range(RUNS):
                    for system in systems if repetition % 2 == 0 else systems[::-1]:
                        port = ports.get(system if system != "filter" else f"filter-{route}")
                        if port is None:
                            continue
                        run = measure(system, port, sink, site, route, size, connections,
                                      recipients, (gateway, stats) if system == "gateway"
                                      else None)
                        results.append(run)
                        print(f"{route:18} {system:8} {size:5} c={connections:2} "
                              f"r={recipients:2}: {run.rate:8.1f} msg/s end to end "
                              f"({run.delivered}/{run.accepted}"
                              f"{'' if run.drained else ', NOT DRAINED'})", flush=True)
        for route in ("smime-to-apicrypt", "apicrypt-to-smime"):
            for size in SIZES:
                for recipients in (1, RECIPIENTS):
                    rate = adapters_alone(site, route, size, recipients)
                    ceilings[f"{route}/{size}/{recipients}"] = rate
                    print(f"{route:18} adapters {size:5} r={recipients:2}: {rate:8.1f} msg/s",
                          flush=True)
    finally:
        for process in processes:
            if process.stdin is not None:
                process.stdin.close()
            process.terminate()
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
        if postfix.available() and postfix_dir.exists():
            postfix.stop(postfix_dir)
        sink.stop()
    elapsed = time.monotonic() - started
    events = audit_events(work / "site")
    print(f"gateway audit: {events}", flush=True)
    machine = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
               f"Python {platform.python_version()}")
    (ROOT / "bench" / "results.json").write_text(json.dumps(
        {"runs": [asdict(r) for r in results], "adapters_alone": ceilings, "events": events,
         "seconds": elapsed, "repetitions": RUNS, "load_seconds": SECONDS, "machine": machine},
        indent=1))
    from bench.report import write

    write(ROOT / "BENCHMARKS.md", results, ceilings, events, elapsed, RUNS, SECONDS, machine)
    shutil.rmtree(work, ignore_errors=True)
    print(f"done in {elapsed:.0f} s; BENCHMARKS.md written", flush=True)


if __name__ == "__main__":
    main()
