"""`gateway serve`: one task group owns the listeners, the queue manager, the crypto workers and
the metrics endpoint.

Start-up does not wait for the spool: the listeners open (and new mail gets its 250, durably, as
always) as soon as incoming/ is cleared, and the messages already in the spool are recovered
and scheduled in the background (`QueueManager.recover_in_background`), however many there are.

SIGTERM drains: stop accepting, let SMTP sessions and deliveries in progress finish (bounded),
keep everything else in the spool. SIGHUP reloads routing.yaml and its files, applied only if
they check clean; sessions and deliveries in progress finish under the configuration they began
with, because each one holds the `Runtime` it started with.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import os
import signal
import ssl
import time
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509

from gateway.audit import AuditTrail
from gateway.config import Listener, NetworkSettings
from gateway.delivery import SmtpTransport, Transport, make_client_tls_context
from gateway.envelope import Envelope, Recipient
from gateway.events import Events
from gateway.http import MetricsServer
from gateway.inbound import Inbound
from gateway.peers import PeerTrust, check_next_hop
from gateway.qmgr import QUEUE_RECOUNT, QueueManager
from gateway.runtime import ConfigurationRefused, Runtime
from gateway.spool import Spool
from gateway.tls import server_context
from gateway.workers import ProcessWorkers, ThreadWorkers, Workers, default_process_count

__all__ = ["Gateway"]

log = logging.getLogger("gateway.server")

# How soon to try recovering the spool again when it could not be listed.
RECOVER_RETRY = 60.0

# Seconds a finished message's removal may wait for an fsync of its folder (`Spool`'s
# `removal_delay`): under load the next enqueue's fsync carries it. What it risks is a
# duplicate after a power cut within that second, never a loss; a kill -9 loses nothing.
REMOVAL_DELAY = 1.0


class Gateway:
    """The running relay. `start()` then `wait()`; `stop()` drains."""

    def __init__(self, config_path: Path, *, transport: Transport | None = None,
                 events: Events | None = None, workers: Workers | None = None,
                 queue_recount: float = QUEUE_RECOUNT) -> None:
        self.config_path = config_path
        self._runtime = Runtime.load(config_path)
        config = self._runtime.config
        key = None
        if config.gateway.spool.encryption_key is not None:
            key = config.gateway.spool.encryption_key.read_bytes()
        self.spool = Spool(config.gateway.spool.path, key, removal_delay=REMOVAL_DELAY)
        self.audit = AuditTrail(config.gateway.audit.path, config.gateway.audit.retention)
        self.events = events or Events(audit=self.audit)
        # By default S/MIME, OpenPGP and Apicrypt work in worker processes (out of the GIL,
        # beside the event loop), plain MIME in threads (cheaper than the copy to a process
        # and back); gateway.workers says otherwise. Read at start: a reload keeps the pool.
        chosen = config.gateway.workers
        self.workers = workers or Workers(
            ThreadWorkers(4), ProcessWorkers(chosen.count or default_process_count()),
            kind=chosen.kind,
        )
        self._own_transport = transport is None
        self.transport = transport or self._make_transport()
        self.qmgr = QueueManager(self.spool, self.runtime, self.transport, self.workers,
                                 events=self.events, queue_recount=queue_recount)
        self.inbound = Inbound(self.runtime, self.spool, self._accepted, events=self.events)
        self._tasks: list[asyncio.Task[None]] = []
        self._stopped = asyncio.Event()
        self._metrics_server: MetricsServer | None = None
        self.pidfile: Path | None = None

    def runtime(self) -> Runtime:
        return self._runtime

    def _accepted(self, envelope: Envelope, message: bytes | None = None) -> None:
        # The accept stage has already written the `received` record and made it durable, in
        # that order and before anything can deliver the message, so that a failure there can
        # still withdraw it: only the delivery is left to schedule before the 250. With the
        # message's bytes, the first attempt need not read them back from the spool.
        self.qmgr.accepted(envelope, message)

    def _make_transport(self) -> Transport:
        runtime = self._runtime
        config = runtime.config
        tls = config.gateway.tls
        context = make_client_tls_context(
            runtime.trust.anchors,
            tls.certificate if tls else None,
            tls.key if tls else None,
        )

        def peer_check(network: NetworkSettings, recipients: Sequence[Recipient],
                       certificate: x509.Certificate | None) -> None:
            # The running configuration at the time of sending, so that a reloaded whitelist
            # or CRL applies to deliveries from then on.
            current = self._runtime
            check_next_hop(network, recipients, certificate, whitelist=current.whitelist,
                           trust=PeerTrust(current.trust.anchors, current.trust.crls))

        return SmtpTransport(config.gateway.hostname, context, peer_check=peer_check)

    def _server_tls(self, listener: Listener) -> ssl.SSLContext | None:
        tls = self._runtime.config.gateway.tls
        if listener.tls == "none" or tls is None:
            return None
        return server_context(tls.certificate, tls.key, self._runtime.trust.anchors,
                              listener.client_certificate)

    async def start(self) -> None:
        self.audit.open()
        self.events.lifecycle("start", config=str(self.config_path))
        self.qmgr.prepare_recovery()  # before anything new is written to the spool
        config = self._runtime.config
        await self.inbound.start(config.gateway.listen, self._server_tls,
                                 config.gateway.max_message_size, config.gateway.hostname)
        self.workers.start(self._runtime)
        self._tasks.append(asyncio.create_task(self.qmgr.run()))
        self._tasks.append(asyncio.create_task(self._recover()))
        self.pidfile = config.gateway.spool.path / "passerelle.pid"
        self.pidfile.write_text(f"{os.getpid()}\n")
        self._update_gauges()
        if config.gateway.metrics is not None:
            self._metrics_server = MetricsServer(self.events.metrics.registry, self.health)
            await self._metrics_server.start(config.gateway.metrics.address,
                                             config.gateway.metrics.port)
        log.info("listening on %s", ", ".join(
            f"{listener.address}:{port}" for listener, port
            in zip(config.gateway.listen, self.inbound.ports(), strict=False)
        ))

    async def _recover(self) -> None:
        """The spool's messages, scheduled in the background; tried again if the spool cannot
        be listed (nothing is left unscheduled for good, and scheduling twice is harmless)."""
        while True:
            began = time.monotonic()
            try:
                recovered = await self.qmgr.recover_in_background()
            except Exception:
                log.exception("recovering the spool failed; trying again in %gs", RECOVER_RETRY)
                await asyncio.sleep(RECOVER_RETRY)
                continue
            if recovered and not self.qmgr.stopping:
                log.info("recovered %d message(s) from the spool in %.1fs", recovered,
                         time.monotonic() - began)
            self.qmgr.request_recount()  # with what recovery moved to corrupt/
            return

    def reload(self) -> bool:
        """Apply routing.yaml again if it checks clean; keep the old one otherwise."""
        try:
            runtime = Runtime.load(self.config_path, dt.datetime.now(dt.UTC))
        except ConfigurationRefused as error:
            log.error("reload refused, keeping the running configuration:\n%s", error)
            self.events.lifecycle("reload_refused", errors=str(error).count("\n") + 1)
            return False
        except Exception as error:
            log.error("reload failed, keeping the running configuration: %s", error)
            return False
        self._runtime = runtime
        # Worker processes load the new configuration before its first message needs it.
        self.workers.start(runtime)
        if self._own_transport:
            # New anchors or client certificate: new deliveries use a new transport; those in
            # progress finish on the old one, which is closed once they are done.
            old = self.transport
            self.transport = self._make_transport()
            self.qmgr.transport = self.transport
            close = getattr(old, "close", None)
            if close is not None:
                self._tasks.append(asyncio.ensure_future(close()))
        self._update_gauges()
        self.qmgr.request_recount()
        self.events.lifecycle("reload", config=str(self.config_path))
        return True

    def health(self) -> tuple[bool, str]:
        """Ready only when the listeners are bound, the spool and the audit trail take a write
        and have room for one message of the largest size accepted, and keys are loaded."""
        if not self.inbound.servers:
            return False, "listeners are not bound"
        runtime = self._runtime
        room = runtime.config.gateway.max_message_size
        for what, folder in (("spool", self.spool.root / "incoming"),
                             ("audit trail", self.audit.folder)):
            problem = _write_problem(folder, room)
            if problem:
                return False, f"the {what} cannot be written: {problem}"
        for network in runtime.config.networks.values():
            if network.identity and network.identity not in runtime.keyring.identities:
                return False, f"identity {network.identity} is not loaded"
        return True, "ready"

    def _update_gauges(self) -> None:
        """The identities' and CRLs' gauges (the queue gauge is the queue manager's)."""
        metrics = self.events.metrics
        for name, identity in self._runtime.keyring.identities.items():
            if identity.certificate is not None:
                expiry = identity.certificate.not_valid_after_utc.timestamp()
                metrics.certificate_expiry.labels(name).set(expiry)
        for index, crl in enumerate(self._runtime.trust.crls):
            if crl.next_update_utc is not None:
                label = crl.issuer.rfc4514_string() or str(index)
                metrics.crl_next_update.labels(label).set(crl.next_update_utc.timestamp())

    def install_signals(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, lambda: asyncio.ensure_future(self.stop()))
        loop.add_signal_handler(signal.SIGINT, lambda: asyncio.ensure_future(self.stop()))
        loop.add_signal_handler(signal.SIGHUP, self.reload)

    async def stop(self, grace: float = 30.0) -> None:
        if self._stopped.is_set():
            return
        log.info("draining: no new connections, finishing sessions and deliveries")
        await self.inbound.stop(grace)
        await self.qmgr.stop(grace)
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        close = getattr(self.transport, "close", None)
        if close is not None:
            await close()
        if self._metrics_server is not None:
            await self._metrics_server.stop()
        await self.workers.close()
        if self.pidfile is not None:
            self.pidfile.unlink(missing_ok=True)
        self.events.lifecycle("stop")
        self.audit.close()
        self._stopped.set()
        log.info("stopped; the spool keeps what was not delivered")

    async def wait(self) -> None:
        await self._stopped.wait()


def _write_problem(folder: Path, room: int) -> str | None:
    """Why `folder` cannot take a message now, or None. A real create and unlink, not a mode
    check: a read-only mount, a full inode table or a vanished folder all show here (and a
    mode check says nothing when running as root). No fsync: the health check must answer
    quickly even when the disk is slow."""
    probe = folder / f".healthz-{os.getpid()}"
    try:
        descriptor = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(descriptor, b"ok")
        finally:
            os.close(descriptor)
            os.unlink(probe)
        free = os.statvfs(folder)
    except OSError as error:
        return error.strerror or type(error).__name__
    if free.f_bavail * free.f_frsize < room:
        return f"less free space than one message of the largest size ({room} octets)"
    return None


async def serve(config_path: Path) -> None:
    gateway = Gateway(config_path)
    await gateway.start()
    gateway.install_signals()
    await gateway.wait()
