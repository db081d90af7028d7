"""The unwrap → policy → wrap stage, for one spooled message (CPU only: no sockets, no disk).

    raw ──unwrap(source adapter)──► Unwrapped ──policy(require:, routes:)──►
        per destination network: trace headers ──wrap(destination adapter)──► Batch

The message is split per destination network: each network gets its own wrapping (its own
signature, encrypted to its own recipients) and its own delivery. A failure that concerns the
whole message (cannot decrypt, required signature missing) fails every recipient; a failure
that concerns one recipient (no certificate) fails only that one. `prepare` runs on a worker
(gateway/workers.py: a thread, or a worker process for the crypto networks), never on the event
loop.

A failure is temporary when the sender can do nothing about it and the operator can: a stale
or badly signed CRL (DESIGN.md §10 says refuse; refusing is deferring here, the message waits
in the queue, is never delivered meanwhile, and is bounced by the queue manager only at the
retry give-up time). Everything else a verdict says is the sender's to fix: a DSN.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

import adapters
from adapters.base import Unwrapped, Verdict
from gateway.config import NetworkSettings, Requirements
from gateway.envelope import Envelope, Recipient
from gateway.errors import GatewayError, PermanentFailure, Reason
from gateway.revocation import revocation_unknown
from gateway.runtime import Runtime
from gateway.trace import add_trace

__all__ = ["Batch", "Prepared", "enforce", "prepare"]

# RFC 3463 / RFC 5248 codes for verdicts that a source network's `require:` refuses.
_VERDICT_CODES: Mapping[Reason, str] = {
    Reason.SIGNATURE_MISSING: "5.7.1",
    Reason.ENCRYPTION_MISSING: "5.7.1",
    Reason.SIGNATURE_INVALID: "5.7.7",
    Reason.UNTRUSTED_SIGNER: "5.7.5",
    Reason.SIGNER_MISMATCH: "5.7.5",
    Reason.REVOKED: "5.7.5",
    Reason.EXPIRED: "5.7.5",
    Reason.WEAK_ALGORITHM: "5.7.6",
    Reason.UNSUPPORTED_ALGORITHM: "5.7.6",
}


@dataclass(frozen=True)
class Batch:
    """One destination network's share of a message, wrapped and ready to send."""

    network: NetworkSettings
    recipients: tuple[Recipient, ...]  # those that can receive `content`
    content: bytes
    recipient_keys: Mapping[str, str] = field(default_factory=dict)
    signer_key: str | None = None


@dataclass(frozen=True)
class Prepared:
    verdict: Verdict
    encrypted: bool
    decryption_keys: tuple[str, ...]
    batches: tuple[Batch, ...]
    failed: Mapping[str, GatewayError]  # recipient address -> why it cannot get the message
    notes: tuple[str, ...] = ()  # the unwrap's extra facts for the audit (never content)


def enforce(network: NetworkSettings, require: Requirements, unwrapped: Unwrapped) -> None:
    """Refuse what the source network's `require:` does not allow (never fail open).

    PermanentFailure for what the sender must fix; TemporaryFailure when the signature could
    not be judged because a CRL is stale or badly signed (see the module docstring).
    """
    verdict = unwrapped.signature
    if require.signature and verdict.failure is Reason.REVOCATION_UNKNOWN:
        raise revocation_unknown(
            f"require.signature: signer revocation status unknown ({verdict.reason})"
        )
    if require.signature and verdict.result != "pass":
        reason = verdict.failure if verdict.result == "fail" and verdict.failure else (
            Reason.SIGNATURE_INVALID if verdict.result == "fail" else Reason.SIGNATURE_MISSING
        )
        why = verdict.reason or ("not signed" if verdict.result == "none" else verdict.result)
        raise PermanentFailure(
            f"The {network.name} network requires a valid signature and this message's "
            f"signature was not verified ({why}); the sender must sign it with a valid, "
            f"trusted certificate or key and send it again",
            enhanced=_VERDICT_CODES.get(reason, "5.7.5"), reason=reason,
            detail=f"require.signature: verdict {verdict.result} ({verdict.reason})",
        )
    if require.encryption and not unwrapped.encrypted:
        raise PermanentFailure(
            f"The {network.name} network requires encrypted mail and this message was not "
            f"encrypted to this gateway; the sender must encrypt it and send it again",
            enhanced="5.7.1", reason=Reason.ENCRYPTION_MISSING,
            detail="require.encryption: message was not encrypted",
        )


def _unwrap(runtime: Runtime, envelope: Envelope, raw: bytes, now: dt.datetime) -> Unwrapped:
    if envelope.generated:
        # Our own DSNs are plain MIME made by this process: nothing to unwrap or to require.
        return Unwrapped(content=raw, signature=Verdict.unsigned(), source_format="mime")
    source = runtime.config.networks.get(envelope.source_network)
    if source is None:
        raise PermanentFailure(
            "The network this message came from is no longer configured at this gateway",
            enhanced="5.3.0", reason=Reason.ROUTE_DENIED,
            detail=f"source network {envelope.source_network!r} was removed by a reload",
        )
    adapter = adapters.get(source.adapter)
    return adapter.unwrap(raw, runtime.unwrap_context(source, now))


def _wrap_for(
    runtime: Runtime, envelope: Envelope, unwrapped: Unwrapped, network: NetworkSettings,
    recipients: tuple[Recipient, ...], now: dt.datetime,
) -> tuple[Batch | None, dict[str, GatewayError]]:
    failed: dict[str, GatewayError] = {}
    if not envelope.generated and not runtime.config.route_allowed(
        envelope.source_network, network.name
    ):
        error = PermanentFailure(
            f"Relaying from {envelope.source_network} to {network.name} is no longer allowed",
            enhanced="5.7.1", reason=Reason.ROUTE_DENIED,
            detail=f"route {envelope.source_network} -> {network.name} removed by a reload",
        )
        return None, {r.address: error for r in recipients}
    addresses = tuple(r.address for r in recipients)
    content = add_trace(
        unwrapped.content, envelope, unwrapped.signature, runtime.config.gateway.hostname,
        addresses, now,
    )
    adapter = adapters.get(network.adapter)
    context = runtime.wrap_context(network, envelope.sender, addresses, now)
    wrapped = adapter.wrap(replace(unwrapped, content=content), context)
    failed.update(wrapped.refused)
    deliverable = tuple(r for r in recipients if r.address not in wrapped.refused)
    if not deliverable:
        return None, failed
    batch = Batch(
        network=network,
        recipients=deliverable,
        content=wrapped.content,
        recipient_keys=dict(wrapped.recipient_keys),
        signer_key=wrapped.signer_key,
    )
    return batch, failed


def prepare(
    runtime: Runtime,
    envelope: Envelope,
    raw: bytes,
    recipients: Sequence[Recipient],
    now: dt.datetime,
) -> Prepared:
    """Unwrap once, then wrap for each destination network of `recipients`."""
    try:
        unwrapped = _unwrap(runtime, envelope, raw, now)
    except GatewayError as error:
        return Prepared(Verdict.unsigned(), False, (), (), {r.address: error for r in recipients})
    except Exception as error:  # a bug or a library crash must not lose or pass the message
        failure = PermanentFailure(
            "The message could not be processed by this gateway; it was not delivered",
            enhanced="5.6.0", reason=Reason.MALFORMED, detail=f"unwrap crashed: {error!r}",
        )
        return Prepared(Verdict.unsigned(), False, (), (), {r.address: failure for r in recipients})

    source = runtime.config.networks.get(envelope.source_network)
    if source is not None and not envelope.generated:
        try:
            enforce(source, source.require, unwrapped)
        except GatewayError as refusal:
            # Keep the verdict: the audit trail must say what was found, not only the refusal.
            return Prepared(
                unwrapped.signature, unwrapped.encrypted, unwrapped.decryption_keys, (),
                {r.address: refusal for r in recipients}, unwrapped.notes,
            )

    by_network: dict[str, list[Recipient]] = {}
    for recipient in recipients:
        by_network.setdefault(recipient.network, []).append(recipient)
    batches: list[Batch] = []
    failed: dict[str, GatewayError] = {}
    for name, members in by_network.items():
        network = runtime.config.networks.get(name)
        if network is None:
            gone = PermanentFailure(
                "The destination network is no longer configured at this gateway",
                enhanced="5.3.0", reason=Reason.ROUTE_DENIED,
                detail=f"destination network {name!r} removed by a reload",
            )
            failed.update({r.address: gone for r in members})
            continue
        try:
            batch, refused = _wrap_for(runtime, envelope, unwrapped, network, tuple(members), now)
        except GatewayError as error:
            failed.update({r.address: error for r in members})
            continue
        except Exception as error:
            failure = PermanentFailure(
                f"The message could not be prepared for the {name} network; it was not delivered",
                enhanced="5.3.0", reason=Reason.WRAP_FAILED, detail=f"wrap crashed: {error!r}",
            )
            failed.update({r.address: failure for r in members})
            continue
        failed.update(refused)
        if batch is not None:
            batches.append(batch)
    return Prepared(
        verdict=unwrapped.signature,
        encrypted=unwrapped.encrypted,
        decryption_keys=unwrapped.decryption_keys,
        batches=tuple(batches),
        failed=failed,
        notes=unwrapped.notes,
    )
