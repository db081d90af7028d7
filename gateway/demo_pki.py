"""The demonstration PKI and keys of `gateway demo`, made on first run beside routing.yaml.

What it writes, at the paths routing.yaml names (so `gateway check` and `gateway serve` read
the very same files):

- an IGC-Santé-shaped CA (root → "ORGANISATIONS" intermediate) in `trust.anchors`, both CRLs in
  `trust.crls` (re-signed on every run: a CRL is stale after seven days and the gateway refuses
  stale CRLs, DESIGN.md §10);
- the gateway's TLS certificate (server and client, `passerelle.example.org`, SAN localhost and
  127.0.0.1), its spool key (32 random bytes, mode 600), its S/MIME identity for the medecin
  network (RSA, which every S/MIME client can encrypt to) and its OpenPGP identity for the
  Apicrypt network;
- the directory: three @medecin.fr doctors' S/MIME certificates and three Apicrypt users'
  OpenPGP certificates;
- the MSSanté whitelist in the official XML format, listing the demo hospital MTA's
  certificate DN for its domains.

The simulated networks' own secrets (CA keys, MTA certificates, doctors' and GPs' private keys)
stay under `pki/demo/`, which the gateway never reads. Everything is fictitious and for loopback
only. Existing material is reused; a `pki/` that the demo did not make is never overwritten.
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

import pysequoia
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes

from adapters.pgpkeys import generate_identity
from gateway import pkigen
from gateway.config import Config

__all__ = [
    "APICRYPT_MTA",
    "DOCTORS",
    "GATEWAY_PGP_ADDRESS",
    "GATEWAY_SMIME_ADDRESS",
    "GPS",
    "HOSPITAL_MTA",
    "HOSPITAL_STAFF",
    "MEDECIN_MTA",
    "STRANGER_MTA",
    "DemoPki",
    "Mta",
    "Person",
    "PkiError",
    "ensure_pki",
]

_sequoia: Any = pysequoia  # untyped library: keep Any in one name


class PkiError(Exception):
    """The demo material cannot be made or read; the message says what to do."""


@dataclass(frozen=True)
class Mta:
    """A simulated network's mail server: its certificate subject, IGC-Santé style."""

    key: str  # file stem under pki/demo/
    fqdn: str
    structure: str  # OU: the structure's identifier, as IGC-Santé server certificates carry
    organisation: str
    department: str

    @property
    def subject(self) -> str:
        return (f"CN={self.fqdn},OU={self.structure},O={self.organisation},"
                f"ST={self.department},C=FR")


HOSPITAL_MTA = Mta("mx-chu-exemple", "mx.chu-exemple.fr", "1690000001", "CHU EXEMPLE",
                   "Rhone (69)")
# Must stay equal to networks.medecin.peers.subjects in the shipped routing.yaml.
MEDECIN_MTA = Mta("mx-medecin", "mx.medecin.fr", "499000000100001", "MEDECIN.FR EXEMPLE",
                  "Paris (75)")
APICRYPT_MTA = Mta("mx-apicrypt", "mx.apicrypt.org", "499000000200001", "APICRYPT EXEMPLE",
                   "Nord (59)")
# Chains to the same CA but is listed nowhere: the MSSanté trust space does not know it.
STRANGER_MTA = Mta("mx-clinique-inconnue", "mx.clinique-inconnue.fr", "1130000099",
                   "CLINIQUE INCONNUE", "Bouches-du-Rhone (13)")
MTAS = (HOSPITAL_MTA, MEDECIN_MTA, APICRYPT_MTA, STRANGER_MTA)

HOSPITAL_STAFF = {
    "dr.durand@chu-exemple.fr": "Dr Claire Durand",
    "secretariat.cardio@chu-exemple.fr": "Secrétariat de cardiologie",
    "dr.lambert@chu-exemple.fr": "Dr Hugo Lambert",
}
DOCTORS = {  # address -> name; S/MIME certificates in the directory
    "dr.martin@medecin.fr": "Dr Sophie Martin",
    "dr.bernard@medecin.fr": "Dr Louis Bernard",
    "dr.petit@medecin.fr": "Dr Anne Petit",
}
GPS = {  # address -> name; OpenPGP certificates in the directory
    "dr.leroy@cabinet-leroy.apicrypt.org": "Dr Paul Leroy",
    "dr.moreau@msp-exemple.apicrypt.org": "Dr Julie Moreau",
    "biologie@labo-exemple.apicrypt.org": "Laboratoire Exemple",
}
GATEWAY_SMIME_ADDRESS = "passerelle@medecin.fr"
GATEWAY_PGP_ADDRESS = "passerelle@passerelle.apicrypt.org"
_RENEW_BEFORE = dt.timedelta(days=30)  # `gateway check` warns about certificates this close


def _stem(address: str) -> str:
    return address.split("@")[0].replace(".", "-")


@dataclass(frozen=True)
class Person:
    """A doctor of the S/MIME network: certificate and private key."""

    address: str
    certificate: x509.Certificate
    key: CertificateIssuerPrivateKeyTypes
    certificate_path: Path  # for openssl, the doctor's own client
    key_path: Path


@dataclass(frozen=True)
class DemoPki:
    """The material the simulated networks use (the gateway reads its own through config)."""

    base: Path
    anchors: Path  # PEM file of the CA certificates
    root: x509.Certificate
    organisations: x509.Certificate
    gateway_subject: str
    gateway_smime: x509.Certificate  # what doctors encrypt to
    gateway_pgp_public: bytes  # what GPs encrypt to
    mta_files: Mapping[str, tuple[Path, Path]]  # Mta.key -> (chain PEM, key PEM)
    doctors: Mapping[str, Person]
    gps: Mapping[str, bytes]  # address -> armored secret key
    gateway_smime_path: Path
    generated: bool  # made during this run


def _private(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # Created with 600 from the start, so a key never exists readable by others.
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(data)
    path.chmod(0o600)


def _public(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _key_pem(key: CertificateIssuerPrivateKeyTypes) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _load_key(path: Path) -> CertificateIssuerPrivateKeyTypes:
    key = serialization.load_pem_private_key(path.read_bytes(), None)
    return key  # type: ignore[return-value]  # the demo only writes RSA and EC keys


class _Layout:
    """Where each file goes: the gateway's files where routing.yaml says, the rest in pki/demo."""

    def __init__(self, config: Config) -> None:
        gateway = config.gateway
        if gateway.tls is None or gateway.spool.encryption_key is None:
            raise PkiError("the demo needs gateway.tls and gateway.spool.encryption_key in "
                           "routing.yaml, as in the shipped file")
        keys = config.keys
        medecin, apicrypt = keys.get("medecin-smime"), keys.get("apicrypt-pgp")
        if (medecin is None or medecin.certificate is None or medecin.key is None
                or apicrypt is None or apicrypt.secret_key is None):
            raise PkiError("the demo needs keys medecin-smime {certificate, key} and "
                           "apicrypt-pgp {secret_key} in routing.yaml, as in the shipped file")
        if not config.trust.anchors or len(config.trust.crls) < 2 or not config.directory:
            raise PkiError("the demo needs trust.anchors, two trust.crls (root, intermediate) "
                           "and a directory in routing.yaml, as in the shipped file")
        if config.trust.mssante_whitelist is None:
            raise PkiError("the demo needs trust.mssante_whitelist in routing.yaml")
        self.base = config.path.parent
        self.anchors = config.trust.anchors[0]
        self.root_crl, self.organisations_crl = config.trust.crls[0], config.trust.crls[1]
        self.whitelist = config.trust.mssante_whitelist
        self.tls_cert, self.tls_key = gateway.tls.certificate, gateway.tls.key
        self.spool_key = gateway.spool.encryption_key
        self.smime_cert, self.smime_key = medecin.certificate, medecin.key
        self.pgp_secret = apicrypt.secret_key
        self.directory = config.directory[0]
        self.demo = self.anchors.parent / "demo"
        self.root_key = self.demo / "ca-root.key"
        self.organisations_key = self.demo / "ca-organisations.key"

    def gateway_files(self) -> list[Path]:
        return [self.anchors, self.tls_cert, self.tls_key, self.spool_key, self.smime_cert,
                self.smime_key, self.pgp_secret]

    def demo_files(self) -> list[Path]:
        files = [self.root_key, self.organisations_key]
        for mta in MTAS:
            files += [self.demo / f"{mta.key}.pem", self.demo / f"{mta.key}.key"]
        for address in DOCTORS:
            files += [self.directory / f"{_stem(address)}.pem",
                      self.demo / f"{_stem(address)}.key"]
        for address in GPS:
            files += [self.directory / f"{_stem(address)}.asc",
                      self.demo / f"{_stem(address)}.secret.asc"]
        return files


def ensure_pki(config: Config, now: dt.datetime) -> DemoPki:
    """Reuse the demo material beside routing.yaml, or make it; refresh the CRLs."""
    layout = _Layout(config)
    present = [p for p in layout.gateway_files() if p.exists()]
    complete = all(p.exists() for p in layout.gateway_files() + layout.demo_files())
    generated = False
    if present and not layout.root_key.exists():
        # Somebody's real keys: the demo must never overwrite them.
        raise PkiError(f"{present[0]} exists but was not made by the demo (no "
                       f"{layout.root_key}); run the demo from a copy of routing.yaml in an "
                       "empty folder")
    if not complete or _expiring(layout, now):
        _generate(layout)
        generated = True
    _refresh_crls(layout, now)
    if not layout.whitelist.exists():
        _public(layout.whitelist, whitelist_xml(now))
    return _load(layout, generated)


def _expiring(layout: _Layout, now: dt.datetime) -> bool:
    for path in (layout.tls_cert, layout.smime_cert, layout.demo / f"{HOSPITAL_MTA.key}.pem"):
        certificate = x509.load_pem_x509_certificate(path.read_bytes())
        if certificate.not_valid_after_utc - now < _RENEW_BEFORE:
            return True
    return False


def _generate(layout: _Layout) -> None:
    ca = pkigen.IgcSante.create()
    _private(layout.root_key, ca.root.key_pem)
    _private(layout.organisations_key, ca.organisations.key_pem)
    _public(layout.anchors, ca.root.cert_pem + ca.organisations.cert_pem)
    _public(layout.demo / "README.txt", (
        b"Made by `gateway demo`: the simulated networks' secret keys (CA, mail servers,\n"
        b"doctors, GPs). Fictitious, for loopback only. Delete pki/ to start afresh.\n"
    ))

    gateway = ca.server("passerelle.example.org", structure="1690000000",
                        org="PASSERELLE EXEMPLE", department="Rhone (69)",
                        dns=["passerelle.example.org", "localhost"], ips=["127.0.0.1"])
    _public(layout.tls_cert, gateway.chain_pem())
    _private(layout.tls_key, gateway.key_pem)
    _private(layout.spool_key, os.urandom(32))

    medecin = ca.organisations.issue(
        pkigen.name(CN="Passerelle CHU Exemple", O="CHU EXEMPLE", C="FR"),
        emails=[GATEWAY_SMIME_ADDRESS], key_kind="rsa",
    )
    _public(layout.smime_cert, medecin.chain_pem())
    _private(layout.smime_key, medecin.key_pem)
    _private(layout.pgp_secret,
             generate_identity(f"Passerelle CHU Exemple <{GATEWAY_PGP_ADDRESS}>"))

    for mta in MTAS:
        issued = ca.server(mta.fqdn, structure=mta.structure, org=mta.organisation,
                           department=mta.department, dns=[mta.fqdn, "localhost"],
                           ips=["127.0.0.1"])
        _public(layout.demo / f"{mta.key}.pem", issued.chain_pem())
        _private(layout.demo / f"{mta.key}.key", issued.key_pem)

    layout.directory.mkdir(parents=True, exist_ok=True)
    for address, person in DOCTORS.items():
        doctor = ca.organisations.issue(pkigen.name(CN=person, O="MEDECIN.FR EXEMPLE", C="FR"),
                                        emails=[address], key_kind="rsa")
        _public(layout.directory / f"{_stem(address)}.pem", doctor.cert_pem)
        _private(layout.demo / f"{_stem(address)}.key", doctor.key_pem)
    for address, person in GPS.items():
        secret = generate_identity(f"{person} <{address}>")
        _private(layout.demo / f"{_stem(address)}.secret.asc", secret)
        _public(layout.directory / f"{_stem(address)}.asc", public_key(secret))


def public_key(secret: bytes) -> bytes:
    """The armored OpenPGP certificate (public part) of an armored secret key."""
    return str(_sequoia.Tsk.from_bytes(secret).extract_certificate()).encode("ascii")


def _refresh_crls(layout: _Layout, now: dt.datetime) -> None:
    certificates = x509.load_pem_x509_certificates(layout.anchors.read_bytes())
    root = pkigen.Issued(certificates[0], _load_key(layout.root_key))
    organisations = pkigen.Issued(certificates[1], _load_key(layout.organisations_key),
                                  issuer=root)
    hour = dt.timedelta(hours=1)
    for issuer, path in ((root, layout.root_crl), (organisations, layout.organisations_crl)):
        crl = issuer.crl(last_update=now - hour, next_update=now + dt.timedelta(days=7))
        _public(path, pkigen.crl_pem(crl))


def whitelist_xml(now: dt.datetime) -> bytes:
    """The MSSanté whitelist (listeblanchemssante.xml format) naming the demo hospital MTA."""
    stamp = now.strftime("%Y-%m-%dT%H:%M:%SZ")
    entries = []
    for domain, description in (("chu-exemple.fr", "CHU EXEMPLE"),
                                ("chu-exemple.mssante.fr", "CHU EXEMPLE (MSSANTE)")):
        entries.append(
            "        <Domaine>\n"
            f"            <Nom>{domain}</Nom>\n"
            f"            <Description>{escape(description)}</Description>\n"
            f"            <DNCertificatOperateur>{escape(HOSPITAL_MTA.subject)}"
            "</DNCertificatOperateur>\n"
            "            <ResponsableContact>04 00 00 00 00, dsi@chu-exemple.fr"
            "</ResponsableContact>\n"
            "            <SupportContact>04 00 00 00 01, support@chu-exemple.fr</SupportContact>\n"
            f"            <DateMAJ>{stamp}</DateMAJ>\n"
            "        </Domaine>\n"
        )
    return (
        '<?xml version="1.0" encoding="UTF-8"?>'
        '<ListeBlancheMSSante xmlns="https://listeblanche.mssante.fr/schema">\n'
        f"    <DateDeGeneration>{stamp}</DateDeGeneration>\n"
        "    <ListeDomaines>\n" + "".join(entries) + "    </ListeDomaines>\n"
        "</ListeBlancheMSSante>\n"
    ).encode("utf-8")


def _load(layout: _Layout, generated: bool) -> DemoPki:
    try:
        certificates = x509.load_pem_x509_certificates(layout.anchors.read_bytes())
        gateway = x509.load_pem_x509_certificates(layout.tls_cert.read_bytes())[0]
        smime = x509.load_pem_x509_certificates(layout.smime_cert.read_bytes())[0]
        doctors = {
            address: Person(
                address,
                x509.load_pem_x509_certificate(
                    (layout.directory / f"{_stem(address)}.pem").read_bytes()),
                _load_key(layout.demo / f"{_stem(address)}.key"),
                layout.directory / f"{_stem(address)}.pem",
                layout.demo / f"{_stem(address)}.key",
            )
            for address in DOCTORS
        }
        gps = {address: (layout.demo / f"{_stem(address)}.secret.asc").read_bytes()
               for address in GPS}
        pgp_public = public_key(layout.pgp_secret.read_bytes())
    except (OSError, ValueError) as error:
        raise PkiError(f"the demo keys under {layout.anchors.parent} cannot be read ({error}); "
                       f"delete {layout.anchors.parent} and run the demo again") from None
    return DemoPki(
        base=layout.base,
        anchors=layout.anchors,
        root=certificates[0],
        organisations=certificates[1],
        gateway_subject=gateway.subject.rfc4514_string(),
        gateway_smime=smime,
        gateway_pgp_public=pgp_public,
        mta_files={m.key: (layout.demo / f"{m.key}.pem", layout.demo / f"{m.key}.key")
                   for m in MTAS},
        doctors=doctors,
        gps=gps,
        gateway_smime_path=layout.smime_cert,
        generated=generated,
    )
