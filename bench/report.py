"""BENCHMARKS.md from one `make bench` run (bench/run.py): medians and ratios side by side."""

from __future__ import annotations

import datetime as dt
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

NAMES = {"gateway": "Passerelle", "postfix": "Postfix", "filter": "per-message filter"}


def _median(runs: Sequence[Any], field: str) -> float:
    return statistics.median(getattr(r, field) for r in runs) if runs else float("nan")


def _cell(results: Sequence[Any], system: str, route: str, size: str, connections: int,
          recipients: int) -> list[Any]:
    return [r for r in results if (r.system, r.route, r.size, r.connections, r.recipients)
            == (system, route, size, connections, recipients)]


def write(path: Path, results: Sequence[Any], ceilings: dict[str, float],
          events: dict[str, int], elapsed: float, runs: int, seconds: float,
          machine: str) -> None:
    shapes = sorted({(r.size, r.connections, r.recipients) for r in results},
                    key=lambda s: (s[0] != "10KiB", s[1], s[2]))
    out = [
        "# Benchmarks",
        "",
        f"Measured by `make bench` (bench/run.py) on {dt.date.today().isoformat()}, {machine};",
        "everything on this one machine over loopback: the load generator, the relay under test",
        f"and the sink share its cores. {runs} runs per cell, each sending for {seconds:g} s;",
        "medians shown. The whole run took " + f"{elapsed / 60:.1f} minutes.",
        "",
        "- Load generator (`bench/loadgen.py`, the same for every system): N connections, each",
        "  sending the same message back to back (no pipelining, no TLS).",
        "- Sink: Postfix's `smtp-sink` (C), the same for every system; every relay talks to it",
        "  in clear text.",
        "- **end to end** = messages at the sink / (last message at the sink - first byte sent);",
        "  **accept** = 250 replies per second seen by the load generator.",
        "- Passerelle: `gateway serve` (bench/gateway_child.py) with fsync of file and folder",
        "  before every 250, audit trail on, spool not encrypted.",
        "- Postfix 3.7 (Debian), private instance, default durability (fsync before 250).",
        "- per-message filter (bench/filter.py): an SMTP content filter running `openssl cms`",
        "  and `gpg` as one process per step and per message, relaying before its 250.",
        "- adapters alone: `gateway.pipeline.prepare` (unwrap + wrap) in a loop, one thread,",
        "  no SMTP, no disk: the ceiling the crypto allows on one core.",
        "- Validity: the sink counts every transaction, DSNs included, so the gateway's audit",
        "  trail is tallied at the end: " + ", ".join(f"{k} {v}" for k, v in sorted(events.items()))
        + ("." if not events.get("bounced") else " — **some messages bounced: these figures"
           " include DSNs and are not valid.**"),
        "",
    ]
    for route, title, baseline in (
        ("plain", "Plain relay (mime → mime) against Postfix", "postfix"),
        ("smime-to-apicrypt", "S/MIME → Apicrypt (OpenPGP) against the per-message filter",
         "filter"),
        ("apicrypt-to-smime", "Apicrypt (OpenPGP) → S/MIME against the per-message filter",
         "filter"),
    ):
        out += [f"## {title}", "",
                f"| size | conn. | rcpt | Passerelle end to end (accept) msg/s | "
                f"{NAMES[baseline]} end to end (accept) msg/s | ratio end to end |"
                + (" adapters alone msg/s | Passerelle / adapters |" if baseline == "filter"
                   else ""),
                "|---|---:|---:|---:|---:|---:|" + ("---:|---:|" if baseline == "filter"
                                                    else "")]
        for size, connections, recipients in shapes:
            ours = _cell(results, "gateway", route, size, connections, recipients)
            theirs = _cell(results, baseline, route, size, connections, recipients)
            if not ours:
                continue
            rate, accept = _median(ours, "rate"), _median(ours, "accept_rate")
            base, base_accept = _median(theirs, "rate"), _median(theirs, "accept_rate")
            drained = "" if all(r.drained for r in ours) else " (not drained)"
            ratio = f"{rate / base:.2f}×" if theirs and base > 0 else "n/a"
            row = (f"| {size} | {connections} | {recipients} | {rate:.1f} ({accept:.1f})"
                   f"{drained} | " + (f"{base:.1f} ({base_accept:.1f})" if theirs else "n/a")
                   + f" | {ratio} |")
            if baseline == "filter":
                ceiling = ceilings.get(f"{route}/{size}/{recipients}")
                row += (f" {ceiling:.1f} | {rate / ceiling:.0%} |" if ceiling else " n/a | n/a |")
            out.append(row)
        out.append("")
    spool = [r for r in results if r.system == "gateway" and r.spool]
    if spool:
        out += ["## Group commit (Passerelle's spool)", "",
                "Spool counters during each run, summed over the runs of a cell: messages made",
                "durable (`enqueued`), folder fsyncs (`dir_fsyncs`: the shared fsync of active/",
                "before the 250s, plus the state rewrites and removals of delivery), file fsyncs.",
                "",
                "| route | size | conn. | rcpt | messages | dir fsyncs | dir fsyncs / message "
                "| file fsyncs / message |",
                "|---|---|---:|---:|---:|---:|---:|---:|"]
        for route in ("plain", "smime-to-apicrypt", "apicrypt-to-smime"):
            for size, connections, recipients in shapes:
                cell = [r for r in _cell(results, "gateway", route, size, connections,
                                         recipients) if r.spool]
                enqueued = sum(r.spool["enqueued"] for r in cell)
                if not enqueued:
                    continue
                dirs = sum(r.spool["dir_fsyncs"] for r in cell)
                files = sum(r.spool["file_fsyncs"] for r in cell)
                out.append(f"| {route} | {size} | {connections} | {recipients} | {enqueued} | "
                           f"{dirs} | {dirs / enqueued:.2f} | {files / enqueued:.2f} |")
        out.append("")
    out += _targets(results, ceilings)
    notes = Path(__file__).with_name("analysis.md")
    if notes.exists():
        out += [notes.read_text().rstrip(), ""]
    path.write_text("\n".join(out) + "\n")


def _targets(results: Sequence[Any], ceilings: dict[str, float]) -> list[str]:
    """The issue's throughput targets, computed from this run's medians."""
    lines = ["## Targets (issue 8), from this run", "",
             "| target | cells met | worst cell |", "|---|---:|---|"]
    shapes = sorted({(r.size, r.connections, r.recipients) for r in results})

    def ratios(route: str, baseline: str) -> list[tuple[float, str]]:
        found = []
        for size, connections, recipients in shapes:
            ours = _cell(results, "gateway", route, size, connections, recipients)
            theirs = _cell(results, baseline, route, size, connections, recipients)
            if ours and theirs and _median(theirs, "rate") > 0:
                found.append((_median(ours, "rate") / _median(theirs, "rate"),
                              f"{size} c={connections} r={recipients}"))
        return found

    def row(name: str, found: list[tuple[float, str]], goal: float, unit: str) -> None:
        if not found:
            return
        met = sum(1 for value, _ in found if value >= goal)
        value, where = min(found)
        shown = f"{value:.0%}" if unit == "%" else f"{value:.2f}×"
        lines.append(f"| {name} | {met}/{len(found)} | {shown} ({where}) |")

    row("plain relay ≥ Postfix (end to end)", ratios("plain", "postfix"), 1.0, "×")
    for route in ("smime-to-apicrypt", "apicrypt-to-smime"):
        row(f"{route} ≥ 20× the per-message filter", ratios(route, "filter"), 20.0, "×")
        ceiling = []
        for size, connections, recipients in shapes:
            ours = _cell(results, "gateway", route, size, connections, recipients)
            top = ceilings.get(f"{route}/{size}/{recipients}")
            if ours and top:
                ceiling.append((_median(ours, "rate") / top,
                                f"{size} c={connections} r={recipients}"))
        row(f"{route} ≥ 60% of the adapters alone", ceiling, 0.6, "%")
    return [*lines, ""]


if __name__ == "__main__":
    # Rebuild BENCHMARKS.md from bench/results.json without measuring again.
    import json
    from types import SimpleNamespace

    here = Path(__file__).resolve().parent
    saved = json.loads((here / "results.json").read_text())
    write(here.parent / "BENCHMARKS.md", [SimpleNamespace(**r) for r in saved["runs"]],
          saved["adapters_alone"], saved.get("events", {}), saved["seconds"],
          saved.get("repetitions", 3), saved.get("load_seconds", 1.5), saved.get("machine", ""))
