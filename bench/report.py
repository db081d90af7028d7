"""BENCHMARKS.md from one `make bench` run (bench/run.py): medians and ratios side by side, the
targets of issue 8 met or not and by how much, and where the time goes from the run's own
profiles. `python -m bench.report` rebuilds BENCHMARKS.md and bench/scaling.png from
bench/results.json without measuring again."""

from __future__ import annotations

import fnmatch
import math
import re
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

NAMES = {"gateway": "Passerelle", "postfix": "Postfix", "filter": "per-message filter"}
ROUTES = ("plain", "smime-to-apicrypt", "apicrypt-to-smime")
TITLES = {"plain": "plain relay", "smime-to-apicrypt": "S/MIME → Apicrypt",
          "apicrypt-to-smime": "Apicrypt → S/MIME"}
SIZE_ORDER = ("1KiB", "10KiB", "100KiB", "1MiB", "5MiB", "25MiB")
MIB = 1024 * 1024

# The targets.
LATENCY_LIMIT = 0.050  # p99, 250 given -> next hop's 250, at half the maximum load
MEMORY_LIMIT = 4.0  # peak RSS growth for one 25 MiB message, times its size
FILTER_FACTOR = 20.0
CEILING_SHARE = 0.6
# "Does not slow new mail", read as: within the run-to-run spread of this machine.
BACKLOG_THROUGHPUT = 0.90  # throughput with the backlog / without, at least
BACKLOG_LATENCY = 1.25  # p99 latency with the backlog / without, at most

Shape = tuple[str, int, int]  # size, connections, recipients


def _size_key(label: str) -> int:
    return SIZE_ORDER.index(label) if label in SIZE_ORDER else len(SIZE_ORDER)


def _cell(runs: Sequence[dict[str, Any]], system: str, route: str, shape: Shape) -> list[Any]:
    return [r for r in runs if (r["system"], r["route"], r["size"], r["connections"],
                                r["recipients"]) == (system, route, *shape)]


def _median(runs: Sequence[dict[str, Any]], key: str = "rate") -> float:
    return statistics.median(r[key] for r in runs) if runs else float("nan")


def _rate(runs: Sequence[dict[str, Any]], system: str, route: str, shape: Shape) -> float | None:
    cell = _cell(runs, system, route, shape)
    return _median(cell) if cell else None


def _ratio(top: float, bottom: float) -> float:
    return top / bottom if bottom and not math.isnan(bottom) else math.nan


def _where(shape: Shape) -> str:
    size, connections, recipients = shape
    return f"{size} c={connections} r={recipients}"


MATRIX: tuple[Shape, ...] = tuple((s, c, r) for s in ("10KiB", "1MiB") for c in (1, 20)
                                  for r in (1, 10))


def _matrix(runs: Sequence[dict[str, Any]]) -> list[Shape]:
    found = {(r["size"], r["connections"], r["recipients"]) for r in runs}
    return [s for s in MATRIX if s in found]


# -- targets ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Cell:
    value: float
    where: str
    score: float  # >= 1 when the target is met; how far from it otherwise
    shape: Shape | None = None


@dataclass(frozen=True)
class Check:
    target: str
    goal: str
    unit: str  # how to show a value: "x", "%", "ms", "size"
    cells: tuple[Cell, ...]
    kind: str  # "throughput", "latency", "memory", "backlog", "durability", "report"
    route: str | None = None

    @property
    def worst(self) -> Cell | None:
        return min(self.cells, key=lambda c: c.score) if self.cells else None


def _show(value: float, unit: str) -> str:
    if math.isnan(value):
        return "n/a"
    if unit == "%":
        return f"{value:.0%}"
    if unit == "ms":
        return f"{value * 1e3:.1f} ms"
    if unit == "size":
        return f"{value:.2f}× the size"
    if unit == "fsyncs":
        return f"{value:.2f} per message"
    return f"{value:.2f}×"


def checks(data: dict[str, Any]) -> list[Check]:
    """Every target of issue 8 that this run measured, with each cell's distance to it."""
    runs = data.get("runs", [])
    ceilings = data.get("adapters_alone", {})
    shapes = _matrix(runs)
    found: list[Check] = []

    def ratio_cells(route: str, baseline: str, goal: float) -> tuple[Cell, ...]:
        cells = []
        for shape in shapes:
            ours, theirs = (_rate(runs, "gateway", route, shape),
                            _rate(runs, baseline, route, shape))
            if ours is not None and theirs:
                cells.append(Cell(ours / theirs, _where(shape), ours / theirs / goal, shape))
        return tuple(cells)

    found.append(Check("plain relay ≥ Postfix, end to end", "≥ 1.00× Postfix", "x",
                       ratio_cells("plain", "postfix", 1.0), "throughput", "plain"))
    fsyncs = []
    for shape in shapes:
        cell = [r for r in _cell(runs, "gateway", "plain", shape) if r.get("spool")]
        enqueued = sum(r["spool"]["enqueued"] for r in cell)
        if enqueued:
            files = sum(r["spool"]["file_fsyncs"] for r in cell) / enqueued
            folders = sum(r["spool"]["dir_fsyncs"] for r in cell)
            fsyncs.append(Cell(files, _where(shape), files if folders else 0.0, shape))
    found.append(Check("plain relay with fsync before 250 (file and folder fsyncs counted by "
                       "the spool)", "≥ 1 file fsync per message, folder fsynced", "fsyncs",
                       tuple(fsyncs), "durability", "plain"))
    for route in ROUTES[1:]:
        found.append(Check(f"{TITLES[route]} ≥ 20× the per-message filter",
                           "≥ 20× the filter", "x", ratio_cells(route, "filter", FILTER_FACTOR),
                           "throughput", route))
        share = []
        for shape in shapes:
            ours = _rate(runs, "gateway", route, shape)
            top = ceilings.get(f"{route}/{shape[0]}/{shape[2]}")
            if ours is not None and top:
                share.append(Cell(ours / top, _where(shape), ours / top / CEILING_SHARE, shape))
        found.append(Check(f"{TITLES[route]} ≥ 60% of the adapters alone",
                           "≥ 60% of the ceiling", "%", tuple(share), "throughput", route))
    for cell in data.get("latency", []):
        if cell["system"] == "gateway" and cell["spool"] == "empty":
            p99 = cell["p99"]
            score = LATENCY_LIMIT / p99 if p99 and not math.isnan(p99) else 0.0
            if cell["missing"]:
                score = 0.0  # a message that never arrived has no latency to speak of
            found.append(Check(f"{TITLES[cell['route']]}: p99 latency at half load",
                               "≤ 50 ms", "ms", (Cell(p99, f"{cell['rate']:.1f} msg/s", score),),
                               "latency", cell["route"]))
    for cell in data.get("memory", []):
        growth = cell["growth"] / cell["size"]
        if cell["route"] == "plain":
            found.append(Check("plain relay: peak memory for one 25 MiB message",
                               "≤ 4× the size", "size",
                               (Cell(growth, f"{cell['size'] / MIB:.1f} MiB",
                                     MEMORY_LIMIT / max(growth, 1e-6) if cell["delivered"]
                                     else 0.0),), "memory", "plain"))
        else:
            found.append(Check(f"{TITLES[cell['route']]}: peak memory for one 25 MiB message",
                               "measure and report", "size",
                               (Cell(growth, f"{cell['size'] / MIB:.1f} MiB on the wire",
                                     math.nan),), "report", cell["route"]))
    backlog = data.get("backlog") or {}
    if backlog:
        slowed = _ratio(_median(backlog["backlog"]), _median(backlog["empty"]))
        found.append(Check(f"{backlog['messages']:,} deferred messages do not slow new mail: "
                           "throughput", f"≥ {BACKLOG_THROUGHPUT:.2f}× the empty spool's", "x",
                           (Cell(slowed, "plain 10KiB c=20 r=1",
                                 0.0 if math.isnan(slowed) else slowed / BACKLOG_THROUGHPUT),),
                           "backlog", "plain"))
        later = _ratio(backlog["latency_backlog"]["p99"], backlog["latency_empty"]["p99"])
        found.append(Check(f"{backlog['messages']:,} deferred messages do not slow new mail: "
                           "p99 latency", f"≤ {BACKLOG_LATENCY:.2f}× the empty spool's", "x",
                           (Cell(later, f"plain at {backlog['latency_empty']['rate']:.1f} msg/s",
                                 0.0 if math.isnan(later) or later <= 0
                                 else BACKLOG_LATENCY / later),), "backlog", "plain"))
    return [c for c in found if c.cells]


def worst_cells(data: dict[str, Any]) -> list[tuple[str, str, Shape | None, str]]:
    """The cells to profile, worst first: for each route, its throughput cell furthest from a
    target, and its latency cell if that target is missed. (kind, route, shape, why)"""
    chosen: dict[tuple[str, str], tuple[float, Shape | None, str]] = {}
    for check in checks(data):
        if check.kind not in ("throughput", "latency") or check.route is None:
            continue
        worst = check.worst
        if worst is None or worst.score >= 1:
            continue
        key = (check.kind, check.route)
        if key not in chosen or worst.score < chosen[key][0]:
            chosen[key] = (worst.score, worst.shape,
                           f"{check.target}: {_show(worst.value, check.unit)} "
                           f"({check.goal}) at {worst.where}")
    ranked = sorted(chosen.items(), key=lambda item: item[1][0])
    return [(kind, route, shape, why) for (kind, route), (_score, shape, why) in ranked]


def _verdict(check: Check) -> str:
    worst = check.worst
    if worst is None or math.isnan(worst.score):
        return "reported (no target)"
    if worst.score >= 1:
        return f"**met** (margin ×{worst.score:.2f})" if worst.score < 100 else "**met**"
    if worst.score <= 0:
        return "**not met** (nothing measurable)"
    return f"**not met**: ×{1 / worst.score:.1f} short"


def _targets(data: dict[str, Any]) -> list[str]:
    lines = ["## Targets (issue 8), from this run", "",
             "Each target's worst cell decides; \"×N short\" is the factor by which that cell "
             "must improve to meet it.", "",
             "| target | goal | cells met | worst cell | worst value | verdict |",
             "|---|---|---:|---|---:|---|"]
    for check in checks(data):
        worst = check.worst
        assert worst is not None
        scored = [c for c in check.cells if not math.isnan(c.score)]
        met = f"{sum(1 for c in scored if c.score >= 1)}/{len(scored)}" if scored else "—"
        lines.append(f"| {check.target} | {check.goal} | {met} | {worst.where} | "
                     f"{_show(worst.value, check.unit)} | {_verdict(check)} |")
    return [*lines, ""]


def _cores(data: dict[str, Any]) -> int:
    found = re.search(r"(\d+) cores", str(data.get("machine", "")))
    return int(found.group(1)) if found else 1


def _ceilings(data: dict[str, Any]) -> list[str]:
    """Whether "≥ 20× the per-message filter" is within what this machine allows at all.

    The most any relay could do here is every core doing nothing but the adapters' crypto:
    cores × the adapters-alone rate, with SMTP, the disk, the load generator and the sink
    costing nothing. Where 20× the filter is above that, the target cannot be met on this
    machine by any implementation of the same crypto; the table says by how much."""
    runs = data.get("runs", [])
    ceilings = data.get("adapters_alone", {})
    cores = _cores(data)
    rows = []
    for route in ROUTES[1:]:
        for shape in _matrix(runs):
            theirs = _rate(runs, "filter", route, shape)
            ours = _rate(runs, "gateway", route, shape)
            top = ceilings.get(f"{route}/{shape[0]}/{shape[2]}")
            if not theirs or not top or ours is None:
                continue
            wanted = FILTER_FACTOR * theirs
            bound = cores * top
            rows.append(
                f"| {TITLES[route]} | {_where(shape)} | {theirs:.1f} | {wanted:.0f} | "
                f"{bound:.0f} | {bound / theirs:.1f}× | "
                + ("beyond this machine" if wanted > bound else "within reach") + f" | "
                f"{ours:.1f} ({ours / bound:.0%} of the bound) |")
    if not rows:
        return []
    return [
        "## What this machine allows for \"≥ 20× the per-message filter\"", "",
        f"The highest rate any relay could reach here: {cores} cores × the adapters-alone rate "
        "(the same crypto, with SMTP, the disk, the load generator and the sink costing "
        "nothing). Where 20× the filter is above it, no implementation of the same crypto "
        "meets the target on this machine; the rest of the gap is what the gateway spends "
        "outside the adapters (see \"Where the time goes\").", "",
        "| route | cell | filter msg/s | 20× filter | bound msg/s | bound / filter | "
        "20× target | Passerelle msg/s |",
        "|---|---|---:|---:|---:|---:|---|---:|",
        *rows, "",
    ]


# -- sections ------------------------------------------------------------------------------


def _header(data: dict[str, Any], events: dict[str, dict[str, int]]) -> list[str]:
    runs, seconds = data.get("repetitions", 3), data.get("load_seconds", 1.5)
    bounced = sum(counts.get("bounced", 0) for counts in events.values())
    tally = "; ".join(f"{name}: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
                      for name, counts in sorted(events.items()))
    return [
        "# Benchmarks",
        "",
        f"Measured by `make bench` (bench/run.py) on {data.get('date', '?')}, "
        f"{data.get('machine', '')};",
        "everything on this one machine over loopback: the load generator, the relay under test",
        f"and the sink share its cores. {runs} runs per throughput cell, each sending for "
        f"{seconds:g} s;",
        f"medians shown. The whole run took {data.get('seconds', 0) / 60:.1f} minutes ("
        + ", ".join(f"{name} {value / 60:.1f}" for name, value in data.get("phases", {}).items())
        + ").",
        "",
        "- Load generator (`bench/loadgen.py`, the same for every system): N connections, each",
        "  sending the same message back to back (no pipelining, no TLS); for latency, messages",
        "  started at a fixed rate, each with a Message-ID of its own.",
        "- Sinks, the same for every system: Postfix's `smtp-sink` (C) for throughput;",
        "  `bench/stampsink.py` where a time per message is needed (latency, memory, backlog):",
        "  it writes the CLOCK_MONOTONIC time of its 250 and the Message-ID of each message.",
        "- **end to end** = messages at the sink / (last message at the sink - first byte sent);",
        "  **accept** = 250 replies per second seen by the load generator.",
        "- Passerelle: `gateway serve` (bench/gateway_child.py) with fsync of file and folder",
        "  before every 250, audit trail on, spool not encrypted.",
        "- Postfix 3.7 (Debian), private instance, default durability (fsync before 250).",
        "- per-message filter (bench/filter.py): an SMTP content filter running `openssl cms`",
        "  and `gpg` as one process per step and per message, relaying before its 250.",
        "- adapters alone: `gateway.pipeline.prepare` (unwrap + wrap) in a loop, one thread,",
        "  no SMTP, no disk: the ceiling the crypto allows on one core.",
        "- Validity: the sinks count every transaction, DSNs included, so each gateway's audit",
        f"  trail is tallied at the end: {tally}"
        + ("." if not bounced else " — **some messages bounced: these figures include DSNs "
           "and are not valid.**"),
        "",
        *(["**Parts of this run failed** (their tables are missing or partial): "
           + "; ".join(f"{name}: {why}" for name, why in failures.items()), ""]
          if (failures := data.get("failures")) else []),
    ]


def _throughput(data: dict[str, Any]) -> list[str]:
    runs, ceilings = data.get("runs", []), data.get("adapters_alone", {})
    shapes = _matrix(runs)
    out: list[str] = []
    for route, title, baseline in (
        ("plain", "Plain relay (mime → mime) against Postfix", "postfix"),
        ("smime-to-apicrypt", "S/MIME → Apicrypt (OpenPGP) against the per-message filter",
         "filter"),
        ("apicrypt-to-smime", "Apicrypt (OpenPGP) → S/MIME against the per-message filter",
         "filter"),
    ):
        rows = []
        for shape in shapes:
            ours = _cell(runs, "gateway", route, shape)
            theirs = _cell(runs, baseline, route, shape)
            if not ours:
                continue
            rate, accept = _median(ours), _median(ours, "accept_rate")
            base, base_accept = _median(theirs), _median(theirs, "accept_rate")
            drained = "" if all(r["drained"] for r in ours) else " (not drained)"
            ratio = f"{rate / base:.2f}×" if theirs and base > 0 else "n/a"
            row = (f"| {shape[0]} | {shape[1]} | {shape[2]} | {rate:.1f} ({accept:.1f})"
                   f"{drained} | " + (f"{base:.1f} ({base_accept:.1f})" if theirs else "n/a")
                   + f" | {ratio} |")
            if baseline == "filter":
                ceiling = ceilings.get(f"{route}/{shape[0]}/{shape[2]}")
                row += (f" {ceiling:.1f} | {rate / ceiling:.0%} |" if ceiling else " n/a | n/a |")
            rows.append(row)
        if not rows:
            continue
        out += [f"## {title}", "",
                f"| size | conn. | rcpt | Passerelle end to end (accept) msg/s | "
                f"{NAMES[baseline]} end to end (accept) msg/s | ratio end to end |"
                + (" adapters alone msg/s | Passerelle / adapters |" if baseline == "filter"
                   else ""),
                "|---|---:|---:|---:|---:|---:|" + ("---:|---:|" if baseline == "filter"
                                                    else ""),
                *rows, ""]
    spool = [r for r in runs if r["system"] == "gateway" and r.get("spool")]
    if spool:
        out += ["## Group commit (Passerelle's spool)", "",
                "Spool counters during each run, summed over the runs of a cell: messages made",
                "durable (`enqueued`), folder fsyncs (`dir_fsyncs`: the shared fsync of active/",
                "before the 250s, plus the state rewrites and removals of delivery), file fsyncs.",
                "",
                "| route | size | conn. | rcpt | messages | dir fsyncs | dir fsyncs / message "
                "| file fsyncs / message |",
                "|---|---|---:|---:|---:|---:|---:|---:|"]
        for route in ROUTES:
            for shape in shapes:
                cell = [r for r in _cell(runs, "gateway", route, shape) if r.get("spool")]
                enqueued = sum(r["spool"]["enqueued"] for r in cell)
                if not enqueued:
                    continue
                dirs = sum(r["spool"]["dir_fsyncs"] for r in cell)
                files = sum(r["spool"]["file_fsyncs"] for r in cell)
                out.append(f"| {route} | {shape[0]} | {shape[1]} | {shape[2]} | {enqueued} | "
                           f"{dirs} | {dirs / enqueued:.2f} | {files / enqueued:.2f} |")
        out.append("")
    return out


def scaling_series(data: dict[str, Any]) -> dict[str, dict[str, list[tuple[float, float]]]]:
    """For the plot and the tables: {"size"|"recipients": {series: [(x, msg/s)]}}, one
    connection; x is bytes on the wire (size) or recipients."""
    runs = data.get("runs", [])
    series: dict[str, dict[str, list[tuple[float, float]]]] = {"size": {}, "recipients": {}}
    systems = [("gateway", "plain"), ("postfix", "plain"), ("gateway", "smime-to-apicrypt")]
    for system, route in systems:
        name = f"{NAMES[system]}, {TITLES[route]}"
        points = []
        for label in SIZE_ORDER:
            cell = _cell(runs, system, route, (label, 1, 1))
            if cell:
                points.append((float(label_bytes(label)), _median(cell)))
        if points:
            series["size"][name] = points
        counts = sorted({r["recipients"] for r in runs
                         if (r["system"], r["route"], r["size"], r["connections"])
                         == (system, route, "10KiB", 1)})
        recipients = [(float(n), _median(_cell(runs, system, route, ("10KiB", 1, n))))
                      for n in counts]
        if len(recipients) > 1:
            series["recipients"][name] = recipients
    return series


def label_bytes(label: str) -> int:
    number, unit = re.fullmatch(r"(\d+)(KiB|MiB)", label).groups()  # type: ignore[union-attr]
    return int(number) * (1024 if unit == "KiB" else MIB)


def _scaling(data: dict[str, Any], plot: str | None) -> list[str]:
    runs = data.get("runs", [])
    sizes = [s for s in SIZE_ORDER if any(r["size"] == s and r["connections"] == 1
                                          and r["recipients"] == 1 for r in runs)]
    counts = sorted({r["recipients"] for r in runs
                     if r["size"] == "10KiB" and r["connections"] == 1})
    if len(sizes) < 2 and len(counts) < 2:
        return []
    out = ["## How the cost grows", "",
           "One connection, medians of the runs. Throughput against the message's size (one",
           "recipient), then against the number of recipients (10 KiB): MiB/s counts the",
           "message once; deliveries/s counts each recipient.", ""]
    systems = [("gateway", "plain"), ("postfix", "plain"), ("gateway", "smime-to-apicrypt")]
    if len(sizes) > 1:
        out += ["| size | Passerelle plain msg/s (MiB/s) | Postfix msg/s (MiB/s) | ratio | "
                "Passerelle S/MIME → Apicrypt msg/s (MiB/s) |", "|---|---:|---:|---:|---:|"]
        for size in sizes:
            rates = [_rate(runs, system, route, (size, 1, 1)) for system, route in systems]
            shown = [f"{r:.2f} ({r * label_bytes(size) / MIB:.1f})" if r else "n/a"
                     for r in rates]
            ratio = f"{rates[0] / rates[1]:.2f}×" if rates[0] and rates[1] else "n/a"
            out.append(f"| {size} | {shown[0]} | {shown[1]} | {ratio} | {shown[2]} |")
        out.append("")
    if len(counts) > 1:
        out += ["| recipients | Passerelle plain msg/s (deliveries/s) | Postfix msg/s "
                "(deliveries/s) | ratio | Passerelle S/MIME → Apicrypt msg/s (deliveries/s) |",
                "|---:|---:|---:|---:|---:|"]
        for count in counts:
            rates = [_rate(runs, system, route, ("10KiB", 1, count)) for system, route in systems]
            shown = [f"{r:.1f} ({r * count:.0f})" if r else "n/a" for r in rates]
            ratio = f"{rates[0] / rates[1]:.2f}×" if rates[0] and rates[1] else "n/a"
            out.append(f"| {count} | {shown[0]} | {shown[1]} | {ratio} | {shown[2]} |")
        out.append("")
    if plot:
        out += [f"![Throughput against size and recipients]({plot})", ""]
    else:
        out += ["(No plot: matplotlib is not installed; `make bench` installs the `bench` extra.)",
                ""]
    return out


def _latency(data: dict[str, Any]) -> list[str]:
    cells = [c for c in data.get("latency", []) if c["spool"] == "empty"]
    if not cells:
        return []
    fewest, most = data.get("latency_messages", (100, 1500))
    out = ["## Latency at half the maximum load", "",
           "From the 250 the relay gave the load generator to the 250 the next hop",
           "(`bench/stampsink.py`) gave the relay, matched by Message-ID; 10 KiB, one recipient,",
           f"messages started at a fixed rate for {data.get('latency_seconds', 10):g} s (at "
           f"least {fewest} messages, at most {most})",
           "over up to 20 connections. The rate is half the best end-to-end throughput of the",
           "route's 10 KiB one-recipient cells in this run. \"late p99\" is how far behind its",
           "schedule the load generator could start a message (all connections busy): near 0",
           "when the relay keeps up with the rate.", "",
           "| route | system | rate msg/s (best) | messages | p50 | p90 | p99 | max | "
           "p99 / 50 ms | late p99 |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for cell in cells:
        missing = f", {cell['missing']} missing" if cell["missing"] else ""
        out.append(
            f"| {TITLES[cell['route']]} | {NAMES[cell['system']]} | {cell['rate']:.1f} "
            f"({cell['best']:.1f}) | {cell['matched']}/{cell['sent']}{missing} | "
            f"{cell['p50'] * 1e3:.1f} ms | {cell['p90'] * 1e3:.1f} ms | "
            f"{cell['p99'] * 1e3:.1f} ms | {cell['worst'] * 1e3:.1f} ms | "
            f"{cell['p99'] / LATENCY_LIMIT:.2f} | {cell['late_p99'] * 1e3:.0f} ms |")
    return [*out, ""]


def _memory(data: dict[str, Any]) -> list[str]:
    cells = data.get("memory", [])
    if not cells:
        return []
    out = ["## Memory for one 25 MiB message", "",
           "A fresh gateway per route and one 10 KiB message of the route (its crypto worker",
           "processes start on demand); then the peak RSS (VmHWM in /proc/PID/status) of the",
           "gateway's process and of each worker is reset to its RSS (clear_refs), and one",
           "message of 25 MiB of content is sent and delivered. **peak growth** is the sum of",
           "those peaks' growth (exact for one process, an upper bound for several, whose",
           "peaks need not coincide); **sampled** is the growth of their summed RSS polled",
           "every 10 ms. The size is the message on the wire (S/MIME's and Apicrypt's base64",
           "make it a third larger); the target applies to the peak growth.", "",
           "| route | message on the wire | processes | RSS before | peak growth | sampled | "
           "growth / size | target | seconds to the next hop |",
           "|---|---:|---:|---:|---:|---:|---:|---|---:|"]
    for cell in cells:
        growth = cell["growth"] / cell["size"]
        target = (("met" if growth <= MEMORY_LIMIT else "**not met**") + " (≤ 4×)"
                  if cell["route"] == "plain" else "reported")
        note = "" if cell["peak_reset"] else " (peak not reset: includes start-up)"
        out.append(f"| {TITLES[cell['route']]} | {cell['size'] / MIB:.1f} MiB | "
                   f"{cell.get('processes', 1)} | {cell['rss_before'] / MIB:.0f} MiB | "
                   f"{cell['growth'] / MIB:.1f} MiB{note} | "
                   f"{cell.get('sampled', 0) / MIB:.1f} MiB | {growth:.2f}× | {target} | "
                   f"{cell['seconds']:.1f}" + ("" if cell["delivered"] else " (NOT delivered)")
                   + " |")
    return [*out, ""]


def _backlog(data: dict[str, Any]) -> list[str]:
    backlog = data.get("backlog") or {}
    if not backlog:
        return []
    empty, loaded = backlog["empty"], backlog["backlog"]
    before, after = backlog["latency_empty"], backlog["latency_backlog"]
    rows = [
        ("start-up (spawn → first SMTP greeting)", f"{backlog['startup_empty']:.1f} s",
         f"{backlog['startup_backlog']:.1f} s",
         f"{_ratio(backlog['startup_backlog'], backlog['startup_empty']):.1f}×"),
        ("plain 10KiB c=20 r=1, end to end", f"{_median(empty):.1f} msg/s",
         f"{_median(loaded):.1f} msg/s", f"{_ratio(_median(loaded), _median(empty)):.2f}×"),
    ]
    for key in ("p50", "p90", "p99"):
        rows.append((f"latency {key} at {before['rate']:.1f} msg/s", f"{before[key] * 1e3:.1f} ms",
                     f"{after[key] * 1e3:.1f} ms", f"{_ratio(after[key], before[key]):.2f}×"))
    out = ["## A backlog of deferred messages", "",
           f"The latency gateway's spool, stopped, filled with {backlog['messages']:,} deferred",
           "plain-route messages (1 KiB, next attempt in 30 days) by the spool's own file",
           f"writers (`bench/backlog.py`, {backlog['seed_seconds']:.0f} s), then started again. "
           "New mail is",
           "measured as on the empty spool just before: same cells, same sink, same rate.", "",
           "| measure | empty spool | with the backlog | ratio |", "|---|---:|---:|---:|",
           *(f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows), "",
           f"After the run {backlog['deferred_after']:,} messages were still deferred and "
           f"{backlog['backlog_delivered']} of the backlog had reached the sink (expected: all "
           "of them, and none).", ""]
    return out


REMEDY_SHARE = 0.05  # a hot spot under 5% of the window is not worth a remedy line


def _remedies() -> list[tuple[str, str]]:
    """(pattern, remedy) from bench/analysis.md: lines "- `pattern`: remedy", continued."""
    path = Path(__file__).with_name("analysis.md")
    if not path.exists():
        return []
    found: list[tuple[str, str]] = []
    for block in re.split(r"\n(?=- `)", path.read_text()):
        match = re.match(r"- `([^`]+)`:?\s*(.*)", block, re.DOTALL)
        if match:
            found.append((match.group(1), " ".join(match.group(2).split())))
    return found


def _functions(rows: Iterable[dict[str, Any]], window: float, caller: bool) -> list[str]:
    return [f"| `{r['function']}` | {r['calls']} | {r['own']:.3f} | {r['cumulative']:.3f} | "
            f"{r['cumulative'] / window:.0%} |"
            + (f" `{r.get('caller', '')}` |" if caller else "") for r in rows]


def _profiles(data: dict[str, Any]) -> list[str]:
    profiles = data.get("profiles", [])
    if not profiles:
        return []
    out = ["## Where the time goes", "",
           "The worst cells of the targets above run again (after a few warm-up messages) with",
           "the gateway under cProfile: in its own process the event loop's thread and every",
           "other thread (bench/gateway_child.py), and its crypto worker processes",
           "(bench/worker_profile.py), each profiled, merged. Wall-clock times, so time a",
           "thread waits (fsync, the GIL, the next hop) counts where it waits, and the threads'",
           "and processes' times add up (shares of the window can pass 100%). The profiler",
           "slows the gateway down; the shares, not the seconds, are what to read. Event-loop,",
           "thread and worker scaffolding, and idle pool workers, are left out.", ""]
    remedies = _remedies()
    for profile in profiles:
        window = max(profile["seconds"], 1e-6)
        workers = profile.get("worker_processes", 0)
        out += [f"### {TITLES[profile['route']]}, {profile['cell']} ({window:.1f} s profiled"
                + (f", {workers} worker process{'es' if workers > 1 else ''}" if workers else "")
                + ")",
                "", f"Why this cell: {profile['why']}.", "",
                "| function (by cumulative time) | calls | own s | cumulative s | of the window |",
                "|---|---:|---:|---:|---:|", *_functions(profile["cumulative"], window, False),
                "",
                "| function (by own time) | calls | own s | cumulative s | of the window | "
                "mostly called from |",
                "|---|---:|---:|---:|---:|---|", *_functions(profile["own"], window, True), ""]
        hot = [r["function"] for r in profile["cumulative"] + profile["own"]
               if r["cumulative"] / window >= REMEDY_SHARE]
        hot += [r.get("caller", "") for r in profile["own"] if r["own"] / window >= REMEDY_SHARE]
        applicable = [(p, text) for p, text in remedies
                      if any(fnmatch.fnmatchcase(name, f"*{p}*") for name in hot if name)]
        if applicable:
            out += ["What would close it (bench/analysis.md, for the hot spots above):", ""]
            out += [f"- `{p}`: {text}" for p, text in applicable]
            out.append("")
    return out


def write(path: Path, data: dict[str, Any], plot_path: Path | None = None) -> None:
    events = data.get("events", {})
    if events and not isinstance(next(iter(events.values())), dict):
        events = {"throughput": events}  # results.json of an earlier format
    plot = None
    if plot_path is not None:
        from bench.plot import scaling

        if scaling(scaling_series(data), plot_path):
            plot = plot_path.resolve().relative_to(path.resolve().parent).as_posix() \
                if plot_path.resolve().is_relative_to(path.resolve().parent) else str(plot_path)
    out = [*_header(data, events), *_throughput(data), *_scaling(data, plot), *_latency(data),
           *_memory(data), *_backlog(data), *_targets(data), *_ceilings(data),
           *_profiles(data)]
    path.write_text("\n".join(out).rstrip() + "\n")


if __name__ == "__main__":
    import json

    here = Path(__file__).resolve().parent
    write(here.parent / "BENCHMARKS.md", json.loads((here / "results.json").read_text()),
          here / "scaling.png")
