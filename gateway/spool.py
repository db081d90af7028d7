"""The spool: where an accepted message waits, durably, until every recipient is final.

The one promise this module keeps: `enqueue` returns only once the message and its envelope are
on stable storage, so the 250 that follows survives a kill -9 or a power cut; on restart,
`recover` hands back everything that got one.

Layout (Postfix's queue, whose folders mean something)::

    <root>/incoming/   files being written; whatever is left here at start never got a 250
    <root>/active/     accepted messages that are due or being delivered
    <root>/deferred/   messages waiting for a retry
    <root>/hold/       messages an operator put on hold (`gateway queue hold`)
    <root>/corrupt/    unreadable messages, with a `<id>.why` note; never deleted automatically
    <root>/state/      a message's delivery state, `<id>.state`, once an attempt changed it

A message is one write-once queue file `<id>` (envelope + message bytes) in exactly one of
active/, deferred/, hold/ or corrupt/: moving a message is one rename(2), atomic even across a
crash, so it is always in one place whatever the server and the operator's tools do at once.
Its mutable part, the per-recipient `DeliveryState`, starts as `DeliveryState.initial(envelope)`
(every recipient pending, no attempt yet), which needs no file: it is rebuilt from the envelope
wherever a state file is missing (`read_state`, `recover`, `entries`). A state file is written
only when an attempt changes the state, atomically (write a temporary file in incoming/, fsync,
rename over `state/<id>.state`, fsync state/). It lives in a folder of its own rather than
beside the queue file because a move would otherwise take two renames, and a state rewrite
racing an operator's `hold` could land in the folder the message just left.

Enqueue, and why it is safe (POSIX: rename(2) is atomic; a new directory entry is durable only
once the directory itself is fsync'ed, as Linux ext4/XFS document and Postfix assumes):

1. write incoming/<id> (O_EXCL, 0600) with one writev(2), fsync it;
2. rename it into active/;
3. fsync active/; only now may the caller answer 250.

A crash before 3 leaves either a file in incoming/ (deleted at start: the message never got a
250) or a complete queue file in active/ (its bytes were fsync'ed before the rename) whose peer
may send it again: at worst a duplicate, never a loss, and never a torn file in active/. With no
state file, recovery starts from the initial state, which is exactly the state of a message
that no attempt has touched. The three steps run in one worker thread, one hop off the event
loop per message (the accept stage writes the `received` audit record and starts its fsync
meanwhile). If the 250 cannot be sent after all, `withdraw` takes the message back out,
durably, before the peer gets its 4xx.

Group commit: directory fsyncs are shared. Each change (a rename into active/ at enqueue, the
unlink of a finished message, a state rename) takes a ticket once it is done; one fsync of a
folder runs at a time, and it releases every ticket taken before it started (those changes
were complete, so the fsync covers them); changes made while it runs wait for the next one,
which covers them all. An fsync that fails fails every change it was to cover (each enqueue of
the group answers 451), rather than letting a later fsync vouch for them. Enqueues, `finish`
and state rewrites all run in worker threads and share it among them (a waiting enqueue holds
its worker until then: `workers` bounds how many enqueues are in flight at once). File fsyncs
are not serialised: each runs in its own worker thread, so the filesystem journal can commit
many in one transaction. So a message costs one file fsync and a share of one fsync of active/
before its 250, and a share of one fsync of its folder when it leaves.
`stats.file_fsyncs` and `stats.dir_fsyncs` count every fsync the spool makes, `stats.published`
renames into active/, `stats.enqueued` messages made durable, `stats.removed` messages removed
by `finish` or `withdraw`; during a burst, (published + removed) / dir_fsyncs is about the mean
group size.

Removal (`finish`, `withdraw`): unlink the queue file, fsync its folder (shared), then unlink
the state file, if any, without an fsync of state/. A crash before the folder's fsync may bring
the queue file back, and the message is delivered again: a duplicate, never a loss. A crash
after it may bring back only the state file, an orphan that recovery removes; the state file
never goes first, so a surviving queue file never loses its state.

With `removal_delay` (seconds), `finish` does not wait for that fsync: it unlinks the queue
file and returns, and the fsync that makes the removal durable is the next one of the folder,
whatever it is for (under load, the next enqueue's fsync of active/, within milliseconds), or
at the latest one made `removal_delay` seconds later by a timer (and at `close`). Only then is
the state file unlinked, so the order above still holds. What this risks is only a duplicate,
and only after a power cut or a kernel crash within that window: a kill -9 of the gateway
loses no unlink the kernel has made. `withdraw` stays durable before it returns, since the
peer is told to send the message again.

File format (the queue file and the state file alike)::

    magic (4: b"PSQF" queue, b"PSST" state) | version (1) | mode (1: 0 plain, 1 AES-256-GCM)
    then records: length (8, big endian) | body
    plain body:     payload | CRC-32 of payload (4)
    encrypted body: nonce (12, random per write) | AES-256-GCM ciphertext and tag

A queue file holds two records, the envelope (JSON) then the message; a state file one, the
state (JSON). Length framing detects truncation; the CRC, or the GCM tag, detects damage. With a
spool key (DESIGN §10: 32 random bytes), no plaintext reaches the disk: every record is sealed,
and its associated data (header, kind, queue id) binds it to its file, so swapping files or
records between messages fails authentication. A plain file in an encrypted spool, or the
reverse, is refused, not guessed at: drain the queue before adding or changing the key.

Other processes (`gateway queue hold|release|retry|delete`) act with the same renames and atomic
writes. The server notices by calling `locate` before each attempt (held, deleted and quarantined
messages are skipped); `retry` rewrites next_attempt=0 in the state; `write_state` renames a queue
file only from where it found it, so it never brings back a message moved or deleted meanwhile.
Two writers of one state file at the same moment: the last rename wins (an operator's retry may
be overwritten by the attempt that was in flight, which then reschedules it anyway).

Assumptions: the whole spool is on one local POSIX filesystem (renames between its folders);
its owner is the only user with access (folders are created 0700, files 0600).

Untrusted input: the spool's files are parsed defensively (lengths checked against the file
size before anything is allocated); anything unreadable goes to corrupt/ with a reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import errno
import functools
import logging
import os
import re
import secrets
import struct
import threading
import time
import weakref
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Literal, Protocol, TypeVar

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from gateway.envelope import DeliveryState, Envelope, Status
from gateway.errors import Reason, TemporaryFailure

__all__ = [
    "LOCATIONS",
    "QUEUE_ID",
    "Alongside",
    "CorruptQueueFile",
    "GroupCommit",
    "Location",
    "NoSuchMessage",
    "Operation",
    "QueueEntry",
    "Spool",
    "SpoolError",
    "SpoolFaults",
    "SpoolStats",
]

log = logging.getLogger("gateway.spool")

Location = Literal["active", "deferred", "hold", "corrupt"]
LOCATIONS: tuple[Location, ...] = ("active", "deferred", "hold", "corrupt")
INCOMING = "incoming"
STATE = "state"

QUEUE_MAGIC = b"PSQF"
STATE_MAGIC = b"PSST"
FORMAT_VERSION = 1
MODE_PLAIN = 0
MODE_AESGCM = 1
_HEADER = struct.Struct(">4sBB")
_LENGTH = struct.Struct(">Q")
_CRC = struct.Struct(">I")
_NONCE = 12
_TAG = 16

# Crockford's base32: digits sort before letters in ASCII, so ids sort by creation time.
_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
QUEUE_ID = re.compile(r"[0-9A-Z]{12,32}")  # a queue file's name
_id_lock = threading.Lock()
_last_micros = 0

T = TypeVar("T")


# -- public types --------------------------------------------------------------------------------


class SpoolError(Exception):
    """Base of the spool's own errors (storage failures at enqueue are `TemporaryFailure`)."""


class CorruptQueueFile(SpoolError):
    """A queue or state file cannot be read back; the caller moves it aside with `quarantine`."""

    def __init__(self, queue_id: str, why: str) -> None:
        super().__init__(f"{queue_id}: {why}")
        self.queue_id = queue_id
        self.why = why


class NoSuchMessage(SpoolError, LookupError):
    """No message with this queue id is in the spool (maybe finished or deleted meanwhile)."""


@dataclass(frozen=True)
class QueueEntry:
    queue_id: str
    location: Location
    envelope: Envelope | None  # None when the file is unreadable (always in corrupt/)
    state: DeliveryState | None  # None when the file is unreadable


@dataclass
class SpoolStats:
    """Counters for metrics and benchmarks; updated from several threads, hence the lock."""

    enqueued: int = 0
    enqueue_failures: int = 0
    published: int = 0  # renamed into active/ (each then waits for a shared directory fsync)
    file_fsyncs: int = 0
    dir_fsyncs: int = 0
    quarantined: int = 0
    removed: int = 0  # queue files removed by `finish` or `withdraw`
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, counter: str, amount: int = 1) -> None:
        with self._lock:
            setattr(self, counter, getattr(self, counter) + amount)


Operation = Literal["write", "fsync", "rename", "fsync_dir", "unlink"]


@dataclass(frozen=True)
class SpoolFaults:
    """Test seam: `hook(operation, path)` runs before every write, fsync, rename and removal
    the spool makes (removals of queue and state files by `finish`, `withdraw` and `delete`),
    and may raise OSError (ENOSPC, EIO...) to simulate a full or failing disk."""

    hook: Callable[[Operation, Path], None] | None = None

    @staticmethod
    def failing(
        code: int = errno.ENOSPC, operations: Iterable[Operation] = ("write",)
    ) -> SpoolFaults:
        wanted = frozenset(operations)

        def hook(operation: Operation, path: Path) -> None:
            if operation in wanted:
                raise OSError(code, os.strerror(code), str(path))

        return SpoolFaults(hook)

    def __call__(self, operation: Operation, path: Path) -> None:
        if self.hook is not None:
            self.hook(operation, path)


# -- file format ---------------------------------------------------------------------------------


class _Unreadable(Exception):
    """Internal: why a file cannot be read; becomes CorruptQueueFile or a move to corrupt/."""


class _Codec:
    """Seals and opens records; one opaque reason outward when authentication fails."""

    def __init__(self, key: bytes | None) -> None:
        if key is not None and len(key) != 32:
            raise ValueError(
                f"the spool encryption key must be exactly 32 bytes, not {len(key)}; "
                "make one with: head -c 32 /dev/urandom > spool.key"
            )
        self.aead = AESGCM(key) if key is not None else None
        self.mode = MODE_AESGCM if key is not None else MODE_PLAIN

    def header(self, magic: bytes) -> bytes:
        return _HEADER.pack(magic, FORMAT_VERSION, self.mode)

    @staticmethod
    def aad(header: bytes, kind: str, queue_id: str) -> bytes:
        return b"%s%s:%s" % (header, kind.encode(), queue_id.encode())

    def seal(self, payload: bytes, aad: bytes) -> list[bytes]:
        """The record's pieces, to write with writev (no copy of a large payload when plain)."""
        if self.aead is None:
            return [_LENGTH.pack(len(payload) + _CRC.size), payload,
                    _CRC.pack(zlib.crc32(payload))]
        nonce = os.urandom(_NONCE)
        sealed = self.aead.encrypt(nonce, payload, aad)
        return [_LENGTH.pack(_NONCE + len(sealed)), nonce, sealed]

    def check_header(self, data: bytes, magic: bytes) -> bytes:
        if len(data) < _HEADER.size:
            raise _Unreadable("truncated: the header is incomplete")
        found, version, mode = _HEADER.unpack(data)
        if found != magic:
            raise _Unreadable("not a spool file of this kind (bad magic)")
        if version != FORMAT_VERSION:
            raise _Unreadable(f"format version {version} is not known to this gateway")
        if mode != self.mode:
            raise _Unreadable(
                "the file is encrypted but no spool key is configured" if mode == MODE_AESGCM
                else "the file is not encrypted but a spool key is configured"
            )
        return data

    def read(self, f: IO[bytes], remaining: int, aad: bytes, what: str) -> bytes:
        length = self._length(f, remaining, what)
        if self.aead is None:
            if length < _CRC.size:
                raise _Unreadable(f"{what}: record too short")
            payload = _read_exact(f, length - _CRC.size, what)
            (crc,) = _CRC.unpack(_read_exact(f, _CRC.size, what))
            if zlib.crc32(payload) != crc:
                raise _Unreadable(f"{what}: checksum mismatch (damaged file)")
            return payload
        if length < _NONCE + _TAG:
            raise _Unreadable(f"{what}: record too short")
        nonce = _read_exact(f, _NONCE, what)
        sealed = _read_exact(f, length - _NONCE, what)
        try:
            return self.aead.decrypt(nonce, sealed, aad)
        except InvalidTag:
            raise _Unreadable(
                f"{what}: authentication failed (wrong spool key, or the file was altered "
                "or swapped)"
            ) from None

    def skip(self, f: IO[bytes], remaining: int, what: str) -> int:
        """Check a record's framing without reading it; returns the bytes it takes."""
        length = self._length(f, remaining, what)
        f.seek(length, os.SEEK_CUR)
        return _LENGTH.size + length

    @staticmethod
    def _length(f: IO[bytes], remaining: int, what: str) -> int:
        length: int = _LENGTH.unpack(_read_exact(f, _LENGTH.size, what))[0]
        # Checked against the file size before reading, so a damaged length never makes us
        # allocate gigabytes.
        if length > remaining - _LENGTH.size:
            raise _Unreadable(f"truncated: the {what} record is incomplete")
        return length


def _read_exact(f: IO[bytes], size: int, what: str) -> bytes:
    data = f.read(size)
    if len(data) != size:
        raise _Unreadable(f"truncated: the {what} record is incomplete")
    return data


def _parse_envelope(data: bytes, queue_id: str) -> Envelope:
    try:
        envelope = Envelope.from_json(data)
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        # The exception's type only: its text could quote content of the file.
        raise _Unreadable(f"the envelope is not valid ({type(exc).__name__})") from None
    if envelope.queue_id != queue_id:
        raise _Unreadable(f"the envelope belongs to queue id {envelope.queue_id!r}")
    return envelope


def _parse_state(data: bytes) -> DeliveryState:
    try:
        return DeliveryState.from_json(data)
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise _Unreadable(f"the delivery state is not valid ({type(exc).__name__})") from None


def _write_all(fd: int, pieces: Sequence[bytes]) -> None:
    views = [memoryview(p) for p in pieces if len(p)]
    while views:
        written = os.writev(fd, views)
        while written:
            if written >= len(views[0]):
                written -= len(views.pop(0))
            else:
                views[0] = views[0][written:]
                written = 0


def _names(folder: Path) -> list[str]:
    try:
        return os.listdir(folder)
    except FileNotFoundError:
        return []


def _close_all(descriptors: dict[str, int]) -> None:
    for fd in descriptors.values():
        with contextlib.suppress(OSError):
            os.close(fd)
    descriptors.clear()


def _unlink(path: str | Path) -> bool:
    try:
        os.unlink(path)
        return True
    except FileNotFoundError:
        return False


def _micros_to_id(micros: int) -> str:
    chars = []
    for _ in range(11):  # 55 bits of microseconds: good until the year 3111
        chars.append(_ALPHABET[micros & 31])
        micros >>= 5
    return "".join(reversed(chars))


def _id_micros(queue_id: str) -> int | None:
    """The microseconds at the start of an id that `new_queue_id` made (17 characters)."""
    if len(queue_id) != 17:
        return None
    micros = 0
    for char in queue_id[:11]:
        value = _ALPHABET.find(char)
        if value < 0:
            return None
        micros = micros << 5 | value
    return micros


def _ids_after(names: Iterable[str]) -> None:
    """Make the ids this process makes from now on sort after every name in `names`, so that
    one never names a message already in the spool, even with a clock set back since."""
    global _last_micros
    highest = max((m for m in map(_id_micros, names) if m is not None), default=0)
    if highest >= (1 << 55) - (1 << 40):
        return  # not an id of ours: nothing to keep clear of
    with _id_lock:
        _last_micros = max(_last_micros, highest)


# -- group commit --------------------------------------------------------------------------------


class GroupCommit:
    """Shares one fsync among the threads that changed what it covers (thread-safe, blocking):
    a folder of the spool, or the audit trail's file.

    A caller calls `sync` once its change (rename, unlink, appended record) is complete. One
    fsync runs at a time, in rounds: the first round to start after a change covers it, so a
    caller waits for that round (running it itself when none is running) and gets its outcome.
    A failed fsync fails every caller of its round, as if each had run it: none is told its
    change is durable on the strength of a later fsync."""

    def __init__(self, fsync: Callable[[], None]) -> None:
        self._fsync = fsync
        self._lock = threading.Lock()
        self._finished_round = threading.Condition(self._lock)
        self._started = 0  # rounds started; one at a time, so all but the last have finished
        self._finished = 0
        self._waiting: dict[int, int] = {}  # round -> callers that have not read its outcome
        self._outcomes: dict[int, BaseException | None] = {}
        self._after: list[tuple[int, Callable[[], None]]] = []  # (round, action) for `later`

    def later(self, action: Callable[[], None]) -> None:
        """Run `action` once a round that starts after this call has succeeded, without
        starting one: for a change whose durability may wait, carried by whatever fsync comes
        next. `action` runs in the thread that ran that round, and must not raise."""
        with self._lock:
            self._after.append((self._started + 1, action))

    def pending(self) -> bool:
        with self._lock:
            return bool(self._after)

    def sync(self) -> None:
        with self._lock:
            round_ = self._started + 1  # the next round to start covers this caller's change
            self._waiting[round_] = self._waiting.get(round_, 0) + 1
            # Wait while a round runs: ours (started by another caller), or the one before it.
            while self._finished < round_ and self._started > self._finished:
                self._finished_round.wait()
            if self._finished >= round_:
                self._outcome(round_)
                return
            self._started = round_  # none running and ours not started: run it
        error: BaseException | None = None
        try:
            self._fsync()
        except BaseException as raised:  # recorded for the round's callers, raised below
            error = raised
        due: list[Callable[[], None]] = []
        with self._lock:
            self._finished = round_
            self._outcomes[round_] = error
            if error is None and self._after:
                due = [action for covered, action in self._after if covered <= round_]
                self._after = [item for item in self._after if item[0] > round_]
            self._finished_round.notify_all()
            self._outcome(round_)  # raises only for a failed round, which has nothing due
        for action in due:
            action()

    def _outcome(self, round_: int) -> None:
        """Called with the lock held: read a finished round's outcome, raise its error."""
        error = self._outcomes[round_]
        self._waiting[round_] -= 1
        if not self._waiting[round_]:
            del self._waiting[round_], self._outcomes[round_]
        if error is not None:
            raise error


class Alongside(Protocol):
    """Work that the enqueueing worker thread does with the message's commit, so that the
    commit before a 250 is one hop off the event loop (the accept stage's `received` audit
    record). Neither method may raise: each keeps its own failure for its caller to act on
    (an exception is taken as a defect: the message is removed again and it is raised)."""

    def write(self) -> None:
        """Called on the event loop's thread once the worker thread has the message: what it
        writes meanwhile travels with the spool's journal commits on most filesystems, which
        makes its own fsync cheap. Python work stays on the event loop: a worker thread that
        needs the GIL between its system calls waits for the loop to let it go."""

    def sync(self) -> None:
        """Called in the worker thread once the message is durable, before `enqueue` returns;
        it may have to wait for `write` to return."""


# -- the spool -----------------------------------------------------------------------------------


class Spool:
    def __init__(
        self,
        root: Path,
        encryption_key: bytes | None = None,
        *,
        faults: SpoolFaults | None = None,
        clock: Callable[[], float] = time.time,
        workers: int = 32,
        removal_delay: float | None = None,
    ) -> None:
        self.root = Path(root)
        # None: `finish` fsyncs the folder before it returns. Seconds: at the latest after
        # that long, usually with the next enqueue's fsync (see "Removal" above).
        self._removal_delay = removal_delay
        self._flush_lock = threading.Lock()
        self._flush_timer: threading.Timer | None = None
        self.stats = SpoolStats()
        self._codec = _Codec(encryption_key)
        self._faults = faults or SpoolFaults()
        self._clock = clock
        self._workers = workers
        self._executor: ThreadPoolExecutor | None = None
        # Plain strings for the hot path: a pathlib join costs more than the syscall it names.
        self._folders = {name: os.path.join(self.root, name)
                         for name in (INCOMING, *LOCATIONS, STATE)}
        # Descriptors of the folders whose fsyncs are shared, open from the first fsync until
        # `close` (or until the spool is collected): one system call per fsync instead of
        # three, in threads that need the GIL back after each.
        self._folder_fds: dict[str, int] = {}
        weakref.finalize(self, _close_all, self._folder_fds)
        self._syncs = {name: GroupCommit(functools.partial(self._fsync_folder, name))
                       for name in (*LOCATIONS, STATE)}

    def _path(self, folder: str, name: str) -> str:
        return f"{self._folders[folder]}/{name}"

    def _fault(self, operation: Operation, path: str) -> None:
        if self._faults.hook is not None:
            self._faults.hook(operation, Path(path))

    # -- setup ---------------------------------------------------------------------------------

    def open(self) -> None:
        """Create the folders (0700) if they are missing, and make the ids this process makes
        from now on sort after every message already here (names only, no file opened: about
        50 ms per 100,000), which is what lets `enqueue` rename without looking first."""
        _close_all(self._folder_fds)  # a folder created anew is not the one they name
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        for name in (INCOMING, *LOCATIONS, STATE):
            (self.root / name).mkdir(mode=0o700, exist_ok=True)
        self._fsync_dir(self.root)
        _ids_after(name.partition(".")[0]
                   for folder in (*LOCATIONS, STATE) for name in _names(self.root / folder))

    def clear_incoming(self) -> None:
        """At start, before anything new is written there: a file still in incoming/ was never
        renamed into active/, and the 250 is sent only after that rename is fsync'ed, so its
        sender got no 250 and will send again; it must not be taken for one of ours."""
        incoming = self.root / INCOMING
        for name in _names(incoming):
            _unlink(incoming / name)

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        with self._flush_lock:
            if self._flush_timer is not None:
                self._flush_timer.cancel()
                self._flush_timer = None
        self._flush_removals(again=False)
        _close_all(self._folder_fds)

    @staticmethod
    def new_queue_id() -> str:
        """17 characters: 11 of microseconds (strictly increasing in this process), 6 random
        (unique across processes); uppercase base32, sortable, safe as a file name."""
        global _last_micros
        with _id_lock:
            _last_micros = max(time.time_ns() // 1000, _last_micros + 1)
            micros = _last_micros
        bits = int.from_bytes(os.urandom(4), "big")
        suffix = "".join(_ALPHABET[(bits >> shift) & 31] for shift in (25, 20, 15, 10, 5, 0))
        return _micros_to_id(micros) + suffix

    # -- enqueue (the hot path) ----------------------------------------------------------------

    async def enqueue(self, envelope: Envelope, message: bytes,
                      alongside: Alongside | None = None) -> None:
        """Make the message durable; when this returns, a 250 may be sent.

        One worker thread does it all (steps 1 to 3), so a message costs one hop off the event
        loop; concurrent enqueues share the fsync of active/. `alongside`, if given, is run by
        that same thread (see `Alongside`): the accept stage writes and fsyncs the `received`
        audit record there, so the whole commit before a 250 is one hop. Storage failures
        raise TemporaryFailure (451 4.3.0) and leave nothing behind."""
        queue_id = envelope.queue_id
        if not QUEUE_ID.fullmatch(queue_id):
            raise ValueError(f"invalid queue id {queue_id!r}")
        work = self._in_thread(self._enqueue, envelope, message, alongside)
        if alongside is not None:
            alongside.write()
        try:
            await asyncio.shield(work)
        except asyncio.CancelledError:
            # The session went away: no 250 will be sent. Let the writing thread finish, then
            # remove the message, or it would sit unscheduled until the next restart.
            work.add_done_callback(functools.partial(self._abandoned, queue_id))
            raise
        except OSError as exc:
            raise TemporaryFailure(
                "Requested action aborted: local storage problem, try again later",
                enhanced="4.3.0", smtp_code=451, reason=Reason.SPOOL_UNAVAILABLE,
                detail=str(exc),
            ) from exc

    def _enqueue(self, envelope: Envelope, message: bytes,
                 alongside: Alongside | None) -> None:
        """Steps 1 to 3 and `alongside` (in a worker thread); nothing is left behind on
        failure."""
        queue_id = envelope.queue_id
        try:
            header = self._codec.header(QUEUE_MAGIC)
            aad = functools.partial(self._codec.aad, header, queue_id=queue_id)
            pieces = [header, *self._codec.seal(envelope.to_json(), aad("envelope")),
                      *self._codec.seal(message, aad("message"))]
            incoming = self._path(INCOMING, queue_id)
            self._write_file(incoming, pieces)
            target = self._path("active", queue_id)
            try:
                # No check that the name is free (rename(2) would replace a file silently): ids
                # are unique by construction, strictly increasing in this process and after
                # every id found at recovery (`_ids_after`).
                self._fault("rename", target)
                os.rename(incoming, target)
            except BaseException:
                self._remove([incoming])
                raise
            self.stats.add("published")
            try:
                self._syncs["active"].sync()
            except BaseException:
                # Not durable either way: the disk is failing (at worst a duplicate of the
                # peer's retry, if this removal is lost and the file comes back).
                self._remove([target])
                raise
        except BaseException:
            self.stats.add("enqueue_failures")
            raise
        self.stats.add("enqueued")
        if alongside is not None:
            try:
                alongside.sync()
            except BaseException:
                # Durable, but no 250 will follow: take it back out as `withdraw` does.
                try:
                    self._remove_message(queue_id, ("active",))
                except OSError as exc:
                    log.error("%s: could not remove a message refused after it was spooled: "
                              "%s; the next start delivers it", queue_id, exc)
                raise

    def _state_pieces(self, queue_id: str, state: DeliveryState) -> list[bytes]:
        header = self._codec.header(STATE_MAGIC)
        return [header, *self._codec.seal(state.to_json(),
                                          self._codec.aad(header, "state", queue_id))]

    def _write_file(self, path: str, pieces: Sequence[bytes]) -> None:
        """Create `path` (it must not exist), write `pieces` with one writev and fsync it; on
        failure the file is removed again."""
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            try:
                self._fault("write", path)
                _write_all(fd, pieces)
                self._fault("fsync", path)
                os.fsync(fd)
                self.stats.add("file_fsyncs")
            finally:
                os.close(fd)
        except BaseException:
            self._remove([path])
            raise

    def _abandoned(self, queue_id: str, work: asyncio.Future[None]) -> None:
        if work.cancelled() or work.exception() is not None:
            return
        # Removed as `withdraw` removes, durably: otherwise a crash could bring the message
        # back and deliver it besides the copy the peer sends again.
        removal = self._in_thread(self._remove_message, queue_id, ("active",))
        removal.add_done_callback(functools.partial(self._abandoned_removed, queue_id))

    @staticmethod
    def _abandoned_removed(queue_id: str, removal: asyncio.Future[None]) -> None:
        if not removal.cancelled() and removal.exception() is not None:
            log.error("%s: could not remove a message whose session ended before its 250: %s; "
                      "the next start delivers it", queue_id, removal.exception())

    @staticmethod
    def _remove(paths: Iterable[str | Path]) -> None:
        for path in paths:
            try:
                _unlink(path)
            except OSError as exc:
                log.error("could not remove %s after a failed enqueue: %s", path, exc)

    def _in_thread(self, function: Callable[..., T], *args: object) -> asyncio.Future[T]:
        # A pool of our own: fsyncs of concurrent sessions run side by side (the journal merges
        # them) and cannot starve the default executor that other stages use.
        if self._executor is None:
            self._executor = ThreadPoolExecutor(self._workers, thread_name_prefix="spool")
        return asyncio.get_running_loop().run_in_executor(self._executor, function, *args)

    def _fsync_folder(self, name: str) -> None:
        """fsync one of the spool's folders through its long-lived descriptor (`GroupCommit`
        runs one at a time per folder, so the descriptor is opened once)."""
        path = self._folders[name]
        self._fault("fsync_dir", path)
        fd = self._folder_fds.get(name)
        if fd is None:
            fd = self._folder_fds[name] = os.open(path, os.O_RDONLY | os.O_DIRECTORY
                                                  | os.O_CLOEXEC)
        os.fsync(fd)
        self.stats.add("dir_fsyncs")

    def _fsync_dir(self, path: str | Path) -> None:
        self._fault("fsync_dir", os.fspath(path))
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        self.stats.add("dir_fsyncs")

    # -- reading -------------------------------------------------------------------------------

    def locate(self, queue_id: str) -> Location | None:
        """Which folder holds the message now, or None."""
        if not QUEUE_ID.fullmatch(queue_id):
            return None
        # Two passes: a message moved between folders while we looked is found on the second.
        for _ in range(2):
            for location in LOCATIONS:
                if os.path.lexists(self._path(location, queue_id)):
                    return location
        return None

    def load(self, queue_id: str) -> tuple[Envelope, bytes]:
        """The envelope and message bytes; CorruptQueueFile when they cannot be read back."""
        _location, envelope, message = self._open_queue_file(queue_id, with_message=True)
        assert message is not None
        return envelope, message

    def load_with_state(self, queue_id: str) -> tuple[Envelope, bytes, DeliveryState]:
        """`load` and `read_state` at once, reading the queue file once (one worker-thread hop
        for the caller instead of two); the same errors as they raise."""
        _location, envelope, message = self._open_queue_file(queue_id, with_message=True)
        assert message is not None
        try:
            state = self._read_state_file(queue_id)
        except FileNotFoundError:
            state = DeliveryState.initial(envelope)  # no attempt has changed it yet
        except _Unreadable as exc:
            raise CorruptQueueFile(queue_id, f"state file: {exc}") from None
        return envelope, message, state

    def read_state(self, queue_id: str) -> DeliveryState:
        try:
            return self._read_state_file(queue_id)
        except FileNotFoundError:
            pass
        except _Unreadable as exc:
            raise CorruptQueueFile(queue_id, f"state file: {exc}") from None
        # No state file: no attempt has changed the initial state yet.
        _location, envelope, _ = self._open_queue_file(queue_id, with_message=False)
        return DeliveryState.initial(envelope)

    def _open_queue_file(
        self, queue_id: str, *, with_message: bool
    ) -> tuple[Location, Envelope, bytes | None]:
        for _ in range(3):
            location = self.locate(queue_id)
            if location is None:
                break
            if location == "corrupt":
                raise CorruptQueueFile(queue_id, "the message was moved to corrupt/")
            try:
                envelope, message = self._read_queue_file(
                    self._path(location, queue_id), queue_id, with_message
                )
            except FileNotFoundError:
                continue  # moved by the server or an operator while we looked: look again
            except _Unreadable as exc:
                raise CorruptQueueFile(queue_id, str(exc)) from None
            return location, envelope, message
        raise NoSuchMessage(f"no message {queue_id} in the spool")

    def _read_queue_file(
        self, path: str | Path, queue_id: str, with_message: bool
    ) -> tuple[Envelope, bytes | None]:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            header = self._codec.check_header(f.read(_HEADER.size), QUEUE_MAGIC)
            aad = functools.partial(self._codec.aad, header, queue_id=queue_id)
            envelope = _parse_envelope(
                self._codec.read(f, size - f.tell(), aad("envelope"), "envelope"), queue_id
            )
            message: bytes | None = None
            if with_message:
                message = self._codec.read(f, size - f.tell(), aad("message"), "message")
            else:
                # Framing only: a truncated file is caught at recovery without decrypting
                # 25 MiB; damage inside the body is caught by `load`.
                self._codec.skip(f, size - f.tell(), "message")
            if f.tell() != size:
                raise _Unreadable("unexpected bytes after the message record")
        return envelope, message

    def _read_state_file(self, queue_id: str) -> DeliveryState:
        with open(self._path(STATE, f"{queue_id}.state"), "rb") as f:
            size = os.fstat(f.fileno()).st_size
            header = self._codec.check_header(f.read(_HEADER.size), STATE_MAGIC)
            data = self._codec.read(f, size - f.tell(), self._codec.aad(header, "state", queue_id),
                                    "state")
            if f.tell() != size:
                raise _Unreadable("unexpected bytes after the state record")
        return _parse_state(data)

    def entries(self, locations: Iterable[Location] = LOCATIONS) -> Iterator[QueueEntry]:
        """Read-only listing for the queue tools; safe while the server runs (a message that
        moves or leaves during the listing may be skipped, never raises)."""
        for location in locations:
            try:
                names = sorted(os.listdir(self.root / location))
            except FileNotFoundError:
                continue
            for name in names:
                if not QUEUE_ID.fullmatch(name):
                    continue
                if location == "corrupt":
                    yield QueueEntry(name, location, None, None)
                    continue
                entry = self._entry(location, name)
                if entry is not None:
                    yield entry

    def _entry(self, location: Location, queue_id: str) -> QueueEntry | None:
        try:
            envelope, _ = self._read_queue_file(self.root / location / queue_id, queue_id, False)
        except FileNotFoundError:
            return None
        except _Unreadable:
            return QueueEntry(queue_id, location, None, None)
        try:
            state: DeliveryState | None = self._read_state_file(queue_id)
        except FileNotFoundError:
            state = DeliveryState.initial(envelope)
        except _Unreadable:
            state = None
        return QueueEntry(queue_id, location, envelope, state)

    # -- recovery ------------------------------------------------------------------------------

    def recover(self) -> list[QueueEntry]:
        """At start: clear incoming/, check every active and deferred message, move the
        unreadable ones to corrupt/, and return the rest for scheduling. Never raises for a
        bad file."""
        self.open()
        self.clear_incoming()
        found: list[QueueEntry] = []
        for location in ("active", "deferred"):
            for name in sorted(os.listdir(self.root / location)):
                if not QUEUE_ID.fullmatch(name):
                    log.warning("ignoring %s in the spool: not a queue file name",
                                self.root / location / name)
                    continue
                entry = self._recover_one(location, name)
                if entry is not None:
                    found.append(entry)
        for name in os.listdir(self.root / STATE):
            # The queue file was finished or deleted and the crash came before its state file
            # went: the state file is an orphan.
            queue_id = name.removesuffix(".state")
            if name.endswith(".state") and self.locate(queue_id) in (None, "corrupt"):
                _unlink(self.root / STATE / name)
        return found

    def _recover_one(self, location: Location, queue_id: str) -> QueueEntry | None:
        try:
            envelope, _ = self._read_queue_file(self.root / location / queue_id, queue_id, False)
            try:
                state = self._read_state_file(queue_id)
            except FileNotFoundError:
                state = DeliveryState.initial(envelope)
            except _Unreadable as exc:
                raise _Unreadable(f"state file: {exc}") from None
            if sorted(r.address for r in state.recipients) != sorted(
                r.address for r in envelope.recipients
            ):
                raise _Unreadable("the state file does not list the envelope's recipients")
        except FileNotFoundError:
            return None
        except _Unreadable as exc:
            self.quarantine(queue_id, str(exc))
            return None
        except OSError as exc:
            # An I/O error is not proof of corruption: leave the file where it is.
            log.error("cannot read %s: %s; it stays in %s/", queue_id, exc, location)
            return None
        return QueueEntry(queue_id, location, envelope, state)

    # -- changes (server and operator tools) ---------------------------------------------------

    def write_state(self, queue_id: str, state: DeliveryState) -> Location | None:
        """Replace the delivery state atomically, then file the message by it: active/ if some
        unfinished recipient is pending or due now, deferred/ if all wait for a retry (a held
        message stays in hold/; a finished one stays put until `finish`). Returns where the
        message is, or None if it is gone (nothing is written then)."""
        location = self.locate(queue_id)
        if location is None or location == "corrupt":
            return None
        self._replace_state(queue_id, state)
        if self.locate(queue_id) in (None, "corrupt"):
            # Deleted or quarantined while we wrote: leave no state file without its message.
            _unlink(self._path(STATE, f"{queue_id}.state"))
            return None
        if location in ("active", "deferred") and not state.done:
            target = self._filing(state)
            if target != location:
                # Renamed from where we found it: if an operator held or deleted it meanwhile,
                # the rename fails and nothing is brought back. No directory fsync: a move
                # between active/ and deferred/ lost in a crash leaves the message in the other
                # one, which recovery scans too.
                try:
                    os.rename(self._path(location, queue_id), self._path(target, queue_id))
                    location = target
                except FileNotFoundError:
                    return self.locate(queue_id)
        return location

    def _filing(self, state: DeliveryState) -> Location:
        now = self._clock()
        for r in state.recipients:
            if not r.status.final and (r.status is Status.PENDING or r.next_attempt <= now):
                return "active"
        return "deferred"

    def _replace_state(self, queue_id: str, state: DeliveryState) -> None:
        temporary = self._path(INCOMING, f"{queue_id}.state.{secrets.token_hex(4)}.tmp")
        self._write_file(temporary, self._state_pieces(queue_id, state))
        try:
            self._fault("rename", temporary)
            os.rename(temporary, self._path(STATE, f"{queue_id}.state"))
        except BaseException:
            self._remove([temporary])
            raise
        self._syncs[STATE].sync()

    def finish(self, queue_id: str) -> None:
        """Every recipient is final: remove the message, durably. Idempotent, and calling it
        again after it raised completes the removal (the queue manager does so until it
        succeeds). Thread-safe: concurrent calls from worker threads share the fsync of the
        folder. With `removal_delay`, the fsync of the folder and the removal of the state file
        come later (see "Removal" above)."""
        where: tuple[Location, ...] = ("active", "deferred", "hold")
        if self._removal_delay is None:
            self._remove_message(queue_id, where)
            return
        removed = self._unlink_queue_file(queue_id, where)
        if removed is None:
            # Gone already: an earlier call may have failed before its fsync; make sure.
            self._remove_message(queue_id, where)
            return
        self.stats.add("removed")
        self._syncs[removed].later(functools.partial(self._drop_state, queue_id))
        self._arm_flush()

    def _drop_state(self, queue_id: str) -> None:
        """The queue file's removal is durable: its state file may go (no fsync of state/)."""
        state = self._path(STATE, f"{queue_id}.state")
        try:
            self._fault("unlink", state)
            _unlink(state)
        except OSError as exc:
            log.error("%s: could not remove the state file of a finished message: %s; "
                      "the next start removes it", queue_id, exc)

    def _arm_flush(self) -> None:
        with self._flush_lock:
            if self._flush_timer is not None:
                return
            assert self._removal_delay is not None
            timer = threading.Timer(self._removal_delay, self._flush_removals)
            timer.daemon = True
            self._flush_timer = timer
        timer.start()

    def _flush_removals(self, again: bool = True) -> None:
        """fsync the folders that removals wait for and no enqueue has fsync'ed meanwhile."""
        with self._flush_lock:
            self._flush_timer = None
        for name, commit in self._syncs.items():
            if commit.pending():
                try:
                    commit.sync()
                except OSError as exc:
                    log.error("the fsync of %s/ failed (%s); finished messages removed since "
                              "the last one may be delivered again after a crash", name, exc)
        if again and any(commit.pending() for commit in self._syncs.values()):
            self._arm_flush()  # a failed fsync, or removals that came meanwhile

    async def withdraw(self, queue_id: str) -> None:
        """Take back a message that `enqueue` made durable but whose 250 was never sent (the
        accept stage failed after the spool write, e.g. its audit record could not be
        written): the peer gets a 4xx and sends it again, so this copy must never be
        delivered. The queue manager must not have been told about it (`accepted`).

        Durable like `finish`: the removal is fsync'ed (the queue folder) before this
        returns. When the disk refuses, raises TemporaryFailure (451 4.3.0) and the
        message may stay in active/: nothing schedules it now, the next start recovers and
        delivers it, a duplicate of the peer's retry but never a loss. Idempotent."""
        if not QUEUE_ID.fullmatch(queue_id):
            raise ValueError(f"invalid queue id {queue_id!r}")
        work = self._in_thread(self._remove_message, queue_id, ("active", "deferred", "hold"))
        try:
            # shield: a session cancelled now must not leave the message half withdrawn.
            await asyncio.shield(work)
        except OSError as exc:
            raise TemporaryFailure(
                "Requested action aborted: local storage problem, try again later",
                enhanced="4.3.0", smtp_code=451, reason=Reason.SPOOL_UNAVAILABLE,
                detail=f"withdrawing {queue_id} failed: {exc}",
            ) from exc

    def _remove_message(self, queue_id: str, where: tuple[Location, ...]) -> None:
        removed = self._unlink_queue_file(queue_id, where)
        # Durable removal: otherwise a crash could deliver the message a second time. Nothing
        # found: an earlier call may have removed it and failed before its fsync, so those
        # folders are fsync'ed anyway.
        for location in (removed,) if removed is not None else where:
            self._syncs[location].sync()
        if removed is not None:
            self.stats.add("removed")
        # The state file last, and without an fsync of state/: a crash can bring back only an
        # orphan, which recovery removes, never a queue file without its state (which would
        # be sent again to recipients already done).
        state = self._path(STATE, f"{queue_id}.state")
        self._fault("unlink", state)
        _unlink(state)

    def quarantine(self, queue_id: str, why: str) -> None:
        """Move an unreadable message to corrupt/ with a `.why` note; it is never deleted
        automatically."""
        location = self.locate(queue_id)
        if location is None or location == "corrupt":
            return
        corrupt = self.root / "corrupt"
        corrupt.mkdir(mode=0o700, exist_ok=True)
        try:
            os.rename(self.root / location / queue_id, corrupt / queue_id)
        except FileNotFoundError:
            return
        with contextlib.suppress(FileNotFoundError):
            os.rename(self.root / STATE / f"{queue_id}.state", corrupt / f"{queue_id}.state")
        stamp = dt.datetime.fromtimestamp(self._clock(), dt.UTC).isoformat(timespec="seconds")
        note = f"{stamp} moved from {location}/: {why}\n".encode()
        fd = os.open(corrupt / f"{queue_id}.why", os.O_WRONLY | os.O_CREAT | os.O_TRUNC
                     | os.O_CLOEXEC, 0o600)
        try:
            _write_all(fd, [note])
            os.fsync(fd)
        finally:
            os.close(fd)
        self._fsync_dir(corrupt)
        self.stats.add("quarantined")
        log.error("queue file %s moved to corrupt/: %s", queue_id, why)

    def hold(self, queue_id: str) -> None:
        """Put the message on hold: the server stops trying it until `release`."""
        self._move(queue_id, ("active", "deferred"), "hold")

    def release(self, queue_id: str) -> None:
        """Back from hold to active/, due now for every unfinished recipient."""
        if self.locate(queue_id) != "hold":
            raise SpoolError(f"message {queue_id} is not on hold")
        state = self.read_state(queue_id)
        now = self._clock()
        for r in state.recipients:
            if not r.status.final:
                state = state.update(r.address, next_attempt=now)
        # Written while still in hold/, where the server does not touch it.
        self._replace_state(queue_id, state)
        self._move(queue_id, ("hold",), "active")

    def delete(self, queue_id: str) -> None:
        """Remove the message wherever it is, corrupt/ included (an operator's decision)."""
        removed = self._unlink_queue_file(queue_id, LOCATIONS)
        if removed is None:
            raise NoSuchMessage(f"no message {queue_id} in the spool")
        _unlink(self.root / STATE / f"{queue_id}.state")
        if removed == "corrupt":
            _unlink(self.root / "corrupt" / f"{queue_id}.state")
            _unlink(self.root / "corrupt" / f"{queue_id}.why")
        self._fsync_dir(self.root / removed)
        self._fsync_dir(self.root / STATE)

    def _move(self, queue_id: str, sources: tuple[Location, ...], target: Location) -> None:
        for _ in range(3):
            location = self.locate(queue_id)
            if location == target:
                return
            if location is None:
                raise NoSuchMessage(f"no message {queue_id} in the spool")
            if location not in sources:
                raise SpoolError(f"message {queue_id} is in {location}/, not in "
                                 f"{' or '.join(sources)}/")
            try:
                os.rename(self.root / location / queue_id, self.root / target / queue_id)
            except FileNotFoundError:
                continue  # the server moved it between active/ and deferred/: look again
            self._fsync_dir(self.root / target)
            self._fsync_dir(self.root / location)
            return
        raise SpoolError(f"message {queue_id} kept moving; try again")

    def _unlink_queue_file(self, queue_id: str, where: Iterable[Location]) -> Location | None:
        if not QUEUE_ID.fullmatch(queue_id):
            return None
        for _ in range(2):
            for location in where:
                path = self._path(location, queue_id)
                self._fault("unlink", path)
                if _unlink(path):
                    return location
        return None
