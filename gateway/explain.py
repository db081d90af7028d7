"""`gateway explain`: what the gateway would do with a message, without sending anything.

It runs the same code the relay runs: `peers.resolve_source` for the peer, `Config` for routing,
and the destination adapter's own `wrap()` on a small probe message to learn which certificate
or key each recipient would be encrypted to (or why none is usable). Nothing leaves the process.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass, field

from cryptography.hazmat.primitives import hashes

import adapters
from adapters.base import Unwrapped, Verdict
from gateway.errors import GatewayError
from gateway.peers import PeerIdentity, PeerTrust, resolve_source
from gateway.runtime import Runtime

__all__ = ["Explanation", "explain"]

PROBE = (
    b"From: <{sender}>\r\nTo: <{recipient}>\r\nSubject: explain probe\r\n"
    b"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\nprobe\r\n"
)


@dataclass
class Explanation:
    lines: list[str] = field(default_factory=list)
    ok: bool = True  # False when the message would be refused or a recipient bounced

    def add(self, label: str, text: str) -> None:
        self.lines.append(f"{label:<13} {text}")

    def __str__(self) -> str:
        return "\n".join(self.lines)


def _revocation_notes(runtime: Runtime) -> list[str]:
    covered = {crl.issuer for crl in runtime.trust.crls}
    notes = []
    for anchor in runtime.trust.anchors:
        subject = anchor.subject.rfc4514_string()
        if anchor.subject in covered:
            crl = next(c for c in runtime.trust.crls if c.issuer == anchor.subject)
            when = crl.next_update_utc.strftime("%Y-%m-%d %H:%M UTC") if crl.next_update_utc \
                else "no nextUpdate"
            notes.append(f"{subject}: CRL configured (next update {when})")
        else:
            notes.append(f"{subject}: no CRL configured, not revocation-checked")
    return notes


def _describe_key(runtime: Runtime, fingerprint: str) -> str:
    """A recipient key fingerprint, with the certificate's subject and expiry when X.509."""
    wanted = fingerprint.removeprefix("sha256:").lower()
    for certificate in runtime.keyring.directory.x509:
        if certificate.fingerprint(hashes.SHA256()).hex() == wanted:
            expiry = certificate.not_valid_after_utc.strftime("%Y-%m-%d")
            return (f"certificate {certificate.subject.rfc4514_string()} "
                    f"(serial {certificate.serial_number:x}, expires {expiry})")
    return f"OpenPGP key {fingerprint}" if ":" not in fingerprint else fingerprint


def explain(
    runtime: Runtime,
    sender: str,
    recipients: list[str],
    peer_address: str = "127.0.0.1",
    peer_certificate: object | None = None,
    now: dt.datetime | None = None,
) -> Explanation:
    now = now or dt.datetime.now(dt.UTC)
    config = runtime.config
    out = Explanation()
    certificate = peer_certificate
    peer = PeerIdentity(ipaddress.ip_address(peer_address), certificate)  # type: ignore[arg-type]
    out.add("sender", f"<{sender}>")
    out.add("peer", f"{peer_address}, certificate {peer.subject_text or 'none'}")
    domain = sender.rpartition("@")[2].lower() or None
    try:
        trust = PeerTrust(runtime.trust.anchors, runtime.trust.crls, now)
        source = resolve_source(config, peer, domain, runtime.whitelist, trust=trust)
    except GatewayError as error:
        out.ok = False
        out.add("source", f"REFUSED at MAIL FROM: {error.smtp_reply}")
        out.add("", f"why: {error.detail}")
        return out
    out.add("source", f"{source.name} (adapter {source.adapter}); peer authenticated")
    out.add("requires", f"signature: {'yes' if source.require.signature else 'no'}, "
                        f"encryption: {'yes' if source.require.encryption else 'no'}")
    for note in _revocation_notes(runtime):
        out.add("revocation", note)
    for recipient in recipients:
        out.lines.append("")
        out.add("recipient", f"<{recipient}>")
        network = config.network_for_domain(recipient.rpartition("@")[2])
        if network is None:
            out.ok = False
            out.add("network", "none claims this domain: refused with 550 5.1.2")
            continue
        out.add("network", f"{network.name} (adapter {network.adapter})")
        if not config.route_allowed(source.name, network.name):
            out.ok = False
            out.add("route", f"{source.name} -> {network.name}: NOT allowed (550 5.7.1)")
            continue
        out.add("route", f"{source.name} -> {network.name}: allowed")
        identity = runtime.identity(network)
        if identity is not None and identity.certificate is not None:
            expiry = identity.certificate.not_valid_after_utc.strftime("%Y-%m-%d")
            out.add("signs with", f"{identity.name} "
                    f"({identity.certificate.subject.rfc4514_string()}, expires {expiry})")
        elif identity is not None:
            out.add("signs with", f"{identity.name} (OpenPGP key)")
        else:
            out.add("signs with", "nothing (this network's mail is not signed by the gateway)")
        probe = PROBE.replace(b"{sender}", sender.encode()).replace(
            b"{recipient}", recipient.encode())
        adapter = adapters.get(network.adapter)
        try:
            wrapped = adapter.wrap(
                Unwrapped(probe, Verdict.unsigned(), "mime"),
                runtime.wrap_context(network, sender, (recipient,), now),
            )
        except GatewayError as error:
            out.ok = False
            out.add("wrap", f"would FAIL: {error.smtp_reply} ({error.detail})")
        else:
            if recipient in wrapped.refused:
                refusal = wrapped.refused[recipient]
                out.ok = False
                fate = "would bounce" if refusal.permanent else "would wait and be retried"
                out.add("encrypts to", f"MISSING: {refusal.detail} — {fate} "
                        f"({refusal.enhanced})")
            elif recipient in wrapped.recipient_keys:
                out.add("encrypts to", _describe_key(runtime, wrapped.recipient_keys[recipient]))
            else:
                out.add("encrypts to", "nothing (plain MIME; confidentiality from TLS)")
        relay = network.relay
        if relay is None:
            out.add("relay", "none configured")
        else:
            listed = f", whitelist {relay.whitelist}" if relay.whitelist else ""
            out.add("relay", f"{relay.host}:{relay.port} tls {relay.tls}{listed}")
    return out
