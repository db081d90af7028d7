"""The audit trail's side of the commit before a 250: its fsync never waits behind other work on
the default executor, records written after the 250 are not fsync'ed one by one, and every line
is still the canonical JSON of its record (what `verify` recomputes)."""

from __future__ import annotations

import asyncio
import json
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from gateway.audit import AuditTrail, read_records, verify

T0 = 1_795_000_000.0


def trail(folder: Path) -> AuditTrail:
    audit = AuditTrail(folder, clock=lambda: T0)
    audit.open()
    return audit


def test_each_line_is_the_canonical_json_of_its_record(tmp_path: Path) -> None:
    audit = trail(tmp_path)
    written = [
        audit.record("received", queue_id="Q1", message_id="<é@x>", sender="a@chu-test.fr",
                     recipients=["b@clinique-test.fr", "c@clinique-test.fr"], size=10),
        # Keys on both sides of "hash" in sorted order, nested values, non-ASCII text.
        audit.record("unwrapped", queue_id="Q1", fingerprints=["AB", "CD"], encrypted=True,
                     recipient_keys={"b@x": "01", "a@x": "02"}, zeta="ü", alpha=None, why="ok"),
        audit.record("delivered", queue_id="Q1", recipient="b@clinique-test.fr",
                     reply='250 2.0.0 "quoted" \\ ok'),
    ]
    audit.close()
    [path] = sorted(tmp_path.iterdir())
    lines = path.read_bytes().splitlines()
    assert len(lines) == 1 + len(written)  # the link record of a new file, then ours
    for line, record in zip(lines[1:], written, strict=True):
        parsed = json.loads(line)
        assert parsed == record
        canonical = json.dumps(parsed, sort_keys=True, separators=(",", ":"),
                               ensure_ascii=False).encode("utf-8")
        assert line == canonical
    assert verify(tmp_path) == (4, None)


async def test_durable_does_not_wait_behind_the_default_executor(tmp_path: Path) -> None:
    """A 250 waits for this fsync: it must not queue behind whatever else runs on asyncio's
    default executor (the queue manager's spool reads and removals)."""
    audit = trail(tmp_path)
    loop = asyncio.get_running_loop()
    busy = ThreadPoolExecutor(1)
    release = threading.Event()
    loop.set_default_executor(busy)
    blocked = loop.run_in_executor(None, release.wait, 30)
    try:
        audit.record("received", queue_id="Q1")
        await asyncio.wait_for(audit.durable(), 20)  # bounded: a regression fails, not hangs
        assert audit.fsyncs == 1
    finally:
        release.set()
        await blocked
        audit.close()
        busy.shutdown()


async def test_records_after_the_250_wait_for_the_next_fsync(tmp_path: Path) -> None:
    audit = trail(tmp_path)
    synced = audit.fsyncs
    for index in range(5):
        audit.record("delivered", queue_id=f"Q{index}", recipient="b@clinique-test.fr")
    assert audit.fsyncs == synced  # not one fsync per record
    audit.record("received", queue_id="Q9")
    await audit.durable()
    assert audit.fsyncs == synced + 1  # one fsync covers them all
    await audit.durable()
    assert audit.fsyncs == synced + 1  # nothing new: nothing to do
    audit.close()
    events = [r["event"] for r in read_records(sorted(tmp_path.iterdir()))]
    assert events.count("delivered") == 5
    assert verify(tmp_path)[1] is None
