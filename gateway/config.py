"""routing.yaml, parsed once into frozen typed objects (DESIGN.md §3, rules of §10).

Untrusted input: the operator's YAML file. Every mistake is reported with its line number and a
sentence saying what to write instead; `load()` collects all of them before failing, so that
`gateway check` can show them at once.

The file is read with PyYAML's `compose` (the node tree, which keeps each key's line) rather than
`safe_load`, and each node is interpreted here: YAML 1.1's implicit typing would otherwise turn
`tls: no` into False or `retention: 1:30` into 90 without a word. Durations and sizes are read
from the text as written.

Formats (documented for operators in docs/):

- durations: a number of seconds (`30`), or one or more number+unit pairs with units `s`, `m`,
  `h`, `d` (`30s`, `5m`, `1h30m`, `5d`);
- sizes: a number of bytes (`1048576`), or a number with a unit: `KiB`, `MiB`, `GiB` are
  binary (1024-based), `KB`, `MB`, `GB` decimal (1000-based) as the IEC/SI prefixes say; `B`
  is accepted. Units are case-insensitive (`25mib`);
- paths: relative paths resolve against the folder of routing.yaml (DESIGN.md §10);
- domains: lower-cased, trailing dot removed, internationalised names IDNA 2008-encoded
  (`médecin.fr` → `xn--mdecin-bva.fr`); `*.example.org` matches every name under example.org
  but not example.org itself.

Defaults (DESIGN.md §10): no `metrics:` → no metrics listener; no `audit:` → `var/audit`
beside routing.yaml, kept 183 days; no `spool:` → `var/spool` beside routing.yaml, not
encrypted; `max_message_size` 25MiB; `retry` 1m, 5m, 15m, 1h, 4h, giving up after 5d; a
listener is `starttls` with an `optional` client certificate; a relay port is 25 and its TLS
`required`; no `routes:` → every message is refused (default deny).

Adapter options (every key under a network other than name, adapter, domains, peers, relay,
identity, require, limits) are handed to the adapter as plain values, checked by its
`option_problems`. The Apicrypt path options `key_directory` and `programs:` are resolved
against the folder of routing.yaml like every other path, since adapters read no files.
"""

from __future__ import annotations

import difflib
import ipaddress
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, TypeVar

import idna
import yaml

from gateway.dn import parse_dn

__all__ = [
    "AuditSettings",
    "Config",
    "ConfigError",
    "GatewaySettings",
    "KeySettings",
    "Limits",
    "Listener",
    "MetricsSettings",
    "NetworkSettings",
    "PeerRule",
    "Problem",
    "RelaySettings",
    "Requirements",
    "RetrySettings",
    "Route",
    "Severity",
    "SpoolSettings",
    "TlsFiles",
    "TrustSettings",
    "load",
    "normalize_domain",
    "parse",
    "parse_duration",
    "parse_size",
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
class WorkerSettings:
    """Where unwrap and wrap run (gateway/workers.py): `auto` puts S/MIME, OpenPGP and
    Apicrypt work in worker processes and plain MIME in threads; `count` worker processes,
    None for the default (one per core, one left to the event loop above two cores)."""

    kind: Literal["auto", "process", "thread"] = "auto"
    count: int | None = None


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
    workers: WorkerSettings = field(default_factory=WorkerSettings)


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
    # Dotted key path ("keys.medecin-smime.certificate", "trust.anchors.0") → line in the
    # file, so that checks made later (files, keys, certificates) can point at the line too.
    lines: Mapping[str, int] = field(default_factory=dict, compare=False, repr=False)

    def line(self, dotted: str) -> int:
        """Line of a key path, or of its nearest enclosing key; 0 when unknown."""
        while dotted:
            if dotted in self.lines:
                return self.lines[dotted]
            dotted = dotted.rpartition(".")[0]
        return 0

    def network_for_domain(self, domain: str) -> NetworkSettings | None:
        """The network that claims `domain`; an exact name wins over a wildcard."""
        domain = domain.lower().rstrip(".")
        if not domain.isascii():
            # Domains are kept IDNA-encoded; an SMTPUTF8 address may name the Unicode form.
            try:
                domain = ascii_domain(domain)
            except UnicodeError:
                return None
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



# -- problems ---------------------------------------------------------------------------------

Severity = Literal["error", "warning"]


@dataclass(frozen=True)
class Problem:
    """One mistake in routing.yaml or in a file it names, at the line that names it."""

    file: Path
    line: int  # 1-based; 0 when no line applies (the file cannot be read at all)
    message: str
    severity: Severity = "error"

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else f"{self.file}"
        prefix = "warning: " if self.severity == "warning" else ""
        return f"{where}: {prefix}{self.message}"


class ConfigError(Exception):
    """routing.yaml has errors; `problems` lists all of them (and the warnings) in file order."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        errors = [p for p in problems if p.severity == "error"]
        text = str(errors[0]) if errors else "no error"
        if len(errors) > 1:
            text += f" (and {len(errors) - 1} more error(s))"
        super().__init__(text)


# -- scalar formats ---------------------------------------------------------------------------

_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)([smhd])")
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([kmg]i?b|b)?", re.IGNORECASE)
_SIZE_UNITS = {
    "b": 1,
    "kb": 1000, "mb": 1000**2, "gb": 1000**3,
    "kib": 1024, "mib": 1024**2, "gib": 1024**3,
}


def parse_duration(text: str) -> float:
    """Seconds in `30`, `30s`, `5m`, `1h30m`, `5d`. Raises ValueError."""
    text = text.strip()
    if re.fullmatch(r"\d+(?:\.\d+)?", text):
        return float(text)
    if not text or not re.fullmatch(r"(?:\d+(?:\.\d+)?[smhd])+", text):
        raise ValueError(
            f"{text!r} is not a duration; write a number followed by s, m, h or d, as in 30s, "
            "5m, 1h or 5d"
        )
    return sum(float(n) * _DURATION_UNITS[u] for n, u in _DURATION_PART.findall(text))


def parse_size(text: str) -> int:
    """Bytes in `1048576`, `25MiB` (1024-based), `25MB` (1000-based). Raises ValueError."""
    match = _SIZE.fullmatch(text.strip())
    if match is None:
        raise ValueError(
            f"{text!r} is not a size; write a number of bytes or a number followed by KiB, MiB "
            "or GiB, as in 25MiB"
        )
    number, unit = match.groups()
    if unit is None and "." in number:
        raise ValueError(f"{text!r} is not a whole number of bytes")
    return int(float(number) * _SIZE_UNITS[(unit or "b").lower()])


_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\Z")


def ascii_domain(name: str) -> str:
    """`name` in the ASCII form domains are kept in: IDNA 2008 with the UTS 46 mapping (what
    registries such as AFNIC apply: `straße.de` is `xn--strae-oqa.de`, where Python's own
    IDNA 2003 codec would make it `strasse.de`, another domain). ASCII names are only
    lower-cased: their syntax is checked by the caller. Raises UnicodeError (idna.IDNAError)."""
    if name.isascii():
        return name.lower()
    return idna.encode(name, uts46=True).decode("ascii")


def normalize_domain(text: str) -> str:
    """A domain (or `*.domain` pattern) as the gateway compares it: lower case, no trailing dot,
    IDNA-encoded. Raises ValueError saying what is wrong."""
    domain = text.strip().rstrip(".").lower()
    wildcard = domain.startswith("*.")
    body = domain[2:] if wildcard else domain
    if not body:
        raise ValueError(f"{text!r} is not a domain")
    if "*" in body:
        raise ValueError(
            f"{text!r}: a wildcard may only be the whole first label, as in *.example.org"
        )
    try:
        encoded = ascii_domain(body)
    except UnicodeError as error:
        raise ValueError(f"{text!r} is not a valid domain name ({error})") from None
    if len(encoded) > 253:
        raise ValueError(f"{text!r} is longer than 253 characters")
    for label in encoded.split("."):
        if not _LABEL.match(label):
            raise ValueError(
                f"{text!r} is not a valid domain name: label {label!r} may only hold letters, "
                "digits and inner hyphens"
            )
    return f"*.{encoded}" if wildcard else encoded


# -- reading the node tree --------------------------------------------------------------------

_NULL = "tag:yaml.org,2002:null"
_Word = TypeVar("_Word", bound=str)
_TLS_MODES: tuple[TlsMode, ...] = ("none", "starttls", "implicit")
_CLIENT_CERTIFICATES: tuple[ClientCertificate, ...] = ("none", "optional", "required")
_RELAY_TLS: tuple[RelayTls, ...] = ("required", "opportunistic", "none")
_HOSTNAME = re.compile(r"(?=.{1,253}\Z)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                       r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?\Z")


def _line(node: yaml.Node) -> int:
    return int(node.start_mark.line) + 1


def _suggest(word: str, known: Collection[str]) -> str:
    close = difflib.get_close_matches(word, list(known), n=1, cutoff=0.6)
    if close:
        return f" (did you mean {close[0]!r}?)"
    return f" (known: {', '.join(sorted(known))})" if known else ""


class _Reader:
    """Interprets nodes, recording each problem and each key's line as it goes.

    Every reading method returns None after recording a problem, so the caller keeps its
    default and carries on: one run reports every mistake.
    """

    def __init__(self, file: Path, base: Path) -> None:
        self.file = file
        self.base = base
        self.problems: list[Problem] = []
        self.lines: dict[str, int] = {}
        # Builds plain Python values for adapter options; safe tags only.
        self.constructor = yaml.SafeLoader("")

    def report(self, where: yaml.Node | int, message: str, severity: Severity = "error") -> None:
        line = where if isinstance(where, int) else _line(where)
        self.problems.append(Problem(self.file, line, message, severity))

    def mapping(
        self,
        node: yaml.Node | None,
        where: str,
        known: Collection[str],
        *,
        required: Collection[str] = (),
        extra: bool = False,
        example: str = "",
    ) -> dict[str, yaml.Node] | None:
        """The keys of a mapping node, each value node by key name.

        Unknown keys are errors unless `extra`; then they are returned too, for the caller.
        """
        if node is None:
            return None
        label = where or "the file"
        if not isinstance(node, yaml.MappingNode):
            if isinstance(node, yaml.ScalarNode) and node.tag == _NULL:
                self.report(node, f"{label} has no value; {example or 'remove it or fill it in'}")
            else:
                self.report(node, f"{label} must be a mapping of keys to values"
                            + (f", as in {example}" if example else ""))
            return None
        own = sum(1 for k, _ in node.value if k.tag != "tag:yaml.org,2002:merge")
        try:
            self.constructor.flatten_mapping(node)  # YAML merge keys (`<<: *defaults`)
        except yaml.YAMLError as error:
            self.report(node, f"{label}: {error}")
            return None
        # flatten_mapping puts the merged entries first; the mapping's own keys override them.
        merged = len(node.value) - own
        found: dict[str, yaml.Node] = {}
        from_merge: set[str] = set()
        for index, (key_node, value_node) in enumerate(node.value):
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == _NULL:
                self.report(key_node, f"{label}: a key must be a plain word")
                continue
            key = str(key_node.value)
            dotted = f"{where}.{key}" if where else key
            if key in from_merge or (index < merged and key in found):
                from_merge.discard(key)
            elif key in found:
                self.report(key_node, f"{label}: key {key!r} appears twice (first at line "
                            f"{self.lines.get(dotted, 0)}); keep one")
                continue
            if not extra and key not in known:
                self.report(key_node, f"{label}: unknown key {key!r}{_suggest(key, known)}")
                continue
            self.lines[dotted] = _line(key_node)
            found[key] = value_node
            if index < merged:
                from_merge.add(key)
        for key in required:
            if key not in found:
                self.report(node, f"{label}: {key} is missing")
        return found

    def text(self, node: yaml.Node, where: str) -> str | None:
        if not isinstance(node, yaml.ScalarNode) or node.tag == _NULL or node.value == "":
            self.report(node, f"{where} must be a single value")
            return None
        return str(node.value)

    def integer(self, node: yaml.Node, where: str, low: int, high: int) -> int | None:
        text = self.text(node, where)
        if text is None:
            return None
        if not re.fullmatch(r"\d+", text) or not low <= int(text) <= high:
            self.report(node, f"{where} must be a whole number from {low} to {high}, not {text!r}")
            return None
        return int(text)

    def boolean(self, node: yaml.Node, where: str) -> bool | None:
        if isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:bool":
            value = self.constructor.construct_object(node)
            return bool(value)
        self.report(node, f"{where} must be true or false")
        return None

    def choice(self, node: yaml.Node, where: str, choices: tuple[_Word, ...]) -> _Word | None:
        text = self.text(node, where)
        if text is None:
            return None
        for choice in choices:
            if text == choice:
                return choice
        self.report(node, f"{where} must be one of {', '.join(choices)}, not {text!r}")
        return None

    def duration(self, node: yaml.Node, where: str) -> float | None:
        text = self.text(node, where)
        if text is None:
            return None
        try:
            seconds = parse_duration(text)
        except ValueError as error:
            self.report(node, f"{where}: {error}")
            return None
        if seconds <= 0:
            self.report(node, f"{where} must be longer than 0 seconds")
            return None
        return seconds

    def size(self, node: yaml.Node, where: str) -> int | None:
        text = self.text(node, where)
        if text is None:
            return None
        try:
            size = parse_size(text)
        except ValueError as error:
            self.report(node, f"{where}: {error}")
            return None
        if size <= 0:
            self.report(node, f"{where} must be more than 0 bytes")
            return None
        return size

    def path(self, node: yaml.Node, where: str) -> Path | None:
        text = self.text(node, where)
        if text is None:
            return None
        return self.resolve(text)

    def resolve(self, text: str) -> Path:
        path = Path(text)
        return path if path.is_absolute() else self.base / path

    def items(self, node: yaml.Node | None, where: str) -> list[yaml.Node]:
        """Items of a list; a single value stands for a list of one."""
        if node is None or (isinstance(node, yaml.ScalarNode) and node.tag == _NULL):
            return []
        if isinstance(node, yaml.SequenceNode):
            return list(node.value)
        if isinstance(node, yaml.ScalarNode):
            return [node]
        self.report(node, f"{where} must be a list, as in [a, b]")
        return []

    def host(self, node: yaml.Node, where: str) -> str | None:
        text = self.text(node, where)
        if text is None:
            return None
        try:
            ipaddress.ip_address(text)
        except ValueError:
            if not _HOSTNAME.match(text):
                self.report(node, f"{where}: {text!r} is neither an IP address nor a host name")
                return None
        return text

    def plain(self, node: yaml.Node, where: str) -> object:
        """A node as a plain Python value (adapter options)."""
        try:
            return self.constructor.construct_document(node)
        except yaml.YAMLError as error:
            self.report(node, f"{where}: {error}")
            return None


# -- the sections -----------------------------------------------------------------------------

_TOP = ("version", "gateway", "trust", "keys", "directory", "networks", "routes")
_GATEWAY = ("hostname", "listen", "tls", "spool", "audit", "metrics", "max_message_size", "retry",
            "workers")
_NETWORK = ("name", "adapter", "domains", "peers", "relay", "identity", "require", "limits")
_WORKER_KINDS: tuple[Literal["auto", "process", "thread"], ...] = ("auto", "process", "thread")
# Paths among the Apicrypt options; adapters read no files, so they get them resolved.
_PATH_OPTIONS = ("key_directory",)
_PATH_MAP_OPTIONS = ("programs",)


def _gateway(r: _Reader, node: yaml.Node | None, root: yaml.Node) -> GatewaySettings:
    keys = r.mapping(node, "gateway", _GATEWAY, required=("hostname", "listen"),
                     example="hostname: passerelle.example.org")
    if node is None:
        r.report(root, "gateway: is missing; it says how the gateway listens and where it keeps "
                 "its spool and audit trail")
    keys = keys or {}
    hostname = ""
    if "hostname" in keys:
        text = r.host(keys["hostname"], "gateway.hostname")
        hostname = text or ""
    listen: list[Listener] = []
    listen_items = r.items(keys.get("listen"), "gateway.listen")
    for index, item in enumerate(listen_items):
        listener = _listener(r, item, f"gateway.listen.{index}")
        if listener is not None:
            listen.append(listener)
    if "listen" in keys and not listen_items:
        r.report(keys["listen"], "gateway.listen is empty; add at least one "
                 "{address: ..., port: ...}")
    seen: dict[tuple[str, int], int] = {}
    for index, listener in enumerate(listen):
        spot = (listener.address, listener.port)
        line = r.lines.get(f"gateway.listen.{index}", 0)
        if spot in seen:
            r.report(line, f"gateway.listen: {listener.address} port {listener.port} is listed "
                     f"twice (first at line {seen[spot]})")
        seen.setdefault(spot, line)

    tls = None
    tls_keys = r.mapping(keys.get("tls"), "gateway.tls", ("certificate", "key"),
                         required=("certificate", "key"),
                         example="{certificate: pki/gateway.pem, key: pki/gateway.key}")
    if tls_keys is not None:
        certificate = r.path(tls_keys["certificate"], "gateway.tls.certificate") \
            if "certificate" in tls_keys else None
        key = r.path(tls_keys["key"], "gateway.tls.key") if "key" in tls_keys else None
        if certificate is not None and key is not None:
            tls = TlsFiles(certificate, key)
    for index, listener in enumerate(listen):
        if listener.tls != "none" and tls is None:
            r.report(r.lines.get(f"gateway.listen.{index}", 0),
                     f"gateway.listen: tls {listener.tls} needs the gateway's certificate; add "
                     "gateway.tls: {certificate: ..., key: ...} or write tls: none")

    spool = SpoolSettings(r.base / "var" / "spool")
    spool_keys = r.mapping(keys.get("spool"), "gateway.spool", ("path", "encryption_key"),
                           example="{path: var/spool, encryption_key: pki/spool.key}")
    if spool_keys is not None:
        path = r.path(spool_keys["path"], "gateway.spool.path") if "path" in spool_keys else None
        key = (r.path(spool_keys["encryption_key"], "gateway.spool.encryption_key")
               if "encryption_key" in spool_keys else None)
        spool = SpoolSettings(path or spool.path, key)

    audit = AuditSettings(r.base / "var" / "audit")
    audit_keys = r.mapping(keys.get("audit"), "gateway.audit", ("path", "retention"),
                           example="{path: var/audit, retention: 183d}")
    if audit_keys is not None:
        path = r.path(audit_keys["path"], "gateway.audit.path") if "path" in audit_keys else None
        retention = (r.duration(audit_keys["retention"], "gateway.audit.retention")
                     if "retention" in audit_keys else None)
        audit = AuditSettings(path or audit.path, retention or audit.retention)

    metrics = None
    metrics_keys = r.mapping(keys.get("metrics"), "gateway.metrics", ("address", "port"),
                             required=("port",), example="{address: 127.0.0.1, port: 9464}")
    if metrics_keys is not None:
        address = (r.host(metrics_keys["address"], "gateway.metrics.address")
                   if "address" in metrics_keys else "127.0.0.1")
        port = (r.integer(metrics_keys["port"], "gateway.metrics.port", 1, 65535)
                if "port" in metrics_keys else None)
        if address is not None and port is not None:
            metrics = MetricsSettings(address, port)
            if (address, port) in seen:
                r.report(metrics_keys["port"], f"gateway.metrics: {address} port {port} is "
                         "already an SMTP listener; choose another port")

    max_size = 25 * 1024 * 1024
    if "max_message_size" in keys:
        max_size = r.size(keys["max_message_size"], "gateway.max_message_size") or max_size

    retry = RetrySettings()
    retry_keys = r.mapping(keys.get("retry"), "gateway.retry", ("schedule", "give_up_after"),
                           example="{schedule: [1m, 5m, 15m, 1h, 4h], give_up_after: 5d}")
    if retry_keys is not None:
        schedule = retry.schedule
        if "schedule" in retry_keys:
            items = r.items(retry_keys["schedule"], "gateway.retry.schedule")
            delays = [r.duration(i, "gateway.retry.schedule") for i in items]
            if not items:
                r.report(retry_keys["schedule"], "gateway.retry.schedule is empty; list the "
                         "intervals between attempts, as in [1m, 5m, 15m, 1h, 4h]")
            elif all(d is not None for d in delays):
                schedule = tuple(d for d in delays if d is not None)
        give_up = retry.give_up_after
        if "give_up_after" in retry_keys:
            give_up = r.duration(retry_keys["give_up_after"],
                                 "gateway.retry.give_up_after") or give_up
        retry = RetrySettings(schedule, give_up)

    workers = WorkerSettings()
    worker_keys = r.mapping(keys.get("workers"), "gateway.workers", ("kind", "count"),
                            example="{kind: auto, count: 2}")
    if worker_keys is not None:
        kind = (r.choice(worker_keys["kind"], "gateway.workers.kind", _WORKER_KINDS)
                if "kind" in worker_keys else "auto")
        count = (r.integer(worker_keys["count"], "gateway.workers.count", 1, 256)
                 if "count" in worker_keys else None)
        if kind is not None:
            workers = WorkerSettings(kind, count)
    return GatewaySettings(hostname, tuple(listen), tls, spool, audit, metrics, max_size, retry,
                           workers)


def _listener(r: _Reader, node: yaml.Node, where: str) -> Listener | None:
    r.lines[where] = _line(node)
    keys = r.mapping(node, where, ("address", "port", "tls", "client_certificate"),
                     required=("address", "port"),
                     example="{address: 127.0.0.1, port: 2525, tls: starttls}")
    if keys is None:
        return None
    address = r.host(keys["address"], f"{where}.address") if "address" in keys else None
    port = r.integer(keys["port"], f"{where}.port", 1, 65535) if "port" in keys else None
    tls: TlsMode | None = "starttls"
    if "tls" in keys:
        tls = r.choice(keys["tls"], f"{where}.tls", _TLS_MODES)
    client: ClientCertificate | None = "optional"
    if "client_certificate" in keys:
        client = r.choice(keys["client_certificate"], f"{where}.client_certificate",
                          _CLIENT_CERTIFICATES)
    if address is None or port is None or tls is None or client is None:
        return None
    if tls == "none" and client != "none" and "client_certificate" in keys:
        r.report(keys["client_certificate"], f"{where}: a client certificate needs TLS; write "
                 "tls: starttls or implicit, or client_certificate: none")
    return Listener(address, port, tls, client)


def _trust(r: _Reader, node: yaml.Node | None) -> TrustSettings:
    keys = r.mapping(node, "trust", ("anchors", "crls", "mssante_whitelist"),
                     example="{anchors: [pki/ca.pem], crls: [pki/ca.crl]}") or {}
    lists: dict[str, tuple[Path, ...]] = {}
    for name in ("anchors", "crls"):
        paths = []
        for index, item in enumerate(r.items(keys.get(name), f"trust.{name}")):
            r.lines[f"trust.{name}.{index}"] = _line(item)
            path = r.path(item, f"trust.{name}")
            if path is not None:
                paths.append(path)
        lists[name] = tuple(paths)
    whitelist = None
    if "mssante_whitelist" in keys:
        whitelist = r.path(keys["mssante_whitelist"], "trust.mssante_whitelist")
    return TrustSettings(lists["anchors"], lists["crls"], whitelist)


def _keys(r: _Reader, node: yaml.Node | None) -> dict[str, KeySettings]:
    entries = r.mapping(node, "keys", (), extra=True,
                        example="{medecin-smime: {certificate: ..., key: ...}}") or {}
    result: dict[str, KeySettings] = {}
    for name, item in entries.items():
        where = f"keys.{name}"
        fields = r.mapping(item, where, ("certificate", "key", "secret_key"),
                           example="{certificate: pki/x.pem, key: pki/x.key} or "
                                   "{secret_key: pki/x.asc}")
        if fields is None:
            continue
        paths = {k: r.path(v, f"{where}.{k}") for k, v in fields.items()}
        if not fields:
            r.report(item, f"{where} is empty; give certificate and key (X.509) or "
                     "secret_key (OpenPGP)")
        elif ("certificate" in fields) != ("key" in fields):
            missing = "key" if "certificate" in fields else "certificate"
            r.report(item, f"{where}: {missing} is missing; an X.509 identity needs both "
                     "certificate and key")
        result[name] = KeySettings(name, paths.get("certificate"), paths.get("key"),
                                   paths.get("secret_key"))
    return result


def _peers(
    r: _Reader, node: yaml.Node | None, where: str, trust: TrustSettings
) -> PeerRule:
    keys = r.mapping(node, where, ("whitelist", "subjects", "addresses"),
                     example="{whitelist: mssante} or {subjects: [...], addresses: [...]}")
    if keys is None:
        return PeerRule()
    whitelist = None
    if "whitelist" in keys:
        whitelist = r.choice(keys["whitelist"], f"{where}.whitelist", ("mssante",))
        if whitelist is not None and trust.mssante_whitelist is None:
            r.report(keys["whitelist"], f"{where}: whitelist: mssante needs the list; add "
                     "trust.mssante_whitelist: data/listeblanchemssante.xml")
    subjects = []
    for item in r.items(keys.get("subjects"), f"{where}.subjects"):
        text = r.text(item, f"{where}.subjects")
        if text is None:
            continue
        try:
            parse_dn(text)
        except ValueError as error:
            r.report(item, f"{where}.subjects: {error}; write the full subject, as in "
                     "\"CN=mx.example.fr,OU=...,O=...,C=FR\"")
            continue
        subjects.append(text)
    addresses = []
    for item in r.items(keys.get("addresses"), f"{where}.addresses"):
        text = r.text(item, f"{where}.addresses")
        if text is None:
            continue
        try:
            addresses.append(ipaddress.ip_network(text, strict=True))
        except ValueError:
            try:
                hint = f"; did you mean {ipaddress.ip_network(text, strict=False)}?"
            except ValueError:
                hint = "; write an IP address (192.0.2.1) or a network (192.0.2.0/24)"
            r.report(item, f"{where}.addresses: {text!r} is not an address or network{hint}")
    return PeerRule(whitelist, tuple(subjects), tuple(addresses))


def _relay(r: _Reader, node: yaml.Node | None, where: str, trust: TrustSettings
           ) -> RelaySettings | None:
    keys = r.mapping(node, where, ("host", "port", "tls", "whitelist"), required=("host",),
                     example="{host: mx.example.org, port: 25, tls: required}")
    if keys is None or "host" not in keys:
        return None
    host = r.host(keys["host"], f"{where}.host")
    port = r.integer(keys["port"], f"{where}.port", 1, 65535) if "port" in keys else 25
    tls: RelayTls | None = "required"
    if "tls" in keys:
        tls = r.choice(keys["tls"], f"{where}.tls", _RELAY_TLS)
    whitelist = None
    if "whitelist" in keys:
        whitelist = r.choice(keys["whitelist"], f"{where}.whitelist", ("mssante",))
        if whitelist is not None and trust.mssante_whitelist is None:
            r.report(keys["whitelist"], f"{where}: whitelist: mssante needs the list; add "
                     "trust.mssante_whitelist: data/listeblanchemssante.xml")
        if whitelist is not None and tls != "required":
            r.report(keys["whitelist"], f"{where}: the whitelist check reads the next hop's "
                     "certificate; write tls: required")
    if host is None or port is None or tls is None:
        return None
    return RelaySettings(host, port, tls, whitelist)


def _network(
    r: _Reader, name: str, node: yaml.Node, trust: TrustSettings, keys: Mapping[str, KeySettings]
) -> NetworkSettings | None:
    from adapters import REGISTRY  # here, not at the top: adapters import gateway modules

    where = f"network {name!r}"
    dotted = f"networks.{name}"
    fields = r.mapping(node, dotted, _NETWORK, extra=True, required=("adapter", "domains"),
                       example="{adapter: mime, domains: [example.org], relay: {host: ...}}")
    if fields is None:
        return None
    line = r.lines.get(dotted, _line(node))
    if "name" in fields:
        written = r.text(fields["name"], f"{dotted}.name")
        if written is not None and written != name:
            r.report(fields["name"], f"{where}: name: {written!r} differs from the key "
                     f"{name!r}; remove name:, the key is the network's name")
    adapter_name = r.text(fields["adapter"], f"{dotted}.adapter") if "adapter" in fields else None
    adapter = None
    if adapter_name is not None:
        adapter = REGISTRY.get(adapter_name)
        if adapter is None:
            r.report(fields["adapter"], f"{where}: unknown adapter {adapter_name!r}"
                     f"{_suggest(adapter_name, REGISTRY)}")
    domains: list[str] = []
    domain_items = r.items(fields.get("domains"), f"{dotted}.domains")
    for item in domain_items:
        text = r.text(item, f"{dotted}.domains")
        if text is None:
            continue
        try:
            domain = normalize_domain(text)
        except ValueError as error:
            r.report(item, f"{where}: {error}")
            continue
        if domain in domains:
            r.report(item, f"{where}: domain {domain} is listed twice", "warning")
            continue
        domains.append(domain)
        r.lines[f"{dotted}.domains.{domain}"] = _line(item)
    if "domains" in fields and not domain_items:
        r.report(fields["domains"], f"{where}: domains is empty; list the mail domains this "
                 "network owns")
    peers = _peers(r, fields.get("peers"), f"{dotted}.peers", trust)
    relay = _relay(r, fields.get("relay"), f"{dotted}.relay", trust)
    identity = None
    if "identity" in fields:
        identity = r.text(fields["identity"], f"{dotted}.identity")
        if identity is not None and identity not in keys:
            r.report(fields["identity"], f"{where}: identity {identity!r} is not defined under "
                     f"keys:{_suggest(identity, keys)}")
            identity = None
    require = Requirements()
    require_fields = r.mapping(fields.get("require"), f"{dotted}.require",
                               ("signature", "encryption"),
                               example="{signature: true, encryption: true}")
    if require_fields is not None:
        flags = {k: r.boolean(v, f"{dotted}.require.{k}") for k, v in require_fields.items()}
        require = Requirements(bool(flags.get("signature")), bool(flags.get("encryption")))
    limits = Limits()
    limit_fields = r.mapping(fields.get("limits"), f"{dotted}.limits",
                             ("connections_per_peer", "concurrency"),
                             example="{connections_per_peer: 20, concurrency: 10}")
    if limit_fields is not None:
        numbers = {k: r.integer(v, f"{dotted}.limits.{k}", 1, 10000)
                   for k, v in limit_fields.items()}
        limits = Limits(numbers.get("connections_per_peer") or limits.connections_per_peer,
                        numbers.get("concurrency") or limits.concurrency)

    options: dict[str, object] = {}
    option_lines: dict[str, int] = {}
    for key, value in fields.items():
        if key in _NETWORK:
            continue
        close = difflib.get_close_matches(key, _NETWORK, n=1, cutoff=0.8)
        if close:
            # A typo of a generic key would otherwise reach the adapter as an option and be
            # reported as "not known to the adapter", which hides the real mistake.
            r.report(r.lines[f"{dotted}.{key}"], f"{where}: unknown key {key!r} (did you mean "
                     f"{close[0]!r}?)")
            continue
        options[key] = r.plain(value, f"{dotted}.{key}")
        option_lines[key] = r.lines[f"{dotted}.{key}"]
    if adapter is not None:
        for message in adapter.option_problems(options):
            # Point at the option the sentence names: quoted first, then as a bare word.
            spot = next((option_lines[k] for k in options if repr(k) in message), None) or next(
                (option_lines[k] for k in options if re.search(rf"\b{re.escape(k)}\b", message)),
                line)
            r.report(spot, f"{where}: {message}")
    options = _resolve_option_paths(r, options)
    # A network with a faulty adapter is still returned, so that routes naming it are not
    # also reported as naming an unknown network.
    return NetworkSettings(name, adapter_name or "", tuple(domains), peers, relay, identity,
                           require, limits, options, line)


def _resolve_option_paths(r: _Reader, options: dict[str, object]) -> dict[str, object]:
    resolved = dict(options)
    for key in _PATH_OPTIONS:
        value = resolved.get(key)
        if isinstance(value, str):
            resolved[key] = str(r.resolve(value))
    for key in _PATH_MAP_OPTIONS:
        value = resolved.get(key)
        if isinstance(value, dict):
            resolved[key] = {
                k: str(r.resolve(v)) if isinstance(v, str) else v for k, v in value.items()
            }
    return resolved


def _networks(
    r: _Reader, node: yaml.Node | None, root: yaml.Node, trust: TrustSettings,
    keys: Mapping[str, KeySettings],
) -> dict[str, NetworkSettings]:
    if node is None:
        r.report(root, "networks: is missing; define at least one network")
        return {}
    entries = r.mapping(node, "networks", (), extra=True,
                        example="{hospital: {adapter: mime, domains: [...]}}") or {}
    networks: dict[str, NetworkSettings] = {}
    claimed: dict[str, str] = {}  # domain or pattern → network
    for name, item in entries.items():
        network = _network(r, name, item, trust, keys)
        if network is None:
            continue
        networks[name] = network
        for domain in network.domains:
            owner = claimed.setdefault(domain, name)
            if owner != name:
                r.report(r.lines.get(f"networks.{name}.domains.{domain}", network.line),
                         f"network {name!r}: domain {domain} is already claimed by network "
                         f"{owner!r} (line {r.lines.get(f'networks.{owner}.domains.{domain}')}); "
                         "a domain belongs to one network, remove it from one of them")
    return networks


def _routes(
    r: _Reader, node: yaml.Node | None, root: yaml.Node, networks: Mapping[str, NetworkSettings]
) -> tuple[Route, ...]:
    if node is None:
        r.report(root, "routes: is missing, so every message will be refused; add routes such "
                 "as - {from: hospital, to: [medecin]}", "warning")
        return ()
    routes: list[Route] = []
    items = r.items(node, "routes")
    if not items:
        r.report(node, "routes: is empty, so every message will be refused", "warning")
    for index, item in enumerate(items):
        where = f"routes.{index}"
        r.lines[where] = _line(item)
        fields = r.mapping(item, where, ("from", "to"), required=("from", "to"),
                           example="{from: hospital, to: [medecin, apicrypt]}")
        if not fields or "from" not in fields or "to" not in fields:
            continue
        source = r.text(fields["from"], f"{where}.from")
        if source is not None and source not in networks:
            r.report(fields["from"], f"route: from: names unknown network {source!r}"
                     f"{_suggest(source, networks)}; define it under networks: or fix the name")
            source = None
        destinations: list[str] = []
        for target in r.items(fields["to"], f"{where}.to"):
            name = r.text(target, f"{where}.to")
            if name is None:
                continue
            if name not in networks:
                r.report(target, f"route from {source or '?'!r}: to: names unknown network "
                         f"{name!r}{_suggest(name, networks)}; define it under networks: or "
                         "fix the name")
                continue
            if networks[name].relay is None:
                r.report(target, f"route from {source or '?'!r} to {name!r}: network {name!r} "
                         "has no relay: to deliver to; add relay: {host: ..., port: ...}")
            if name not in destinations:
                destinations.append(name)
        if source is not None and destinations:
            routes.append(Route(source, tuple(destinations)))
    return tuple(routes)


# Networks whose outgoing mail is always signed and encrypted (DESIGN.md §5), and the kind of
# key the gateway signs with for each.
_SIGNING_ADAPTERS = {"smime": "certificate", "openpgp": "secret_key", "apicrypt": "secret_key"}


def _cross_checks(r: _Reader, gateway: GatewaySettings, keys: Mapping[str, KeySettings],
                  networks: Mapping[str, NetworkSettings], routes: tuple[Route, ...]) -> None:
    destinations = {d for route in routes for d in route.destinations}
    for network in networks.values():
        dotted = f"networks.{network.name}"
        kind = _SIGNING_ADAPTERS.get(network.adapter)
        if network.adapter == "apicrypt" and network.options.get("codec") == "external":
            kind = None  # the licensed APICEM programs hold their own keys
        if kind is None:
            continue
        if network.identity is None:
            if network.name in destinations and f"{dotted}.identity" not in r.lines:
                r.report(network.line, f"network {network.name!r}: mail to a {network.adapter} "
                         "network is signed by the gateway; add identity: naming an entry "
                         "of keys:")
            continue
        entry = keys[network.identity]
        has = entry.certificate is not None if kind == "certificate" else (
            entry.secret_key is not None)
        if not has:
            wanted = ("X.509 certificate and key" if kind == "certificate"
                      else "OpenPGP secret_key")
            r.report(r.lines.get(f"{dotted}.identity", network.line),
                     f"network {network.name!r}: identity {network.identity!r} has no "
                     f"{wanted}, which the {network.adapter} adapter signs with")
    subject_rules = [n for n in networks.values() if n.peers.subjects or n.peers.whitelist]
    if subject_rules and gateway.listen and all(
        listener.tls == "none" or listener.client_certificate == "none"
        for listener in gateway.listen
    ):
        r.report(subject_rules[0].line, f"network {subject_rules[0].name!r}: peers are "
                 "recognised by certificate, but no listener asks for a client certificate; "
                 "set client_certificate: optional or required", "warning")


def parse(path: Path) -> tuple[Config | None, list[Problem]]:
    """Read routing.yaml: the Config (None if the file could not be read as YAML at all) and
    every problem found, in file order. The Config is built even when there are errors, with
    the faulty parts left out or at their defaults, so that the file checks can still run."""
    base = path.absolute().parent
    try:
        data = path.read_bytes()
    except OSError as error:
        return None, [Problem(path, 0, f"cannot read the file: {error.strerror or error}")]
    try:
        root = yaml.compose(data, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        line = mark.line + 1 if mark is not None else 0
        detail = " ".join(str(p) for p in (error.context, error.problem) if p)
        return None, [Problem(path, line, f"YAML syntax: {detail}; check the indentation, "
                              "colons, brackets and quotes (a value starting with * must be "
                              "quoted)")]
    except yaml.YAMLError as error:
        return None, [Problem(path, 0, f"YAML syntax: {error}")]
    if root is None:
        return None, [Problem(path, 0, "the file is empty; start with version: 1")]

    r = _Reader(path, base)
    top = r.mapping(root, "", _TOP)
    if top is None:
        return None, r.problems
    if "version" not in top:
        r.report(root, "version: is missing; write version: 1 at the top")
        version = 1
    else:
        version_text = r.text(top["version"], "version")
        if version_text is not None and version_text != "1":
            r.report(top["version"], f"version {version_text} is not supported; this gateway "
                     "reads version: 1")
        version = 1
    gateway = _gateway(r, top.get("gateway"), root)
    trust = _trust(r, top.get("trust"))
    keys = _keys(r, top.get("keys"))
    directory: list[Path] = []
    for index, item in enumerate(r.items(top.get("directory"), "directory")):
        r.lines[f"directory.{index}"] = _line(item)
        folder = r.path(item, "directory")
        if folder is not None:
            directory.append(folder)
    networks = _networks(r, top.get("networks"), root, trust, keys)
    routes = _routes(r, top.get("routes"), root, networks)
    _cross_checks(r, gateway, keys, networks, routes)
    config = Config(path, version, gateway, trust, keys, tuple(directory), networks, routes,
                    lines=dict(r.lines))
    return config, sorted(r.problems, key=lambda p: p.line)


def load(path: Path) -> Config:
    """The Config of routing.yaml at `path`; ConfigError lists every error (and warning)."""
    config, problems = parse(path)
    if config is None or any(p.severity == "error" for p in problems):
        raise ConfigError(problems)
    return config
