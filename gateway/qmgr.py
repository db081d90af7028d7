"""The queue manager: picks due messages from the spool, runs the pipeline, delivers, retries,
gives up, and queues DSNs (RFC 3461/3464), as Postfix's qmgr does for its queue.

A message leaves the spool only when every recipient is final (delivered or bounced). A DSN
is made durable in the spool before the recipients it reports are marked final in the state
file, so a crash at any point repeats work (at-least-once) but never loses a message or a
bounce.

Duplicates are kept rare by remembering outcomes in memory first. Once the next hop has
answered 250 (or a recipient has bounced), this process never tries that recipient again,
even when the spool then cannot record it (disk full, I/O error on the state file, the
removal of a finished message, or a DSN that cannot be queued): the outcome stays in
`unsaved`, later attempts of the message skip it, and the state write, the removal and the
owed DSNs are tried again every `persist_retry` seconds until the disk takes them. The audit
record and the metrics of an outcome are written once, when it happens, never on those
retries. What is only in memory does not survive the process: after a restart (or a kill) with
an outcome still unsaved, the spool's older state is what is recovered, and a recipient whose
next hop had said 250 is sent the message a second time (a duplicate, never a loss).

Retries follow `gateway.retry`: the n-th failed attempt waits the n-th interval of `schedule`,
the last interval repeats (DESIGN §10), and no attempt is put off past `give_up_after`; an
attempt that fails at or after it bounces the recipient with 5.4.7 "gave up after N days" and
an `expired` audit record. A temporary failure found while preparing the message (a stale CRL,
an overrun) defers like a temporary reply from the next hop.

Unwrap and wrap (`pipeline.prepare`) run on the crypto workers of `gateway.workers`: a bounded
pool of threads, and worker processes for S/MIME, OpenPGP and Apicrypt, each job under a
watchdog. A message whose preparation overruns `prepare_timeout`, or whose worker process
dies under it, is deferred with a reason; the pool replaces the worker.

A message this process has just made durable (`remember`: the accept stage's, or a DSN queued
here) is attempted the first time from memory, without reading back the queue file it has
just written; within `fresh_budget` bytes, past which it is read back like any other.

Operators' queue commands run in another process: they change the spool files and drop a
file named after the queue id in `<spool>/requests/`, which this loop polls every second.

Start-up does not wait for the spool (a backlog of 100,000 deferred messages takes seconds to
read): `prepare_recovery` only clears incoming/, which holds nothing that got a 250 and must be
empty before anything new is written there; the listeners open; then `recover_in_background`
reads active/ (first: what was due or in delivery) and deferred/ in a thread of its own, a chunk
at a time, handing each chunk to the event loop to schedule and pausing between chunks so that
it takes at most about `RECOVERY_SHARE` of the time and never keeps the interpreter lock from
the event loop for more than about `RECOVERY_SLICE`. Recovery reads
only what scheduling needs, each message's delivery state (its state file, or its envelope when
no attempt has written one yet); a message whose files turn out damaged later (a truncated body,
a state file that does not list the envelope's recipients) is moved to corrupt/ by its attempt.
Every message in active/ or deferred/ at start is scheduled once recovery reaches it; a message
is never scheduled later than its state says, because `schedule` only ever brings an attempt
forward, so recovery racing the messages that arrive meanwhile costs at most one attempt that
finds nothing due. Scheduling is a heap: what a message costs does not grow with the backlog.

The queue gauge (`gateway_queue_messages{state}`) follows each move this process makes, and is
recounted from the folders' listings (names only, no file opened), in a thread, at start, after
recovery, after operators' requests, on `request_recount` (a reload) and every `queue_recount`
seconds, which brings in the moves of other processes (`gateway queue hold|delete`).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import functools
import heapq
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adapters.base import Verdict
from gateway import dsn
from gateway.delivery import Outcome, Transport
from gateway.envelope import DeliveryState, Envelope, Peer, Recipient, RecipientState, Status
from gateway.errors import GatewayError, Reason, TemporaryFailure
from gateway.pipeline import Prepared, prepare
from gateway.runtime import Runtime
from gateway.spool import (
    LOCATIONS,
    QUEUE_ID,
    STATE,
    CorruptQueueFile,
    Location,
    NoSuchMessage,
    Spool,
)
from gateway.workers import NotReady, Overrun, WorkerLost, Workers

__all__ = [
    "FRESH_BUDGET",
    "PERSIST_RETRY",
    "PREPARE_TIMEOUT",
    "QUEUE_RECOUNT",
    "RECOVERY_CHUNK",
    "RECOVERY_SHARE",
    "QueueManager",
    "request_attention",
]

log = logging.getLogger("gateway.qmgr")

REQUESTS = "requests"

# How long one message's unwrap + wrap may take in a crypto worker. Far above what a 25 MiB
# message costs on a slow machine, so only a pathological input (or a wedged library) reaches
# it; the message is then deferred with a reason (see `_prepare`).
PREPARE_TIMEOUT = 120.0

# How soon to try again to record an outcome that the spool could not write (a full or failing
# disk): often enough to leave the spool soon after the disk is back, rarely enough not to
# flood the log while it is not.
PERSIST_RETRY = 30.0

# How many bytes of freshly accepted messages to keep in memory for their first attempt, which
# then need not read back what was just written. Past it, the first attempt reads the spool like
# any other (a burst of large messages does not grow the process).
FRESH_BUDGET = 64 * 1024 * 1024

# Background recovery: messages read per chunk handed to the event loop to schedule, the share
# of the time it may spend reading, and how long it reads before each pause (`_Pacer`).
RECOVERY_CHUNK = 128
RECOVERY_SHARE = 0.5
RECOVERY_SLICE = 0.0005

# How often the queue gauge is recounted from the spool's folders (about 50 ms of listing per
# 100,000 messages, in a thread): what other processes move shows within this time.
QUEUE_RECOUNT = 60.0

# How soon to look again at a message whose files could not be read for a reason other than
# damage (an I/O error is not proof of corruption).
READ_RETRY = 60.0


def request_attention(spool_root: Path, queue_id: str) -> None:
    """Ask a running server to look at `queue_id` now (used by `gateway queue retry|release`)."""
    folder = spool_root / REQUESTS
    folder.mkdir(mode=0o700, exist_ok=True)
    (folder / queue_id).touch()


class QueueManager:
    def __init__(
        self,
        spool: Spool,
        runtime: Callable[[], Runtime],
        transport: Transport,
        workers: Workers | None = None,
        events: Any = None,
        concurrency: int = 20,
        clock: Callable[[], float] = time.time,
        prepare_timeout: float = PREPARE_TIMEOUT,
        persist_retry: float = PERSIST_RETRY,
        fresh_budget: int = FRESH_BUDGET,
        queue_recount: float = QUEUE_RECOUNT,
        recovery_share: float = RECOVERY_SHARE,
    ) -> None:
        self.spool = spool
        self.runtime = runtime
        self.transport = transport
        # Where unwrap + wrap run (threads by default; the server adds worker processes).
        self.workers = workers or Workers()
        self.prepare_timeout = prepare_timeout
        self.persist_retry = persist_retry
        # Outcomes the spool could not record yet (full or failing disk), by queue id.
        self.unsaved: dict[str, _Unsaved] = {}
        # Messages accepted by this process and not attempted yet, as the spool holds them.
        self.fresh: dict[str, tuple[Envelope, bytes]] = {}
        self.fresh_budget = fresh_budget
        self._fresh_bytes = 0
        self.events = events
        self.clock = clock
        self.slots = asyncio.Semaphore(concurrency)
        self.heap: list[tuple[float, str]] = []
        self.scheduled: dict[str, float] = {}
        self.running: set[str] = set()
        self.tasks: set[asyncio.Task[None]] = set()
        self.wakeup = asyncio.Event()
        self.stopping = False
        self.idle = asyncio.Event()
        self.idle.set()
        self.queue_recount = queue_recount
        self.recovery_share = recovery_share
        self._recount_wanted = asyncio.Event()
        self._recount_lock = asyncio.Lock()
        self._halt = threading.Event()  # tells the recovery thread to stop
        self._recovery: threading.Thread | None = None

    # -- scheduling ---------------------------------------------------------------------------

    def schedule(self, queue_id: str, when: float | None = None) -> None:
        when = self.clock() if when is None else when
        current = self.scheduled.get(queue_id)
        if current is not None and current <= when:
            return
        self.scheduled[queue_id] = when
        heapq.heappush(self.heap, (when, queue_id))
        self.wakeup.set()

    def remember(self, envelope: Envelope, raw: bytes) -> None:
        """Keep a message just made durable in the spool for its first attempt (within
        `fresh_budget`): the bytes are those the spool holds, so reading them back would only
        cost a read, a decryption and a thread hop."""
        if self._fresh_bytes + len(raw) > self.fresh_budget or envelope.queue_id in self.fresh:
            return
        self.fresh[envelope.queue_id] = (envelope, raw)
        self._fresh_bytes += len(raw)

    def _take_fresh(self, queue_id: str) -> tuple[Envelope, bytes] | None:
        found = self.fresh.pop(queue_id, None)
        if found is not None:
            self._fresh_bytes -= len(found[1])
        return found

    def accepted(self, envelope: Envelope, message: bytes | None = None) -> None:
        """The accept stage made `envelope` durable in active/: count it, keep its bytes for
        the first attempt (`remember`), and schedule it now."""
        self._moved(None, "active")
        if message is not None:
            self.remember(envelope, message)
        self.schedule(envelope.queue_id)

    # -- recovery -----------------------------------------------------------------------------

    def prepare_recovery(self) -> None:
        """Before the listeners open: create the spool's folders and clear incoming/. A file
        left there never got a 250 (the 250 follows the rename out of it), and it must go
        before this process writes there, or it could be taken for one of ours."""
        self.spool.open()
        self.spool.clear_incoming()

    def recover(self) -> int:
        """Schedule everything the spool holds, at once and in this thread (a spool that is not
        being served yet: tools, tests). Returns how many messages were scheduled."""
        self.prepare_recovery()
        count = 0
        for chunk in self._recovered():
            self._schedule_all(chunk)
            count += len(chunk)
        return count

    async def recover_in_background(self) -> int:
        """Schedule everything active/ and deferred/ hold, read in a thread of this process's
        own while the event loop serves, as `recover` would (after `prepare_recovery`, which
        must run first). Returns how many messages were scheduled; cancelled by `stop`."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[int] = loop.create_future()
        thread = threading.Thread(target=self._recovery_thread, args=(loop, done),
                                  name="recovery", daemon=True)
        self._recovery = thread
        thread.start()
        try:
            return await done
        except asyncio.CancelledError:
            self._halt.set()
            raise

    def _recovery_thread(self, loop: asyncio.AbstractEventLoop,
                         done: asyncio.Future[int]) -> None:
        count = 0
        outcome: tuple[int | None, BaseException | None]
        try:
            for chunk in self._recovered(_Pacer(self.recovery_share, self._halt)):
                loop.call_soon_threadsafe(self._schedule_all, chunk)
                count += len(chunk)
            outcome = (count, None)
        except BaseException as error:  # handed to the awaiting task, which logs it
            outcome = (None, error)
        with contextlib.suppress(RuntimeError):  # the loop is closed: the gateway has stopped
            loop.call_soon_threadsafe(_resolve, done, *outcome)

    def _recovered(self, pace: Callable[[], None] | None = None,
                   ) -> Iterator[list[tuple[str, float]]]:
        """active/ then deferred/, oldest first, as chunks of (queue id, when due); read in the
        calling thread, calling `pace` after each message. Unreadable messages are moved to
        corrupt/ on the way; at the end, state files whose message is gone (a crash between
        the two removals of `finish`) are removed."""
        seen: set[str] = set()
        chunk: list[tuple[str, float]] = []
        for location in ("active", "deferred"):
            try:
                names = sorted(os.listdir(self.spool.root / location))
            except FileNotFoundError:
                continue
            for name in names:
                if self._halt.is_set():
                    return
                if not QUEUE_ID.fullmatch(name):
                    log.warning("ignoring %s in the spool: not a queue file name",
                                self.spool.root / location / name)
                    continue
                seen.add(name)
                due = self._due_at_start(name)
                if due is not None:
                    chunk.append((name, due))
                if len(chunk) >= RECOVERY_CHUNK:
                    yield chunk
                    chunk = []
                if pace is not None:
                    pace()
        if chunk:
            yield chunk
        self._remove_orphan_states(seen)

    def _due_at_start(self, queue_id: str) -> float | None:
        """When the message is due, from its delivery state; None if there is nothing to
        schedule (gone meanwhile, or moved to corrupt/ now)."""
        try:
            state = self.spool.read_state(queue_id)
        except NoSuchMessage:
            return None  # finished, deleted or held since the listing
        except CorruptQueueFile as error:
            self.spool.quarantine(queue_id, error.why)
            return None
        except OSError as error:
            # Not proof of damage: the message stays where it is and is looked at again.
            log.error("cannot read %s: %s; trying again in %gs", queue_id, error, READ_RETRY)
            return self.clock() + READ_RETRY
        due = state.next_attempt()
        return self.clock() if due is None else due  # all final: its attempt removes it

    def _remove_orphan_states(self, seen: set[str]) -> None:
        folder = self.spool.root / STATE
        try:
            names = os.listdir(folder)
        except FileNotFoundError:
            return
        for name in names:
            queue_id = name.removesuffix(".state")
            if not name.endswith(".state") or queue_id in seen:
                continue
            # Not seen by the listings: an orphan, unless its message arrived since (or was
            # held, or quarantined with its state file, which then is no longer here).
            if self.spool.locate(queue_id) in (None, "corrupt"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(folder / name)

    def _schedule_all(self, chunk: Sequence[tuple[str, float]]) -> None:
        for queue_id, due in chunk:
            self.schedule(queue_id, due)

    # -- the queue gauge ----------------------------------------------------------------------

    def _moved(self, source: str | None, target: str | None) -> None:
        if self.events is not None:
            self.events.queue_moved(source, target)

    def request_recount(self) -> None:
        """Recount the queue gauge soon (after a reload, an operator's request)."""
        self._recount_wanted.set()

    async def recount(self) -> None:
        """Set the queue gauge from the folders' listings, read in a thread."""
        if self.events is None:
            return
        async with self._recount_lock:
            self.events.queue_counting()
            try:
                counts = await asyncio.to_thread(self._count)
            except OSError as error:
                log.warning("could not count the spool's folders: %s", error)
                self.events.queue_counted(None)
                return
            except BaseException:
                self.events.queue_counted(None)
                raise
            self.events.queue_counted(counts)

    def _count(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for location in LOCATIONS:
            try:
                names = os.listdir(self.spool.root / location)
            except FileNotFoundError:
                names = []
            counts[location] = sum(1 for name in names if QUEUE_ID.fullmatch(name))
        return counts

    async def _recount_periodically(self) -> None:
        self._recount_wanted.set()  # once at start
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._recount_wanted.wait(), self.queue_recount)
            self._recount_wanted.clear()
            await self.recount()

    async def run(self) -> None:
        helpers = [asyncio.create_task(self._poll_requests()),
                   asyncio.create_task(self._recount_periodically())]
        try:
            while not self.stopping:
                now = self.clock()
                while self.heap and self.heap[0][0] <= now:
                    when, queue_id = heapq.heappop(self.heap)
                    if self.scheduled.get(queue_id) != when:
                        continue  # superseded by an earlier schedule
                    del self.scheduled[queue_id]
                    if queue_id in self.running:
                        self.schedule(queue_id, now + 1.0)
                        continue
                    await self.slots.acquire()
                    self.running.add(queue_id)
                    self.idle.clear()
                    task = asyncio.create_task(self._attempt(queue_id))
                    self.tasks.add(task)
                    task.add_done_callback(self._finished)
                delay = self.heap[0][0] - self.clock() if self.heap else 3600.0
                self.wakeup.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.wakeup.wait(), max(0.0, min(delay, 3600.0)))
        finally:
            for helper in helpers:
                helper.cancel()
            for helper in helpers:
                with contextlib.suppress(asyncio.CancelledError):
                    await helper

    def _finished(self, task: asyncio.Task[None]) -> None:
        self.tasks.discard(task)
        self.slots.release()
        if not self.tasks:
            self.idle.set()
        if not task.cancelled() and task.exception() is not None:
            log.error("delivery task failed", exc_info=task.exception())

    async def stop(self, grace: float = 30.0) -> None:
        """Stop starting attempts; let attempts in progress finish for up to `grace` seconds."""
        self.stopping = True
        self._halt.set()
        self.wakeup.set()
        recovery = self._recovery
        if recovery is not None and recovery.is_alive():
            # It checks `_halt` before each message: it ends once its current read returns.
            await asyncio.to_thread(recovery.join, grace)
        if self.tasks:
            _done, pending = await asyncio.wait(set(self.tasks), timeout=grace)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending)

    async def _poll_requests(self) -> None:
        folder = self.spool.root / REQUESTS
        while True:
            await asyncio.sleep(1.0)
            try:
                names = os.listdir(folder)
            except FileNotFoundError:
                continue
            for name in names:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(folder / name)
                self.schedule(name)
            if names:
                self.request_recount()  # a release or a retry moved a message

    # -- one attempt --------------------------------------------------------------------------

    async def _attempt(self, queue_id: str) -> None:
        try:
            await self.attempt(queue_id)
        except Exception:
            # The state file was not updated, so nothing is lost: look again in a minute.
            log.exception("%s: attempt failed; retrying in 60s", queue_id)
            self.schedule(queue_id, self.clock() + 60.0)
        finally:
            self.running.discard(queue_id)

    async def attempt(self, queue_id: str) -> None:
        """Try every due recipient of one message once."""
        fresh = self._take_fresh(queue_id)  # only ever for the first attempt
        location = self.spool.locate(queue_id)
        if location not in ("active", "deferred"):
            # Held, deleted or quarantined by an operator meanwhile (a held message keeps what
            # is unsaved: it applies again once released).
            if location is None and queue_id in self.unsaved:
                await self._forget(queue_id)
            elif location == "corrupt":
                self.unsaved.pop(queue_id, None)
            return
        try:
            if fresh is not None:
                # Nothing but this process has written its state yet: an operator's command
                # in between either moved the message (seen above) or asked for an attempt now.
                envelope, raw = fresh
                on_disk = DeliveryState.initial(envelope)
            else:
                envelope, raw, on_disk = await asyncio.to_thread(self._read, queue_id)
                if sorted(r.address for r in on_disk.recipients) != sorted(
                    r.address for r in envelope.recipients
                ):
                    raise CorruptQueueFile(
                        queue_id, "the state file does not list the envelope's recipients")
        except CorruptQueueFile as error:
            log.error("queue file %s is unreadable, moved to corrupt/: %s", queue_id, error)
            await asyncio.to_thread(self.spool.quarantine, queue_id, str(error))
            self._moved(location, "corrupt")
            self.unsaved.pop(queue_id, None)
            return
        state = self._known(queue_id, on_disk)
        now = self.clock()
        due = tuple(
            r for r in envelope.recipients
            if not state.get(r.address).status.final and state.get(r.address).next_attempt <= now
        )
        runtime = self.runtime()
        if not due:
            if queue_id in self.unsaved:
                await self._settle(runtime, envelope, raw, on_disk, state, location)
                return
            upcoming = state.next_attempt()
            if upcoming is None:
                await asyncio.to_thread(self.spool.finish, queue_id)
                self._moved(location, None)
            else:
                self.schedule(queue_id, upcoming)
            return
        moment = dt.datetime.fromtimestamp(now, dt.UTC)
        prepared = await self._prepare(runtime, envelope, raw, due, moment)
        if self.events is not None:
            self.events.unwrapped(envelope, prepared)
        outcomes = [self._failure_outcome(a, e) for a, e in prepared.failed.items()]
        sends = []
        for batch in prepared.batches:
            # A recipient that prepare failed is never sent, even if a batch lists it too.
            recipients = tuple(r for r in batch.recipients if r.address not in prepared.failed)
            if len(recipients) != len(batch.recipients):
                log.error("%s: a batch for %s lists recipients that failed; not sent to them",
                          queue_id, batch.network.name)
            sends.append(self.transport.send(
                batch.network, envelope.sender, recipients, batch.content,
                envid=envelope.envid, ret=envelope.ret,
            ))
        for result in await asyncio.gather(*sends):
            outcomes.extend(result)
        await self._record(runtime, envelope, raw, on_disk, state, due,
                           _one_per_recipient(queue_id, due, outcomes), now, location)

    def _read(self, queue_id: str) -> tuple[Envelope, bytes, DeliveryState]:
        envelope, raw = self.spool.load(queue_id)
        return envelope, raw, self.spool.read_state(queue_id)

    def _known(self, queue_id: str, on_disk: DeliveryState) -> DeliveryState:
        """The state as this process knows it: the spool's, plus what could not be saved."""
        unsaved = self.unsaved.get(queue_id)
        if unsaved is None:
            return on_disk
        if on_disk == unsaved.base:
            return unsaved.state
        # Someone else wrote the state meanwhile (an operator's retry or release): theirs,
        # except that a final outcome stays final.
        state = on_disk
        for known in unsaved.state.recipients:
            if known.status.final:
                state = state.update(known.address, **_fields(known))
        return state

    async def _forget(self, queue_id: str) -> None:
        """The message left the spool while an outcome was unsaved: either an operator deleted
        it, or our own removal went through without its directory fsync. `finish` is
        idempotent and makes such a removal durable."""
        try:
            await asyncio.to_thread(self.spool.finish, queue_id)
        except OSError as error:
            log.error("%s: removal from the spool not yet durable (%s); trying again in %gs",
                      queue_id, error, self.persist_retry)
            self.schedule(queue_id, self.clock() + self.persist_retry)
            return
        self.unsaved.pop(queue_id, None)

    async def _prepare(
        self, runtime: Runtime, envelope: Envelope, raw: bytes, due: Sequence[Recipient],
        moment: dt.datetime,
    ) -> Prepared:
        """Run `pipeline.prepare` (unwrap + wrap, CPU-bound) on the crypto workers, bounded in
        time: a message that overruns `prepare_timeout` once a worker has it, or whose worker
        process dies under it, is deferred with a reason; the workers replace that worker
        (`gateway.workers`). A message that does so on every attempt is retried on the schedule
        and bounced at `give_up_after`."""
        workers = self.workers
        try:
            if workers.processes is not None and workers.wants_process(runtime, envelope, due):
                with contextlib.suppress(NotReady):  # then in a thread, as below
                    return await workers.processes.prepare(
                        self.prepare_timeout, runtime, envelope, raw, due, moment)
            return await workers.threads.run(
                self.prepare_timeout, functools.partial(prepare, runtime, envelope, raw, due,
                                                        moment))
        except Overrun:
            log.error("%s: unwrap/wrap overran %gs; deferred", envelope.queue_id,
                      self.prepare_timeout)
            error = TemporaryFailure(
                f"Processing this message took longer than {self.prepare_timeout:g} seconds; "
                f"it will be tried again later",
                enhanced="4.3.0", reason=Reason.INTERNAL,
                detail=f"unwrap/wrap overran {self.prepare_timeout:g}s",
            )
        except WorkerLost as lost:
            log.error("%s: the crypto worker stopped during unwrap/wrap (%s); deferred",
                      envelope.queue_id, lost)
            error = TemporaryFailure(
                "The gateway's worker processing this message stopped; it will be tried "
                "again later",
                enhanced="4.3.0", reason=Reason.INTERNAL, detail=f"crypto worker lost: {lost}",
            )
        return Prepared(Verdict.unsigned(), False, (), (), {r.address: error for r in due})

    @staticmethod
    def _failure_outcome(address: str, error: GatewayError) -> Outcome:
        # A TemporaryFailure defers whatever code it was given: a stale CRL, a key directory
        # being refreshed or an overrun will be fixed, so they must not bounce at once.
        temporary = isinstance(error, TemporaryFailure) or not error.permanent
        code, enhanced = error.smtp_code, error.enhanced
        klass = "4" if temporary else "5"
        if not str(code).startswith(klass):
            code = 451 if temporary else 554
        if not enhanced.startswith(klass + "."):
            enhanced = klass + enhanced[1:] if enhanced[1:2] == "." else f"{klass}.0.0"
        return Outcome(
            address=address,
            kind="deferred" if temporary else "bounced",
            code=code,
            enhanced=enhanced,
            text=error.advice,
            reason=error.reason,
        )

    async def _record(
        self, runtime: Runtime, envelope: Envelope, raw: bytes, on_disk: DeliveryState,
        state: DeliveryState, due: Sequence[Recipient], outcomes: Sequence[Outcome], now: float,
        location: Location | None,
    ) -> None:
        """Turn one attempt's outcomes into the new state, the DSNs owed, the audit records and
        metrics (once each), then save them (`_settle`)."""
        retry = runtime.config.gateway.retry
        deadline = envelope.received_at + retry.give_up_after
        expired = now >= deadline
        failed: list[_Row] = []
        delayed: list[_Row] = []
        succeeded: list[_Row] = []
        recipients = {r.address: r for r in due}
        for outcome in outcomes:
            current = state.get(outcome.address)
            attempts = current.attempts + 1
            reply = f"{outcome.code} {outcome.enhanced} {outcome.text}".strip()
            reason = outcome.reason.value if outcome.reason else ""
            if outcome.kind == "delivered":
                new = RecipientState(outcome.address, Status.DELIVERED, attempts, 0.0, reply,
                                     outcome.enhanced, "")
                succeeded.append((recipients[outcome.address], new, outcome))
            elif outcome.kind == "bounced" or expired:
                if outcome.kind != "bounced":
                    outcome = Outcome(
                        outcome.address, "bounced", 554, "5.4.7",
                        f"gave up after {_span(retry.give_up_after)} of failed attempts; "
                        f"last reply: {reply}",
                        Reason.GAVE_UP, outcome.remote_mta,
                    )
                    reason = Reason.GAVE_UP.value
                new = RecipientState(outcome.address, Status.BOUNCED, attempts, 0.0, reply,
                                     outcome.enhanced, reason)
                failed.append((recipients[outcome.address], new, outcome))
            else:
                # The last interval repeats; the last attempt falls on the give-up time rather
                # than up to one interval after it.
                new = RecipientState(
                    outcome.address, Status.DEFERRED, attempts,
                    min(now + retry.delay(attempts), deadline),
                    reply, outcome.enhanced, reason, current.delay_notified,
                )
                delayed.append((recipients[outcome.address], new, outcome))
            state = state.update(outcome.address, **_fields(new))

        # From here on this process never tries these recipients again, whatever happens to
        # the writes below: the outcome is known before the spool is asked to keep it.
        unsaved = self.unsaved.setdefault(envelope.queue_id, _Unsaved(on_disk, state))
        unsaved.base, unsaved.state = on_disk, state
        if envelope.sender:
            reports: tuple[tuple[list[_Row], dsn.Action, str], ...] = (
                (failed, "failed", "FAILURE"), (succeeded, "relayed", "SUCCESS"),
            )
            for rows, action, event in reports:
                wanted = tuple(row for row in rows if row[0].wants(event))
                if wanted:
                    unsaved.owed.append(_Notice(action, wanted, now))
            first_delays = tuple(
                row for row in delayed
                if not row[1].delay_notified and "DELAY" in row[0].notify
            )
            if first_delays:
                try:
                    await self._queue_dsn(runtime, envelope, raw, _Notice("delayed", first_delays,
                                                                          now))
                except (GatewayError, OSError) as error:
                    # Not owed like a bounce: the next deferral sends it.
                    log.error("%s: could not queue the delay DSN: %s", envelope.queue_id, error)
                else:
                    for recipient, _new, _outcome in first_delays:
                        state = state.update(recipient.address, delay_notified=True)
                    unsaved.state = state

        if self.events is not None:
            for _recipient, _new, outcome in succeeded + failed + delayed:
                try:
                    self.events.outcome(envelope, outcome)
                except Exception:
                    # Never again for this outcome (metrics and audit are once per outcome),
                    # and never a reason to send again: say so and carry on saving.
                    log.exception("%s: the %s outcome for <%s> could not be recorded",
                                  envelope.queue_id, outcome.kind, outcome.address)
        await self._settle(runtime, envelope, raw, on_disk, state, location)

    async def _settle(
        self, runtime: Runtime, envelope: Envelope, raw: bytes, on_disk: DeliveryState,
        state: DeliveryState, location: Location | None,
    ) -> None:
        """Queue the DSNs owed, then make the spool say what `state` says. Whatever fails stays
        in `unsaved` and is tried again every `persist_retry` seconds; meanwhile no recipient
        whose outcome is final here is tried again. `location`: where the attempt found the
        message, for the queue gauge."""
        queue_id = envelope.queue_id
        unsaved = self.unsaved.setdefault(queue_id, _Unsaved(on_disk, state))
        unsaved.base, unsaved.state = on_disk, state
        still_owed: list[_Notice] = []
        for notice in unsaved.owed:
            try:
                await self._queue_dsn(runtime, envelope, raw, notice)
            except (GatewayError, OSError) as error:
                log.error("%s: could not queue the %s DSN (%s); trying again in %gs",
                          queue_id, notice.action, error, self.persist_retry)
                still_owed.append(notice)
        unsaved.owed = still_owed
        # A recipient is final in the spool only once its DSN is: after a crash, one whose DSN
        # was never queued is tried again and reported then.
        saved = state
        for notice in still_owed:
            for recipient, _new, _outcome in notice.rows:
                saved = saved.update(recipient.address,
                                     **_fields(on_disk.get(recipient.address)))
        try:
            # Both fsync: off the event loop.
            if saved.done:
                await asyncio.to_thread(self.spool.finish, queue_id)
                self._moved(location, None)
            else:
                filed = await asyncio.to_thread(self.spool.write_state, queue_id, saved)
                self._moved(location, filed)
        except OSError as error:
            log.error("%s: the delivery state could not be saved (%s); kept in memory, trying "
                      "again in %gs", queue_id, error, self.persist_retry)
            self._again(queue_id, state)
            return
        if still_owed:
            unsaved.base = saved
            self._again(queue_id, state)
            return
        del self.unsaved[queue_id]
        upcoming = saved.next_attempt()
        if upcoming is not None:
            self.schedule(queue_id, upcoming)

    def _again(self, queue_id: str, state: DeliveryState) -> None:
        """Come back to save what is unsaved, or earlier if a recipient is due before that."""
        self.schedule(queue_id, self.clock() + self.persist_retry)
        upcoming = state.next_attempt()
        if upcoming is not None:
            self.schedule(queue_id, upcoming)

    async def _queue_dsn(
        self, runtime: Runtime, envelope: Envelope, raw: bytes, notice: _Notice,
    ) -> None:
        """Make one DSN durable in the spool and schedule it; raises if the spool cannot."""
        config = runtime.config
        network = config.network_for_domain(envelope.sender.rpartition("@")[2])
        if network is None:
            log.warning("%s: no network for the sender %s; DSN not sent",
                        envelope.queue_id, envelope.sender)
            return
        action = notice.action
        moment = dt.datetime.fromtimestamp(notice.at, dt.UTC)
        retry = config.gateway.retry
        reports = [
            dsn.RecipientReport(
                recipient=recipient,
                status=outcome.enhanced if action != "failed" or outcome.enhanced.startswith("5")
                else "5" + outcome.enhanced[1:],
                diagnostic=f"{outcome.code} {outcome.enhanced} {outcome.text}",
                remote_mta=outcome.remote_mta,
                last_attempt=moment,
                will_retry_until=dt.datetime.fromtimestamp(
                    envelope.received_at + retry.give_up_after, dt.UTC
                ) if action == "delayed" else None,
                advice=outcome.text,
            )
            for recipient, _state, outcome in notice.rows
        ]
        body = dsn.build_dsn(
            envelope=envelope,
            reports=reports,
            action=action,
            reporting_mta=config.gateway.hostname,
            original=raw,
            now=moment,
            random_token=secrets.token_hex(8),
        )
        notification = Envelope(
            queue_id=self.spool.new_queue_id(),
            sender="",
            recipients=(Recipient(envelope.sender, network.name, notify=("NEVER",)),),
            source_network=network.name,
            peer=Peer(address="127.0.0.1", helo=config.gateway.hostname),
            received_at=notice.at,
            size=len(body),
            message_id=None,
            generated=True,
        )
        await self.spool.enqueue(notification, body)
        self._moved(None, "active")
        if self.events is not None:
            self.events.dsn(envelope, notification, action)
        self.remember(notification, body)
        self.schedule(notification.queue_id)


class _Pacer:
    """Keeps the recovery thread to about `share` of the time, in slices of `RECOVERY_SLICE`.

    A thread that keeps the interpreter lock makes the event loop's thread wait up to the
    interpreter's switch interval (5 ms) each time it wants the lock back, which is after each
    wait for the network: that is what new mail would feel. Pausing after every short slice
    hands the lock over at once and bounds that wait to about one slice. A slice's time includes
    the waits for the lock while the loop had it, so a busy loop makes the pauses longer."""

    def __init__(self, share: float, halt: threading.Event) -> None:
        self.share = share
        self.halt = halt
        self.began = time.perf_counter()

    def __call__(self) -> None:
        spent = time.perf_counter() - self.began
        if spent >= RECOVERY_SLICE:
            self.halt.wait(spent * (1.0 - self.share) / self.share)
            self.began = time.perf_counter()


def _resolve(future: asyncio.Future[int], result: int | None,
             error: BaseException | None) -> None:
    if future.done():  # its task was cancelled
        return
    if error is not None:
        future.set_exception(error)
    else:
        assert result is not None
        future.set_result(result)


_Row = tuple[Recipient, RecipientState, Outcome]


@dataclass(frozen=True)
class _Notice:
    """A DSN decided by an attempt (RFC 3464 action, the recipients it reports, and when)."""

    action: dsn.Action
    rows: tuple[_Row, ...]
    at: float


@dataclass
class _Unsaved:
    """What this process knows about one message and its spool files do not say yet."""

    base: DeliveryState  # the spool's state when `state` was decided
    state: DeliveryState  # what the spool should say
    owed: list[_Notice] = field(default_factory=list)  # DSNs decided but not queued yet


def _one_per_recipient(
    queue_id: str, due: Sequence[Recipient], outcomes: Sequence[Outcome]
) -> list[Outcome]:
    """Exactly one outcome for each due recipient: a recipient nobody reported on is deferred
    (never left pending, which would be tried again at once, for ever), and one reported twice
    or not asked about is ignored."""
    wanted = {r.address for r in due}
    found: dict[str, Outcome] = {}
    for outcome in outcomes:
        if outcome.address not in wanted or outcome.address in found:
            log.error("%s: ignoring an unexpected outcome for <%s>", queue_id, outcome.address)
            continue
        found[outcome.address] = outcome
    for recipient in due:
        if recipient.address not in found:
            log.error("%s: no outcome for <%s>; deferred", queue_id, recipient.address)
            found[recipient.address] = Outcome(
                recipient.address, "deferred", 451, "4.3.0",
                "The gateway could not process the message for this recipient; it will try "
                "again.", Reason.INTERNAL,
            )
    return [found[r.address] for r in due]


def _span(seconds: float) -> str:
    """A duration as an operator writes it in a sentence: "5 days", "1.5 hours", "2 seconds"."""
    units = (("day", 86400.0), ("hour", 3600.0), ("minute", 60.0))
    unit, size = next(((u, s) for u, s in units if seconds >= s), ("second", 1.0))
    value = f"{round(seconds / size, 1):g}"
    return f"{value} {unit}" + ("" if value == "1" else "s")


def _fields(state: RecipientState) -> dict[str, Any]:
    return {
        "status": state.status,
        "attempts": state.attempts,
        "next_attempt": state.next_attempt,
        "last_reply": state.last_reply,
        "enhanced": state.enhanced,
        "reason": state.reason,
        "delay_notified": state.delay_notified,
    }
