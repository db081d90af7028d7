"""The queue manager: picks due messages from the spool, runs the pipeline, delivers, retries,
gives up, and queues DSNs (RFC 3461/3464), as Postfix's qmgr does for its queue.

A message leaves the spool only when every recipient is final (delivered or bounced). Each
attempt's outcome is written to the message's state file before anything else happens, and a
DSN is made durable in the spool before the recipients it reports are marked bounced, so a
crash at any point repeats work (at-least-once) but never loses a message or a bounce.

Operators' queue commands run in another process: they change the spool files and drop a
file named after the queue id in `<spool>/requests/`, which this loop polls every second.
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
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from adapters.base import Verdict
from gateway import dsn
from gateway.delivery import Outcome, Transport
from gateway.envelope import DeliveryState, Envelope, Peer, Recipient, RecipientState, Status
from gateway.errors import GatewayError, Reason, TemporaryFailure
from gateway.pipeline import Prepared, prepare
from gateway.runtime import Runtime
from gateway.spool import CorruptQueueFile, Spool

__all__ = ["PREPARE_TIMEOUT", "QueueManager", "request_attention"]

log = logging.getLogger("gateway.qmgr")

REQUESTS = "requests"

# How long one message's unwrap + wrap may take in a crypto worker. Far above what a 25 MiB
# message costs on a slow machine, so only a pathological input (or a wedged library) reaches
# it; the message is then deferred with a reason (see `_prepare`).
PREPARE_TIMEOUT = 120.0


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
        executor: Executor | None = None,
        events: Any = None,
        concurrency: int = 20,
        clock: Callable[[], float] = time.time,
        prepare_timeout: float = PREPARE_TIMEOUT,
    ) -> None:
        self.spool = spool
        self.runtime = runtime
        self.transport = transport
        self.executor = executor  # kept for callers; prepare runs on watched threads instead
        self.prepare_timeout = prepare_timeout
        # Crypto workers at once: the size of the pool the caller handed in, 4 otherwise.
        workers = executor._max_workers if isinstance(executor, ThreadPoolExecutor) else 4
        self.crypto_slots = asyncio.Semaphore(workers)
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

    # -- scheduling ---------------------------------------------------------------------------

    def schedule(self, queue_id: str, when: float | None = None) -> None:
        when = self.clock() if when is None else when
        current = self.scheduled.get(queue_id)
        if current is not None and current <= when:
            return
        self.scheduled[queue_id] = when
        heapq.heappush(self.heap, (when, queue_id))
        self.wakeup.set()

    def accepted(self, envelope: Envelope) -> None:
        """Called by the accept stage right after the 250."""
        if self.events is not None:
            self.events.received(envelope)
        self.schedule(envelope.queue_id)

    def recover(self) -> int:
        """Schedule everything the spool holds (at start, after a crash)."""
        count = 0
        for entry in self.spool.recover():
            if entry.location in ("active", "deferred"):
                due = entry.state.next_attempt() if entry.state is not None else None
                self.schedule(entry.queue_id, due if due is not None else self.clock())
                count += 1
        return count

    async def run(self) -> None:
        poller = asyncio.create_task(self._poll_requests())
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
            poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await poller

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
        self.wakeup.set()
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
        if self.spool.locate(queue_id) not in ("active", "deferred"):
            return  # held, deleted or quarantined by an operator meanwhile
        try:
            envelope, raw = await asyncio.to_thread(self.spool.load, queue_id)
            state = await asyncio.to_thread(self.spool.read_state, queue_id)
        except CorruptQueueFile as error:
            log.error("queue file %s is unreadable, moved to corrupt/: %s", queue_id, error)
            await asyncio.to_thread(self.spool.quarantine, queue_id, str(error))
            return
        now = self.clock()
        due = tuple(
            r for r in envelope.recipients
            if not state.get(r.address).status.final and state.get(r.address).next_attempt <= now
        )
        if not due:
            upcoming = state.next_attempt()
            if upcoming is None:
                await asyncio.to_thread(self.spool.finish, queue_id)
            else:
                self.schedule(queue_id, upcoming)
            return
        runtime = self.runtime()
        moment = dt.datetime.fromtimestamp(now, dt.UTC)
        prepared = await self._prepare(runtime, envelope, raw, due, moment)
        if self.events is not None:
            self.events.unwrapped(envelope, prepared)
        outcomes = [self._failure_outcome(a, e) for a, e in prepared.failed.items()]
        sends = [
            self.transport.send(
                batch.network, envelope.sender, batch.recipients, batch.content,
                envid=envelope.envid, ret=envelope.ret,
            )
            for batch in prepared.batches
        ]
        for result in await asyncio.gather(*sends):
            outcomes.extend(result)
        await self._record(runtime, envelope, raw, state, outcomes, now)

    async def _prepare(
        self, runtime: Runtime, envelope: Envelope, raw: bytes, due: Sequence[Recipient],
        moment: dt.datetime,
    ) -> Prepared:
        """Run `pipeline.prepare` (unwrap + wrap, CPU-bound) on a worker thread, bounded in
        time: a message that overruns `prepare_timeout` is deferred with a reason.

        Why a thread per message rather than a fixed pool: a Python thread cannot be stopped,
        so a worker wedged by a pathological input stays busy. In a pool, every message queued
        behind it would wait (and, with a few such inputs, the whole pool would be gone). Here
        `crypto_slots` bounds the workers running at once, an overrun gives its slot back, and
        the wedged thread is a daemon, so it never holds up a drain or the process exit. Each
        overrun costs one thread for as long as that call runs; a message that overruns on
        every attempt is retried on the schedule and bounced at `give_up_after`.
        """
        loop = asyncio.get_running_loop()
        done: asyncio.Future[Prepared] = loop.create_future()

        def settle(outcome: Callable[[], None]) -> None:
            if not done.done():  # else the attempt stopped waiting (overrun or shutdown)
                outcome()

        def work() -> None:
            try:
                result = prepare(runtime, envelope, raw, due, moment)
                outcome = functools.partial(done.set_result, result)
            except BaseException as raised:  # prepare catches Exception; this is the rest
                outcome = functools.partial(done.set_exception, raised)
            with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits any more
                loop.call_soon_threadsafe(settle, outcome)

        async with self.crypto_slots:
            threading.Thread(target=work, name=f"crypto-{envelope.queue_id}", daemon=True).start()
            try:
                return await asyncio.wait_for(done, self.prepare_timeout)
            except TimeoutError:
                pass
        log.error("%s: unwrap/wrap overran %gs; deferred", envelope.queue_id, self.prepare_timeout)
        error = TemporaryFailure(
            f"Processing this message took longer than {self.prepare_timeout:g} seconds; "
            f"it will be tried again later",
            enhanced="4.3.0", reason=Reason.INTERNAL,
            detail=f"unwrap/wrap overran {self.prepare_timeout:g}s",
        )
        return Prepared(Verdict.unsigned(), False, (), (), {r.address: error for r in due})

    @staticmethod
    def _failure_outcome(address: str, error: GatewayError) -> Outcome:
        return Outcome(
            address=address,
            kind="bounced" if error.permanent else "deferred",
            code=error.smtp_code,
            enhanced=error.enhanced,
            text=error.advice,
            reason=error.reason,
        )

    async def _record(
        self, runtime: Runtime, envelope: Envelope, raw: bytes, state: DeliveryState,
        outcomes: Sequence[Outcome], now: float,
    ) -> None:
        retry = runtime.config.gateway.retry
        expired = now - envelope.received_at >= retry.give_up_after
        failed: list[tuple[Recipient, RecipientState, Outcome]] = []
        delayed: list[tuple[Recipient, RecipientState, Outcome]] = []
        succeeded: list[tuple[Recipient, RecipientState, Outcome]] = []
        recipients = {r.address: r for r in envelope.recipients}
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
                    days = retry.give_up_after / 86400
                    outcome = Outcome(
                        outcome.address, "bounced", outcome.code, "5.4.7",
                        f"gave up after {days:g} days of failed attempts; last reply: {reply}",
                        Reason.GAVE_UP,
                    )
                    reason = Reason.GAVE_UP.value
                new = RecipientState(outcome.address, Status.BOUNCED, attempts, 0.0, reply,
                                     outcome.enhanced, reason)
                failed.append((recipients[outcome.address], new, outcome))
            else:
                new = RecipientState(
                    outcome.address, Status.DEFERRED, attempts, now + retry.delay(attempts),
                    reply, outcome.enhanced, reason, current.delay_notified,
                )
                delayed.append((recipients[outcome.address], new, outcome))
            state = state.update(outcome.address, **_fields(new))

        if envelope.sender:
            await self._notify(runtime, envelope, raw, failed, "failed", now, "FAILURE")
            await self._notify(runtime, envelope, raw, succeeded, "relayed", now, "SUCCESS")
            first_delays = [d for d in delayed if not d[1].delay_notified]
            sent = await self._notify(runtime, envelope, raw, first_delays, "delayed", now, "DELAY",
                                      explicit_only=True)
            for recipient in sent:
                state = state.update(recipient, delay_notified=True)

        if self.events is not None:
            for _recipient, _new, outcome in succeeded + failed + delayed:
                self.events.outcome(envelope, outcome)
        # Both fsync: off the event loop.
        if state.done:
            await asyncio.to_thread(self.spool.finish, envelope.queue_id)
        else:
            await asyncio.to_thread(self.spool.write_state, envelope.queue_id, state)
            upcoming = state.next_attempt()
            if upcoming is not None:
                self.schedule(envelope.queue_id, upcoming)

    async def _notify(
        self, runtime: Runtime, envelope: Envelope, raw: bytes,
        rows: Sequence[tuple[Recipient, RecipientState, Outcome]], action: str, now: float,
        event: str, explicit_only: bool = False,
    ) -> list[str]:
        """Queue one DSN for the rows whose NOTIFY asks for `event`; returns their addresses."""
        wanted = [
            row for row in rows
            if row[0].wants(event) and (not explicit_only or event in row[0].notify)
        ]
        if not wanted:
            return []
        config = runtime.config
        network = config.network_for_domain(envelope.sender.rpartition("@")[2])
        if network is None:
            log.warning("%s: no network for the sender %s; DSN not sent",
                        envelope.queue_id, envelope.sender)
            return []
        moment = dt.datetime.fromtimestamp(now, dt.UTC)
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
            for recipient, _state, outcome in wanted
        ]
        body = dsn.build_dsn(
            envelope=envelope,
            reports=reports,
            action=action,  # type: ignore[arg-type]
            reporting_mta=config.gateway.hostname,
            original=raw,
            now=moment,
            random_token=secrets.token_hex(8),
        )
        notice = Envelope(
            queue_id=self.spool.new_queue_id(),
            sender="",
            recipients=(Recipient(envelope.sender, network.name, notify=("NEVER",)),),
            source_network=network.name,
            peer=Peer(address="127.0.0.1", helo=config.gateway.hostname),
            received_at=now,
            size=len(body),
            message_id=None,
            generated=True,
        )
        try:
            await self.spool.enqueue(notice, body)
        except GatewayError as error:
            # The spool is unavailable: keep the recipients unresolved so the bounce is retried
            # rather than lost.
            log.error("%s: could not queue the DSN: %s", envelope.queue_id, error.detail)
            raise
        if self.events is not None:
            self.events.dsn(envelope, notice, action)
        self.schedule(notice.queue_id)
        return [recipient.address for recipient, _state, _outcome in wanted]


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
