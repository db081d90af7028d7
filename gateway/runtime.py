"""Everything the running gateway derives from routing.yaml, loaded and checked as one unit.

A reload builds a new `Runtime` and swaps it in only if `gateway check` finds no error, so a
message is always handled under one coherent configuration: sessions and deliveries already
in progress keep the `Runtime` they started with.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

from adapters.base import Identity, TrustStore, UnwrapContext, WrapContext
from gateway import check, pki
from gateway.config import Config, NetworkSettings
from gateway.peers import Whitelist

__all__ = ["ConfigurationRefused", "Runtime"]


class ConfigurationRefused(Exception):
    """routing.yaml (or a file it names) has errors; the message lists them."""


@dataclass(frozen=True)
class Runtime:
    config: Config
    keyring: pki.KeyRing
    whitelist: Whitelist | None = None

    @staticmethod
    def load(path: Path, now: dt.datetime | None = None) -> Runtime:
        now = now or dt.datetime.now(dt.UTC)
        report = check.run_check(path, now)
        if not report.ok:
            raise ConfigurationRefused(
                "\n".join(str(p) for p in report.problems if p.severity == "error")
            )
        config = report.config
        assert config is not None
        keyring = pki.load_keyring(config, now)
        whitelist = None
        if config.trust.mssante_whitelist is not None:
            from gateway.whitelist import load_whitelist

            whitelist = load_whitelist(config.trust.mssante_whitelist)
        return Runtime(config, keyring, whitelist)

    def identity(self, network: NetworkSettings) -> Identity | None:
        if network.identity is None:
            return None
        return self.keyring.identities.get(network.identity)

    @property
    def trust(self) -> TrustStore:
        return self.keyring.trust

    def unwrap_context(self, network: NetworkSettings, now: dt.datetime) -> UnwrapContext:
        return UnwrapContext(
            network=network.name,
            identity=self.identity(network),
            trust=self.keyring.trust,
            directory=self.keyring.directory,
            now=now,
            options=network.options,
        )

    def wrap_context(
        self, network: NetworkSettings, sender: str, recipients: tuple[str, ...],
        now: dt.datetime,
    ) -> WrapContext:
        return WrapContext(
            network=network.name,
            identity=self.identity(network),
            trust=self.keyring.trust,
            directory=self.keyring.directory,
            now=now,
            sender=sender,
            recipients=recipients,
            options=network.options,
        )
