"""The tamper-evident audit trail (DESIGN.md §6): append-only JSON Lines chained by SHA-256.

Each record carries `prev`, the hash of the record before it, and `hash`, the SHA-256 of its own
canonical JSON (sorted keys, no `hash` field). Editing, inserting or deleting a record breaks the
chain at that point, and `verify` names the first broken record. Files rotate daily
(`audit-YYYY-MM-DD.jsonl`); the first record of a file links to the last of the previous one,
so the chain runs across files, and files older than the retention are removed whole (the
oldest remaining file then starts the chain: `verify` reports where it starts).

Never content, never the Subject: callers pass envelope facts only, and `record` refuses the
field names that would carry them.

Durability: every record is written with one `write()` on an O_APPEND descriptor, so a kill -9
never leaves half a record (the kernel has the whole line). `sync()` fsyncs the trail, shared by
every thread that calls it at the same time (`gateway.spool.GroupCommit`: a caller returns once
an fsync that started after its record was written has succeeded); `durable()` is the same for
a coroutine, on a thread of the trail's own so that it never queues behind other work. The
accept stage makes the `received` record durable before the 250, in the spool's worker thread
once the queue file is (one thread hop for the whole commit), so a message that got a 250
always has its `received` record. The other records (unwrapped, wrapped, delivered, deferred,
bounced...) are not fsync'ed one by one: they reach the disk with the next fsync, the next
`received` one or at `close`. A power cut can therefore lose the last of them (never one before
a `received` record that was made durable, since an fsync covers everything written before it);
what they recorded is still true, and the spool, which fsyncs its own changes, decides what is
delivered again. After a crash a torn last line is cut at start and the repair is itself
recorded, so `verify` passes.

Threads: `record` may be called from any thread (the accept stage writes `received` records
from the spool's workers, the other stages from the event loop); a lock orders the appends, so
the chain is the order of the file.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import json
import os
import re
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.spool import GroupCommit

__all__ = ["AuditTrail", "Broken", "read_records", "verify"]

GENESIS = "0" * 64
_FILE = re.compile(r"^audit-(\d{4}-\d{2}-\d{2})\.jsonl$")
_FORBIDDEN = frozenset({"subject", "content", "body", "data", "message"})


# One encoder for every record: `json.dumps` with these options builds a new one per call.
_ENCODER = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _canonical(record: dict[str, Any]) -> str:
    return _ENCODER.encode(record)


def _digest(record: dict[str, Any]) -> str:
    body = {k: v for k, v in record.items() if k != "hash"}
    return hashlib.sha256(_canonical(body).encode("utf-8")).hexdigest()


def _line(record: dict[str, Any]) -> bytes:
    """The record's line, `hash` added: `_canonical(record | {"hash": ...})` byte for byte,
    with the JSON encoded once rather than twice (the keys before "hash" in sorted order,
    then the hash, then the rest)."""
    before = {k: v for k, v in record.items() if k < "hash"}
    after = {k: v for k, v in record.items() if k > "hash"}
    head, tail = _canonical(before)[1:-1], _canonical(after)[1:-1]
    digest = hashlib.sha256(
        ("{" + ",".join(part for part in (head, tail) if part) + "}").encode("utf-8")
    ).hexdigest()
    record["hash"] = digest
    middle = f'"hash":"{digest}"'
    return ("{" + ",".join(part for part in (head, middle, tail) if part) + "}\n").encode("utf-8")


def _files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if _FILE.match(p.name))


class AuditTrail:
    def __init__(self, folder: Path, retention: float = 183 * 86400.0,
                 clock: Callable[[], float] | None = None) -> None:
        self.folder = folder
        self.retention = retention
        self.clock = clock or (lambda: dt.datetime.now(dt.UTC).timestamp())
        self.last_hash = GENESIS
        self.day = ""
        self._day_span = (0.0, 0.0)  # [start, end) of `day`, as timestamps
        self.fd = -1
        self._dirty = False  # records written that no finished fsync covers
        self._written = 0  # records appended so far
        self._lock = threading.Lock()  # appends, rotation, and the descriptor an fsync takes
        self._retired: list[int] = []  # descriptors of rotated files, closed at `close`
        self._commit = GroupCommit(self._fsync)
        self._sync_task: asyncio.Future[None] | None = None
        self._executor: ThreadPoolExecutor | None = None
        self.fsyncs = 0  # of the trail's file, for benchmarks

    # -- opening and repair --------------------------------------------------------------------

    def open(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        files = _files(self.folder)
        repaired = None
        if files:
            repaired = self._repair(files[-1])
            for record in read_records([files[-1]]):
                self.last_hash = record.get("hash", self.last_hash)
        self._rotate_if_needed()
        self._expire()
        if repaired is not None:
            self.record("repair", file=files[-1].name, removed_bytes=repaired,
                        why="torn last record after an unclean stop")

    def _repair(self, path: Path) -> int | None:
        """Cut a torn or unparseable last line; returns how many bytes were removed."""
        data = path.read_bytes()
        if not data:
            return None
        keep = len(data)
        if not data.endswith(b"\n"):
            keep = data.rfind(b"\n") + 1
        else:
            last_start = data.rfind(b"\n", 0, len(data) - 1) + 1
            try:
                json.loads(data[last_start:])
            except ValueError:
                keep = last_start
        if keep == len(data):
            return None
        with open(path, "r+b") as handle:
            handle.truncate(keep)
            os.fsync(handle.fileno())
        return len(data) - keep

    def _rotate_if_needed(self, now: float | None = None) -> None:
        now = self.clock() if now is None else now
        if self.fd >= 0 and self._day_span[0] <= now < self._day_span[1]:
            return  # the common case, without formatting a date per record
        moment = dt.datetime.fromtimestamp(now, dt.UTC)
        midnight = moment.replace(hour=0, minute=0, second=0, microsecond=0)
        self._day_span = (midnight.timestamp(), (midnight + dt.timedelta(days=1)).timestamp())
        day = moment.strftime("%Y-%m-%d")
        if day == self.day and self.fd >= 0:
            return
        if self.fd >= 0:
            os.fsync(self.fd)
            # Closed at `close`, not now: an fsync in another thread may hold this number, and
            # a descriptor reused meanwhile would be fsync'ed in its place.
            self._retired.append(self.fd)
        self.day = day
        path = self.folder / f"audit-{day}.jsonl"
        fresh = not path.exists() or path.stat().st_size == 0
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        folder_fd = os.open(self.folder, os.O_RDONLY)
        try:
            os.fsync(folder_fd)
        finally:
            os.close(folder_fd)
        if fresh:
            # Every file opens with a link record, so the chain may only start at a file
            # boundary: removing the first records of the oldest file is then detected.
            self._append("rotate", {"file": path.name})

    def _expire(self) -> None:
        horizon = dt.datetime.fromtimestamp(self.clock() - self.retention, dt.UTC)
        for path in _files(self.folder):
            match = _FILE.match(path.name)
            assert match is not None
            day = dt.datetime.strptime(match.group(1), "%Y-%m-%d").replace(tzinfo=dt.UTC)
            if day + dt.timedelta(days=1) < horizon and path.name != f"audit-{self.day}.jsonl":
                path.unlink()

    # -- writing -------------------------------------------------------------------------------

    def record(self, event: str, **fields: Any) -> dict[str, Any]:
        if not _FORBIDDEN.isdisjoint(map(str.lower, fields)):
            forbidden = _FORBIDDEN & {k.lower() for k in fields}
            raise ValueError(f"audit records never carry {', '.join(sorted(forbidden))}")
        with self._lock:
            now = self.clock()
            self._rotate_if_needed(now)
            return self._append(event, fields, now)

    def _append(self, event: str, fields: dict[str, Any],
                now: float | None = None) -> dict[str, Any]:
        now = self.clock() if now is None else now
        record: dict[str, Any] = {
            "time": dt.datetime.fromtimestamp(now, dt.UTC).isoformat(timespec="milliseconds"),
            "event": event,
            **{k: v for k, v in fields.items() if v is not None},
            "prev": self.last_hash,
        }
        os.write(self.fd, _line(record))
        self.last_hash = record["hash"]
        self._written += 1
        self._dirty = True
        return record

    def sync(self) -> None:
        """Return once every record written before the call is on disk (blocking, for any
        thread; concurrent callers share one fsync). Raises the fsync's OSError."""
        if self._dirty:
            self._commit.sync()

    def _fsync(self) -> None:
        with self._lock:
            fd, covers = self.fd, self._written
        if fd < 0:
            return
        os.fsync(fd)
        with self._lock:
            self.fsyncs += 1
            if self._written == covers:
                self._dirty = False

    async def durable(self) -> None:
        """Wait until every record written so far is on disk; concurrent callers share fsyncs."""
        # Only an unfinished fsync is waited for: awaiting a finished task does not yield to the
        # event loop, so looping on one that its creator has not cleared yet would spin forever
        # and freeze the whole server (seen under concurrent sessions).
        while self._sync_task is not None and not self._sync_task.done():
            await asyncio.shield(self._sync_task)
        if not self._dirty:
            return
        if self._executor is None:
            # One thread: one fsync at a time is all the group commit ever runs.
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="audit")
        # Looked up now, not bound once: tests replace `sync` to simulate a failing disk.
        task = asyncio.get_running_loop().run_in_executor(self._executor, self.sync)
        self._sync_task = task
        try:
            await asyncio.shield(task)
        finally:
            if self._sync_task is task:  # a later caller may have started the next one
                self._sync_task = None

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        if self.fd >= 0:
            self.sync()
            os.close(self.fd)
            self.fd = -1
        for fd in self._retired:
            os.close(fd)
        self._retired.clear()


# -- reading and verifying ------------------------------------------------------------------


def read_records(files: list[Path]) -> Iterator[dict[str, Any]]:
    for path in files:
        with open(path, "rb") as handle:
            for number, line in enumerate(handle, 1):
                try:
                    record = json.loads(line)
                except ValueError:
                    record = {"event": "unparseable", "_broken": True}
                record["_file"] = path.name
                record["_line"] = number
                yield record


@dataclass(frozen=True)
class Broken:
    file: str
    line: int
    why: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.why}"


def verify(folder: Path) -> tuple[int, Broken | None]:
    """Check the whole chain; returns (records checked, the first broken record or None)."""
    previous: str | None = None
    count = 0
    for record in read_records(_files(folder)):
        where = (record.pop("_file"), record.pop("_line"))
        if record.pop("_broken", False):
            return count, Broken(*where, "the line is not a JSON record (edited or torn)")
        if _digest(record) != record.get("hash"):
            return count, Broken(*where, "the record was changed after it was written")
        if previous is None and record.get("prev") != GENESIS and record.get("event") != "rotate":
            return count, Broken(
                *where,
                "the trail does not start at a file boundary (its first records were removed)",
            )
        if previous is not None and record.get("prev") != previous:
            return count, Broken(
                *where, "the chain is broken before this record (a record was removed or inserted)"
            )
        previous = record["hash"]
        count += 1
    return count, None


def search(folder: Path, *, message_id: str | None = None, queue_id: str | None = None,
           address: str | None = None, since: dt.datetime | None = None,
           until: dt.datetime | None = None) -> Iterator[dict[str, Any]]:
    """The records of the messages that match, oldest first, as one timeline per message.

    A message is found by its Message-ID, its queue id, or an address in its envelope; then
    every record of that queue id is returned (unwrapped, wrapped, delivered... carry only the
    queue id), together with the records of the DSNs it caused.
    """
    records = [r for r in read_records(_files(folder)) if not r.get("_broken")]
    wanted_address = address.lower() if address else None
    queue_ids: set[str] = set()
    for record in records:
        if message_id is not None and record.get("message_id") != message_id:
            continue
        if queue_id is not None and queue_id not in (record.get("queue_id"),
                                                     record.get("dsn_queue_id")):
            continue
        if wanted_address is not None:
            envelope = [record.get("sender"), record.get("recipient"),
                        *(record.get("recipients") or [])]
            if wanted_address not in {str(a).lower() for a in envelope if a}:
                continue
        if record.get("queue_id"):
            queue_ids.add(record["queue_id"])
    for record in records:  # DSNs made for those messages belong to their timeline
        if record.get("queue_id") in queue_ids and record.get("dsn_queue_id"):
            queue_ids.add(record["dsn_queue_id"])
    for record in records:
        if record.get("queue_id") not in queue_ids and record.get("dsn_queue_id") not in queue_ids:
            continue
        when = dt.datetime.fromisoformat(record["time"]) if "time" in record else None
        if since and when and when < since:
            continue
        if until and when and when > until:
            continue
        yield record
