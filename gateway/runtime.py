"""Everything the running gateway derives from routing.yaml, loaded and checked as one unit.

A reload builds a new `Runtime` and swaps it in only if `gateway check` finds no error, so a
message is always handled under one coherent configuration: sessions and deliveries already
in progress keep the `Runtime` they started with.

One exception, for the MSSanté whitelist, which is downloaded and replaced on its own schedule:
when the new list is the only thing wrong (unreadable, cut short, checksum mismatch), the
reload goes ahead with the last list that loaded from that path in this process, and says so
at ERROR level each time. At start there is no last good list, so a broken list refuses to
start: the gateway never serves without the list it was told to enforce.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization

from adapters.base import Identity, TrustStore, UnwrapContext, WrapContext
from gateway import check, pki
from gateway import whitelist as mssante
from gateway.config import Config, NetworkSettings
from gateway.peers import Whitelist

__all__ = ["ConfigurationRefused", "Runtime", "key_fingerprint"]

log = logging.getLogger("gateway.runtime")


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
        whitelist: Whitelist | None = report.whitelist
        kept = _last_good_whitelist(report)
        if not report.ok and kept is None:
            raise ConfigurationRefused(
                "\n".join(str(p) for p in report.problems if p.severity == "error")
            )
        config = report.config
        assert config is not None
        keyring = pki.load_keyring(config, now)
        if kept is not None:
            whitelist = kept
        elif report.whitelist is not None and config.trust.mssante_whitelist is not None:
            mssante.remember(config.trust.mssante_whitelist, report.whitelist)
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


def _last_good_whitelist(report: check.CheckReport) -> mssante.MssanteWhitelist | None:
    """The list to keep when the new one is the only error, else None."""
    config = report.config
    if report.ok or config is None or config.trust.mssante_whitelist is None:
        return None
    if any(p not in report.whitelist_problems for p in report.errors):
        return None
    kept = mssante.last_good(config.trust.mssante_whitelist)
    if kept is not None:
        log.error(
            "the MSSanté whitelist %s cannot be used, keeping the last good list "
            "(%d entries, generated %s) until it is fixed:\n%s",
            config.trust.mssante_whitelist, len(kept), kept.generated or "at an unknown date",
            "\n".join(str(p) for p in report.errors),
        )
    return kept


def key_fingerprint(keyring: pki.KeyRing) -> str:
    """A digest of the key material a `Runtime` holds: two loads of one configuration (the
    gateway's and a crypto worker process's) read the same files exactly when they agree."""
    digest = hashlib.sha256()

    def add(label: str, data: bytes) -> None:
        digest.update(label.encode() + b"\0" + len(data).to_bytes(8, "big") + data)

    for name, identity in sorted(keyring.identities.items()):
        add("identity", name.encode())
        for certificate in (identity.certificate, *identity.chain):
            if certificate is not None:
                add("certificate", certificate.public_bytes(serialization.Encoding.DER))
        if identity.private_key is not None:
            # The public half identifies the key pair without digesting the secret itself.
            add("key", identity.private_key.public_key().public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo))
        if identity.openpgp_secret is not None:
            add("openpgp", hashlib.sha256(identity.openpgp_secret).digest())
    for anchor in keyring.trust.anchors:
        add("anchor", anchor.public_bytes(serialization.Encoding.DER))
    for crl in keyring.trust.crls:
        add("crl", crl.public_bytes(serialization.Encoding.DER))
    for certificate in keyring.directory.x509:
        add("directory", certificate.public_bytes(serialization.Encoding.DER))
    for key in keyring.directory.openpgp:
        add("directory-openpgp", key)
    add("tls", f"{keyring.tls_certificate}|{keyring.tls_key}".encode())
    if keyring.spool_key is not None:
        add("spool", hashlib.sha256(keyring.spool_key).digest())
    return digest.hexdigest()
