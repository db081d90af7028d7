"""Which network a connected peer speaks for (routing.yaml `peers:`, DESIGN.md §10 "Peers").

Untrusted input: the peer's IP address and the certificate it presented (already verified
against the trust anchors by the TLS handshake), and the MAIL FROM domain.

A peer is authenticated for a network when every criterion the network states holds: its
certificate subject is one of `subjects:` (RFC 4514 comparison, never the CN alone), its address
is within `addresses:`, and for `whitelist: mssante` its certificate's subject DN is listed in the
MSSanté whitelist for the MAIL FROM domain. A network that states no criterion accepts nobody:
the default is deny. A peer that matches several networks is resolved by the MAIL FROM domain.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Collection
from dataclasses import dataclass
from typing import Protocol

from cryptography import x509

from gateway.config import Config, NetworkSettings
from gateway.dn import DistinguishedName, dn_from_name, parse_dn
from gateway.errors import PermanentFailure, Reason

__all__ = ["PeerIdentity", "Whitelist", "resolve_source"]


class Whitelist(Protocol):
    """Domain → operator certificate DNs allowed to send for it (the MSSanté list)."""

    def operators(self, domain: str) -> Collection[DistinguishedName]: ...


@dataclass(frozen=True)
class PeerIdentity:
    address: ipaddress.IPv4Address | ipaddress.IPv6Address
    certificate: x509.Certificate | None = None  # verified client certificate, if any

    @property
    def subject(self) -> DistinguishedName | None:
        if self.certificate is None:
            return None
        return dn_from_name(self.certificate.subject)

    @property
    def subject_text(self) -> str | None:
        subject = self.subject
        return str(subject) if subject is not None else None


def _not_authorized(detail: str) -> PermanentFailure:
    return PermanentFailure(
        "This peer is not authorized to send mail through this gateway",
        smtp_code=550, enhanced="5.7.1", reason=Reason.PEER_NOT_AUTHENTICATED, detail=detail,
    )


def _matches_static(network: NetworkSettings, peer: PeerIdentity) -> bool:
    """The part of the peer rule that does not depend on the sender's domain."""
    rule = network.peers
    if not (rule.subjects or rule.addresses or rule.whitelist):
        return False
    if rule.subjects:
        subject = peer.subject
        if subject is None or subject not in {parse_dn(s) for s in rule.subjects}:
            return False
    if rule.addresses and not any(peer.address in net for net in rule.addresses):
        return False
    if rule.whitelist and peer.certificate is None:
        return False
    return True


def _listed(
    network: NetworkSettings, peer: PeerIdentity, domains: Collection[str],
    whitelist: Whitelist | None,
) -> bool:
    if not network.peers.whitelist:
        return True
    if whitelist is None:
        return False
    subject = peer.subject
    return subject is not None and any(subject in whitelist.operators(d) for d in domains)


def candidates(config: Config, peer: PeerIdentity) -> list[NetworkSettings]:
    """Networks this peer may speak for, before the sender's domain is known."""
    return [n for n in config.networks.values() if _matches_static(n, peer)]


def resolve_source(
    config: Config, peer: PeerIdentity, sender_domain: str | None,
    whitelist: Whitelist | None = None,
) -> NetworkSettings:
    """The source network for a transaction from `peer` with this MAIL FROM domain.

    `sender_domain` is None for the null sender, which an authenticated peer may use for
    bounces and receipts of its network.
    """
    found = candidates(config, peer)
    if not found:
        raise _not_authorized(
            f"peer {peer.address} subject {peer.subject_text!r} matches no network's peers:"
        )
    if sender_domain is None:
        for network in found:
            if _listed(network, peer, _listed_domains(network, whitelist), whitelist):
                return network
        raise _not_authorized(
            f"peer {peer.address} subject {peer.subject_text!r} is not listed for any domain of "
            f"{', '.join(n.name for n in found)}"
        )
    for network in found:
        if network.claims(sender_domain):
            if not _listed(network, peer, [sender_domain], whitelist):
                raise _not_authorized(
                    f"subject {peer.subject_text!r} is not listed in the whitelist for "
                    f"{sender_domain}"
                )
            return network
    raise PermanentFailure(
        f"Sender domain {sender_domain} does not belong to the network this peer sends for",
        smtp_code=550, enhanced="5.7.1", reason=Reason.SENDER_NOT_ALLOWED,
        detail=f"peer {peer.address} may send for {', '.join(n.name for n in found)}, "
        f"none of which claims {sender_domain}",
    )


def _listed_domains(network: NetworkSettings, whitelist: Whitelist | None) -> list[str]:
    """Domains to look up in the whitelist for a null sender: the network's exact domains, and
    for wildcard patterns every whitelisted domain under them."""
    domains = [d for d in network.domains if not d.startswith("*.")]
    if whitelist is not None and hasattr(whitelist, "domains"):
        for domain in whitelist.domains():
            if network.claims(domain):
                domains.append(domain)
    return domains
