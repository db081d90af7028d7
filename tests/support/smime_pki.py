"""An S/MIME test PKI on top of the shared generator, plus helpers to drive `openssl cms`.

RSA keys are slow to generate, so a small pool is made once per process and reused; EC keys
are generated on demand. Everything is in memory until a test writes it to its tmp_path for
openssl.
"""

from __future__ import annotations

import datetime as dt
import functools
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID

from adapters.base import Directory, Identity, TrustStore, UnwrapContext, WrapContext
from gateway.config import (
    AuditSettings,
    Config,
    GatewaySettings,
    NetworkSettings,
    PeerRule,
    Requirements,
    RetrySettings,
    Route,
    SpoolSettings,
    TrustSettings,
)
from gateway.pki import KeyRing
from gateway.runtime import Runtime
from tests.support.testpki import NOW, Issued, name, root

__all__ = [
    "NOW",
    "OPENSSL",
    "SmimePki",
    "fixed_random",
    "identity",
    "openssl",
    "rsa_key",
    "smime_runtime",
    "unwrap_context",
    "wrap_context",
]

OPENSSL = shutil.which("openssl")


@functools.cache
def _rsa_pool() -> tuple[rsa.RSAPrivateKey, ...]:
    return tuple(
        rsa.generate_private_key(public_exponent=65537, key_size=2048) for _ in range(6)
    )


def rsa_key(index: int) -> rsa.RSAPrivateKey:
    """One of a few RSA-2048 keys made once per test process."""
    return _rsa_pool()[index % 6]


def fixed_random(seed: int = 7) -> Callable[[int], bytes]:
    """A deterministic stand-in for os.urandom (tests only)."""
    import random

    generator = random.Random(seed)
    return lambda n: generator.randbytes(n)


def openssl(*args: str | Path, data: bytes | None = None, check: bool = True) -> bytes:
    """Run openssl; returns stdout, raises with stderr when `check` and it fails."""
    assert OPENSSL is not None
    done = subprocess.run(
        [OPENSSL, *map(str, args)], input=data, capture_output=True, timeout=60, check=False
    )
    if check and done.returncode != 0:
        raise AssertionError(f"openssl {' '.join(map(str, args))}: {done.stderr.decode()}")
    return done.stdout


@dataclass
class SmimePki:
    """Root → intermediate → people, RSA by default; CRLs made on request."""

    root: Issued
    intermediate: Issued
    people: dict[str, Issued] = field(default_factory=dict)

    @staticmethod
    def create() -> SmimePki:
        ca = root(name(CN="TEST AC RACINE SANTE", O="TEST", C="FR"), key_kind="ec")
        inter = ca.issue(name(CN="TEST AC PERSONNES", O="TEST", C="FR"), ca=True)
        return SmimePki(ca, inter)

    def person(
        self,
        address: str,
        *,
        key: CertificateIssuerPrivateKeyTypes | None = None,
        curve: ec.EllipticCurve | None = None,
        eku: list[x509.ObjectIdentifier] | None = None,
        not_before: dt.datetime | None = None,
        not_after: dt.datetime | None = None,
        issuer: Issued | None = None,
        key_usage: str = "auto",
    ) -> Issued:
        if key is None:
            key = ec.generate_private_key(curve) if curve else rsa_key(len(self.people))
        issued = (issuer or self.intermediate).issue(
            name(CN=address.split("@")[0], O="TEST", C="FR"),
            key=key, emails=[address],
            eku=eku if eku is not None else [ExtendedKeyUsageOID.EMAIL_PROTECTION],
            not_before=not_before, not_after=not_after, key_usage=key_usage,
        )
        self.people[address] = issued
        return issued

    def trust(self, *, crls: bool = False) -> TrustStore:
        lists = (self.root.crl(), self.intermediate.crl()) if crls else ()
        return TrustStore(anchors=(self.root.certificate,), crls=lists)

    def directory(self, *people: Issued) -> Directory:
        return Directory(x509=(self.intermediate.certificate, *(p.certificate for p in people)))

    def write(self, directory: Path) -> dict[str, Path]:
        """PEM files for openssl: CA file, and each person's cert, key and chain."""
        paths = {"ca": directory / "ca.pem"}
        paths["ca"].write_bytes(self.root.cert_pem)
        (directory / "inter.pem").write_bytes(self.intermediate.cert_pem)
        paths["inter"] = directory / "inter.pem"
        for address, person in self.people.items():
            stem = address.replace("@", "_at_")
            cert, key = person.write(directory, stem)
            paths[f"{address}.cert"], paths[f"{address}.key"] = cert, key
        return paths


def identity(person: Issued, pki: SmimePki, name_: str = "medecin-smime") -> Identity:
    return Identity(
        name=name_, certificate=person.certificate, private_key=person.key,
        chain=(pki.intermediate.certificate,),
    )


def unwrap_context(
    pki: SmimePki, *, me: Issued | None = None, trust: TrustStore | None = None,
    directory: Directory | None = None, now: dt.datetime = NOW,
) -> UnwrapContext:
    return UnwrapContext(
        network="medecin", identity=identity(me, pki) if me else None,
        trust=trust or pki.trust(), directory=directory or pki.directory(), now=now,
    )


def wrap_context(
    pki: SmimePki, me: Issued, recipients: tuple[str, ...], *,
    options: dict[str, object] | None = None, trust: TrustStore | None = None,
    directory: Directory | None = None, now: dt.datetime = NOW,
) -> WrapContext:
    return WrapContext(
        network="medecin", identity=identity(me, pki), trust=trust or pki.trust(),
        directory=directory or pki.directory(*pki.people.values()), now=now,
        sender="gw@passerelle.test", recipients=recipients, options=options or {},
        random=fixed_random(),
    )


def smime_runtime(
    pki: SmimePki, gateway: Issued, *, trust: TrustStore, directory: Directory | None = None,
    require: Requirements | None = None, root: Path = Path("/nonexistent"),
    retry: RetrySettings | None = None,
) -> Runtime:
    """A Runtime without files: hospital (mime, chu-test.fr) <-> medecin (smime, medecin.fr),
    the gateway's medecin identity `gateway`, and the trust store given (a CRL refresh is a
    new Runtime with a new TrustStore, as a reload builds)."""
    networks = {
        "hospital": NetworkSettings(name="hospital", adapter="mime", domains=("chu-test.fr",),
                                    peers=PeerRule()),
        "medecin": NetworkSettings(
            name="medecin", adapter="smime", domains=("medecin.fr",), peers=PeerRule(),
            identity="medecin-smime",
            require=require or Requirements(signature=True, encryption=False),
        ),
    }
    config = Config(
        path=root / "routing.yaml", version=1,
        gateway=GatewaySettings(
            hostname="passerelle.test", listen=(), tls=None,
            spool=SpoolSettings(root / "spool"), audit=AuditSettings(root / "audit"),
            metrics=None, retry=retry or RetrySettings(),
        ),
        trust=TrustSettings(), keys={}, directory=(), networks=networks,
        routes=(Route("hospital", ("medecin",)), Route("medecin", ("hospital",))),
    )
    keyring = KeyRing(
        identities={"medecin-smime": identity(gateway, pki)}, trust=trust,
        directory=directory or pki.directory(*pki.people.values()),
    )
    return Runtime(config, keyring)
