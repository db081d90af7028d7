"""`gateway check`: routing.yaml and every file it names, checked in one run (DESIGN.md §3).

    run_check(path, now) -> CheckReport
        routing.yaml itself   gateway.config.parse (keys, values, networks, routes...)
        key material          gateway.pki.inspect  (files, key/certificate pairs, CRLs...)
        MSSanté whitelist     gateway.whitelist    (readable, entries well formed, its SHA-256
                                                    checksum file when there is one)

Problems come back in file order, each with its line. Errors make the report fail (and a
SIGHUP reload keep the running configuration); warnings are shown and do not.

Untrusted input: routing.yaml and every file it names, read through the modules above.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

from gateway import pki
from gateway.config import Config, Problem, Severity, parse
from gateway.dn import dn_from_name
from gateway.whitelist import MssanteWhitelist, WhitelistError, load_whitelist, verify_checksum

__all__ = ["CheckReport", "run_check"]

# Whitelist entries that cannot be read are listed one by one up to this many, then counted.
_WHITELIST_DETAILS = 5


@dataclass(frozen=True)
class CheckReport:
    path: Path
    problems: tuple[Problem, ...]
    # The configuration, when routing.yaml itself has no error (file problems may remain:
    # look at `ok` before using it to serve).
    config: Config | None = None
    keyring: pki.KeyRing | None = None
    # The MSSanté list as loaded (None when not configured or unusable), so that serving does
    # not parse it twice, and the problems found with it, so that a reload can tell "only the
    # new list is broken" (keep the last good list) from a broken configuration.
    whitelist: MssanteWhitelist | None = None
    whitelist_problems: tuple[Problem, ...] = ()

    @property
    def ok(self) -> bool:
        return not self.errors

    @property
    def errors(self) -> tuple[Problem, ...]:
        return tuple(p for p in self.problems if p.severity == "error")

    @property
    def warnings(self) -> tuple[Problem, ...]:
        return tuple(p for p in self.problems if p.severity == "warning")

    def summary(self) -> str:
        """What the gateway will do with this file, in a few lines (for a clean check)."""
        config = self.config
        if config is None:
            return f"{self.path}: {len(self.errors)} error(s)"
        lines = [
            f"{self.path}: "
            + ("OK" if self.ok else f"{len(self.errors)} error(s)")
            + (f", {len(self.warnings)} warning(s)" if self.warnings else "")
            + f" — {len(config.networks)} network(s), {len(config.routes)} route(s), "
            f"{len(config.gateway.listen)} listener(s), {len(config.keys)} identity(ies)"
        ]
        lines.append("networks:")
        width = max((len(n) for n in config.networks), default=0)
        for network in config.networks.values():
            count = len(network.domains)
            relay = network.relay
            where = (f"relay {relay.host}:{relay.port} tls {relay.tls}" if relay is not None
                     else "no relay")
            lines.append(f"  {network.name:<{width}}  {network.adapter:<8} "
                         f"{count} domain{'s' if count != 1 else ''}, {where}")
        lines.append("routes:")
        for route in config.routes:
            lines.append(f"  {route.source} -> {', '.join(route.destinations)}")
        if not config.routes:
            lines.append("  none: every message is refused")
        lines.append("listeners:")
        for listener in config.gateway.listen:
            lines.append(f"  {listener.address}:{listener.port}  {listener.tls}, client "
                         f"certificate {listener.client_certificate}")
        if config.keys:
            lines.append("identities:")
        width = max((len(n) for n in config.keys), default=0)
        for name in config.keys:
            lines.append(f"  {name:<{width}}  {self._identity(name)}")
        return "\n".join(lines)

    def _identity(self, name: str) -> str:
        identity = self.keyring.identities.get(name) if self.keyring is not None else None
        if identity is None:
            return "not loaded"
        parts = []
        if identity.certificate is not None:
            expires = identity.certificate.not_valid_after_utc.strftime("%Y-%m-%d")
            parts.append(f"X.509 {dn_from_name(identity.certificate.subject)}, "
                         f"expires {expires}")
        if identity.openpgp_secret is not None:
            parts.append("OpenPGP secret key")
        return "; ".join(parts) or "no usable key"


def run_check(path: Path, now: dt.datetime) -> CheckReport:
    """Check routing.yaml at `path` and everything it names, as of `now`."""
    config, found = parse(path)
    if config is None:
        return CheckReport(path, tuple(found))
    config_ok = not any(p.severity == "error" for p in found)
    keyring, file_problems = pki.inspect(config, now)
    whitelist, listed = _whitelist_problems(config)
    found = found + file_problems + listed
    found.sort(key=lambda p: p.line)
    return CheckReport(path, tuple(found), config if config_ok else None, keyring,
                       whitelist, tuple(listed))


def _whitelist_problems(config: Config) -> tuple[MssanteWhitelist | None, list[Problem]]:
    path = config.trust.mssante_whitelist
    if path is None:
        return None, []
    line = config.line("trust.mssante_whitelist")
    download = "download it again from https://espacedeconfiance.mssante.fr/listeblanchemssante.xml"

    def problem(message: str, severity: Severity = "error") -> Problem:
        return Problem(config.path, line, f"trust.mssante_whitelist: {message}", severity)

    try:
        whitelist = load_whitelist(path)
    except WhitelistError as error:
        return None, [problem(f"{error}; {download}")]
    problems: list[Problem] = []
    checksum = verify_checksum(path, whitelist)
    if not checksum.ok:
        # A list that does not match its published digest may have been altered: it decides
        # who may send health data, so it is refused, not warned about.
        problems.append(problem(f"{checksum.message}; {download} with its checksum"))
    if not whitelist.complete:
        problems.append(problem(
            "the list ends without its closing </ListeBlancheMSSante> tag (as the ANS "
            f"publishes it); loaded anyway, {len(whitelist)} entries", "warning"))
    problems += [problem(f"entry skipped: {text}", "warning")
                 for text in whitelist.problems[:_WHITELIST_DETAILS]]
    rest = len(whitelist.problems) - _WHITELIST_DETAILS
    if rest > 0:
        problems.append(problem(f"{rest} more entries skipped", "warning"))
    if any(p.severity == "error" for p in problems):
        return None, problems
    return whitelist, problems
