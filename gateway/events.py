"""What each stage reports as a message moves: logs and Prometheus metrics (DESIGN.md §8).

Every stage calls one method here per event, so the log line, the metric and (when configured)
the audit record of an event are written from one place. Logs carry the queue id and never the
content or the Subject: MSSanté subjects carry the patient's name and birth date.

`gateway_queue_messages{state}` is kept without reading the spool: each move the server makes
(accepted into active/, filed in deferred/, quarantined, finished) adjusts the count at once
(`queue_moved`), and the queue manager recounts the folders now and then, off the event loop
(`queue_counting`, `queue_counted`), which brings in what other processes did meanwhile (an
operator's `gateway queue hold|release|delete`). Moves made while a recount runs are applied on
top of its result, so the gauge is exact once the spool is at rest, and off by at most the few
moves a recount overlapped while it is not.
"""

from __future__ import annotations

import logging
import time
from collections import Counter as Tally
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from gateway.envelope import Envelope
from gateway.spool import LOCATIONS

if TYPE_CHECKING:
    from gateway.delivery import Outcome
    from gateway.errors import GatewayError
    from gateway.pipeline import Prepared

__all__ = ["Events", "Metrics"]

log = logging.getLogger("gateway")


class Metrics:
    """The normative metric names, on a registry of their own (one per running gateway)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.received = Counter(
            "gateway_messages_received", "Messages accepted (250) per source network",
            ["network"], registry=r,
        )
        self.delivered = Counter(
            "gateway_messages_delivered", "Recipients delivered per route", ["route"], registry=r,
        )
        self.failed = Counter(
            "gateway_messages_failed", "Failures per route and reason", ["route", "reason"],
            registry=r,
        )
        self.queue = Gauge(
            "gateway_queue_messages", "Messages in the spool per state", ["state"], registry=r,
        )
        self.process = Histogram(
            "gateway_process_seconds", "From accept to handed to the next hop",
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 3600, 86400),
            registry=r,
        )
        self.verifications = Counter(
            "gateway_signature_verifications", "Signature verdicts per source network",
            ["network", "result"], registry=r,
        )
        self.certificate_expiry = Gauge(
            "gateway_certificate_expiry_seconds",
            "Unix time at which a gateway identity's certificate expires", ["identity"],
            registry=r,
        )
        self.crl_next_update = Gauge(
            "gateway_crl_next_update_timestamp_seconds",
            "Unix time of a configured CRL's nextUpdate", ["crl"], registry=r,
        )


class Events:
    def __init__(self, metrics: Metrics | None = None, audit: Any = None) -> None:
        self.metrics = metrics or Metrics()
        self.audit = audit
        self._queue: Tally[str] = Tally()  # messages per spool folder, as far as we know
        self._queue_during: Tally[str] | None = None  # moves since the running recount began

    def _audit(self, event: str, **fields: Any) -> None:
        if self.audit is not None:
            self.audit.record(event, **fields)

    def lifecycle(self, event: str, **fields: Any) -> None:
        """start, stop, reload, reload_refused."""
        log.info("%s %s", event, " ".join(f"{k}={v}" for k, v in fields.items()))
        self._audit(event, **fields)

    @staticmethod
    def _envelope_fields(envelope: Envelope) -> dict[str, Any]:
        return {
            "queue_id": envelope.queue_id,
            "message_id": envelope.message_id,
            "peer": envelope.peer.address,
            "peer_subject": envelope.peer.certificate_subject,
            "sender": envelope.sender,
            "recipients": [r.address for r in envelope.recipients],
            "source": envelope.source_network,
            "size": envelope.size,
        }

    def received(self, envelope: Envelope) -> None:
        """The `received` audit record, written before the 250 (the caller makes it durable)."""
        self._audit("received", **self._envelope_fields(envelope))

    def accepted(self, envelope: Envelope) -> None:
        """The 250 is about to be given: the record is durable, so count and log it now.

        Counting before would count a message whose audit write failed and that the peer
        was told to send again (451), twice in the end.
        """
        log.info("%s: received from=<%s> nrcpt=%d size=%d network=%s peer=%s",
                 envelope.queue_id, envelope.sender, len(envelope.recipients), envelope.size,
                 envelope.source_network, envelope.peer.address)
        self.metrics.received.labels(envelope.source_network).inc()

    def rejected(self, server: Any, command: str, argument: str, error: GatewayError,
                 queue_id: str | None = None) -> None:
        """A refusal. `queue_id` when its `received` record was written already (the spool or
        the audit failed after the end of DATA): the two records then name the same message."""
        network = "unknown"
        self.metrics.failed.labels(f"{network}->unknown", error.reason.value).inc()
        peer = server.session.peer[0] if server.session and server.session.peer else None
        self._audit("rejected", peer=peer, command=command, argument=argument[:300],
                    reply=error.smtp_reply, detail=error.detail, reason=error.reason.value,
                    queue_id=queue_id)

    def unwrapped(self, envelope: Envelope, prepared: Prepared) -> None:
        verdict = prepared.verdict
        log.info("%s: unwrapped verdict=%s/%s signer=%s encrypted=%s", envelope.queue_id,
                 verdict.method, verdict.result, verdict.signer, prepared.encrypted)
        if not envelope.generated:
            self.metrics.verifications.labels(envelope.source_network, verdict.result).inc()
        self._audit(
            "unwrapped", queue_id=envelope.queue_id, message_id=envelope.message_id,
            method=verdict.method, verdict=verdict.result, why=verdict.reason,
            signer=verdict.signer, signer_subject=verdict.signer_subject,
            fingerprints=list(verdict.fingerprints), encrypted=prepared.encrypted,
            decryption_keys=list(prepared.decryption_keys),
            # Inner and over-ciphertext signatures, decryption algorithms: facts, never content.
            notes=list(prepared.notes),
        )
        for batch in prepared.batches:
            self._audit(
                "wrapped", queue_id=envelope.queue_id, destination=batch.network.name,
                recipients=[r.address for r in batch.recipients],
                recipient_keys=dict(batch.recipient_keys), signer_key=batch.signer_key,
            )

    def outcome(self, envelope: Envelope, outcome: Outcome) -> None:
        destination = next(
            (r.network for r in envelope.recipients if r.address == outcome.address), "unknown"
        )
        route = f"{envelope.source_network}->{destination}"
        reply = f"{outcome.code} {outcome.enhanced} {outcome.text}"
        log.info("%s: to=<%s> route=%s status=%s reply=%s", envelope.queue_id, outcome.address,
                 route, outcome.kind, reply)
        if outcome.kind == "delivered":
            self.metrics.delivered.labels(route).inc()
            self.metrics.process.observe(max(0.0, time.time() - envelope.received_at))
        else:
            reason = outcome.reason.value if outcome.reason else "destination_refused"
            self.metrics.failed.labels(route, reason).inc()
        event = {"delivered": "delivered", "deferred": "deferred", "bounced": "bounced"}[
            outcome.kind
        ]
        if outcome.reason is not None and outcome.reason.value == "gave_up":
            event = "expired"
        self._audit(event, queue_id=envelope.queue_id, message_id=envelope.message_id,
                    recipient=outcome.address, route=route, reply=reply,
                    reason=outcome.reason.value if outcome.reason else None)

    # -- the queue gauge ------------------------------------------------------------------------

    def queue_moved(self, source: str | None, target: str | None) -> None:
        """A message entered the spool (`source` None), moved between its folders, or left it
        (`target` None)."""
        if source == target:
            return
        for tally in (self._queue, self._queue_during):
            if tally is None:
                continue
            if source is not None:
                tally[source] -= 1
            if target is not None:
                tally[target] += 1
        self._publish_queue()

    def queue_counting(self) -> None:
        """A recount of the spool's folders begins: moves from now on go on top of its result."""
        self._queue_during = Tally()

    def queue_counted(self, counts: Mapping[str, int] | None) -> None:
        """The recount's result, per folder (None: it failed, and the running tally stays)."""
        during, self._queue_during = self._queue_during, None
        if counts is None:
            return
        self._queue = Tally({state: counts.get(state, 0) for state in LOCATIONS})
        self._queue.update(during or {})
        self._publish_queue()

    def _publish_queue(self) -> None:
        for state in LOCATIONS:
            # Below zero only for a moment: a move counted before a recount that had seen it.
            self.metrics.queue.labels(state).set(max(0, self._queue[state]))

    def dsn(self, original: Envelope, notice: Envelope, action: str) -> None:
        log.info("%s: DSN %s queued as %s to <%s>", original.queue_id, action, notice.queue_id,
                 original.sender)
        self._audit("dsn", queue_id=original.queue_id, dsn_queue_id=notice.queue_id,
                    action=action, recipient=original.sender)
