"""routing.yaml, parsed once into frozen typed objects (DESIGN.md §3).

Untrusted input: the operator's YAML file. Every mistake is reported with its line number and a
sentence saying what to write instead; `load()` collects all of them before failing, so that
`gateway check` can show them at once.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

__all__ = [
    "AuditSettings",
    "Config",
    "KeySettings",
    "Limits",
    "Listener",
    "MetricsSettings",
    "NetworkSettings",
    "PeerRule",
    "RelaySettings",
    "Requirements",
    "RetrySettings",
    "Route",
    "SpoolSettings",
    "TlsFiles",
    "TrustSettings",
]

TlsMode = Literal["none", "starttls", "implicit"]
ClientCertificate = Literal["none", "optional", "required"]
RelayTls = Literal["required", "opportunistic", "none"]


@dataclass(frozen=True)
class Listener:
    address: str
    port: int
    tls: TlsMode = "starttls"
    client_certificate: ClientCertificate = "optional"


@dataclass(frozen=True)
class TlsFiles:
    certificate: Path
    key: Path


@dataclass(frozen=True)
class SpoolSettings:
    path: Path
    encryption_key: Path | None = None


@dataclass(frozen=True)
class AuditSettings:
    path: Path
    retention: float = 183 * 86400.0  # seconds


@dataclass(frozen=True)
class MetricsSettings:
    address: str
    port: int


@dataclass(frozen=True)
class RetrySettings:
    schedule: tuple[float, ...] = (60.0, 300.0, 900.0, 3600.0, 14400.0)  # seconds
    give_up_after: float = 5 * 86400.0

    def delay(self, attempts: int) -> float:
        """Seconds to wait after the `attempts`-th failed attempt; the last interval repeats."""
        index = min(max(attempts, 1), len(self.schedule)) - 1
        return self.schedule[index]


@dataclass(frozen=True)
class GatewaySettings:
    hostname: str
    listen: tuple[Listener, ...]
    tls: TlsFiles | None
    spool: SpoolSettings
    audit: AuditSettings
    metrics: MetricsSettings | None
    max_message_size: int = 25 * 1024 * 1024
    retry: RetrySettings = field(default_factory=RetrySettings)


@dataclass(frozen=True)
class TrustSettings:
    anchors: tuple[Path, ...] = ()
    crls: tuple[Path, ...] = ()
    mssante_whitelist: Path | None = None


@dataclass(frozen=True)
class KeySettings:
    name: str
    certificate: Path | None = None
    key: Path | None = None
    secret_key: Path | None = None  # OpenPGP transferable secret key


@dataclass(frozen=True)
class PeerRule:
    """Who may hand us mail for a network. With both subjects and addresses, both must match."""

    whitelist: str | None = None  # "mssante"
    subjects: tuple[str, ...] = ()  # RFC 4514 DNs as written by the operator
    addresses: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()


@dataclass(frozen=True)
class RelaySettings:
    host: str
    port: int = 25
    tls: RelayTls = "required"
    whitelist: str | None = None  # "mssante": the next hop's DN must be listed for the domain


@dataclass(frozen=True)
class Requirements:
    """What mail FROM this network must carry to be accepted."""

    signature: bool = False
    encryption: bool = False


@dataclass(frozen=True)
class Limits:
    connections_per_peer: int = 20
    concurrency: int = 10  # simultaneous deliveries to this network's relay


@dataclass(frozen=True)
class NetworkSettings:
    name: str
    adapter: str
    domains: tuple[str, ...]  # lower-case; "*.example.org" matches any subdomain
    peers: PeerRule
    relay: RelaySettings | None = None
    identity: str | None = None  # a name from `keys:`
    require: Requirements = field(default_factory=Requirements)
    limits: Limits = field(default_factory=Limits)
    options: Mapping[str, object] = field(default_factory=dict)  # adapter-specific settings
    line: int = 0  # where the network is defined, for messages

    def claims(self, domain: str) -> bool:
        """Whether `domain` (already lower-case, no trailing dot) belongs to this network."""
        for pattern in self.domains:
            if pattern.startswith("*."):
                if domain.endswith(pattern[1:]) and len(domain) > len(pattern) - 1:
                    return True
            elif domain == pattern:
                return True
        return False


@dataclass(frozen=True)
class Route:
    source: str
    destinations: tuple[str, ...]


@dataclass(frozen=True)
class Config:
    path: Path  # the routing.yaml it was read from; relative paths resolve against its folder
    version: int
    gateway: GatewaySettings
    trust: TrustSettings
    keys: Mapping[str, KeySettings]
    directory: tuple[Path, ...]
    networks: Mapping[str, NetworkSettings]
    routes: tuple[Route, ...]

    def network_for_domain(self, domain: str) -> NetworkSettings | None:
        """The network that claims `domain`; an exact name wins over a wildcard."""
        domain = domain.lower().rstrip(".")
        for network in self.networks.values():
            if domain in network.domains:
                return network
        for network in self.networks.values():
            if network.claims(domain):
                return network
        return None

    def route_allowed(self, source: str, destination: str) -> bool:
        return any(
            route.source == source and destination in route.destinations for route in self.routes
        )
