"""A complete gateway site on disk for configuration tests: routing.yaml (the DESIGN.md §3
example, with both CAs' CRLs) and every file it names, generated with the test PKI."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

import pysequoia

from adapters.pgpkeys import generate_identity
from tests.support import testpki

WHITELIST = (Path(__file__).resolve().parents[3] / "shared" / "data" / "mssante"
             / "listeblanchemssante.xml")  # the real list, beside the repository

ROUTING = """\
version: 1
gateway:
  hostname: passerelle.example.org
  listen:
    - {address: 127.0.0.1, port: 2525, tls: starttls, client_certificate: optional}
  tls: {certificate: pki/gateway.pem, key: pki/gateway.key}   # server and client side
  spool: {path: var/spool, encryption_key: pki/spool.key}
  audit: {path: var/audit, retention: 183d}
  metrics: {address: 127.0.0.1, port: 9464}                     # /metrics and /healthz
  max_message_size: 25MiB
  retry: {schedule: [1m, 5m, 15m, 1h, 4h], give_up_after: 5d}

trust:
  anchors: [pki/ca.pem]               # CA certificates: TLS peers and S/MIME signers
  crls: [pki/ca.crl, pki/organisations.crl]
  mssante_whitelist: data/listeblanchemssante.xml   # optional

keys:                                  # the gateway's own identities, by name
  medecin-smime: {certificate: pki/medecin.pem, key: pki/medecin.key}
  apicrypt-pgp: {secret_key: pki/apicrypt.asc}

directory: [pki/directory/]            # correspondents' certificates and OpenPGP certs

networks:
  hospital:
    adapter: mime
    domains: [chu-exemple.fr, "*.mssante.fr"]
    peers: {whitelist: mssante}          # or {subjects: [...], addresses: [...]}
    relay: {host: 127.0.0.1, port: 2601, tls: required}
  medecin:
    adapter: smime
    domains: [medecin.fr]
    peers: {subjects: ["CN=mx.medecin.fr,OU=1750000000,O=CHU TEST,ST=Paris (75),C=FR"]}
    identity: medecin-smime               # signs outgoing, decrypts incoming
    require: {signature: true, encryption: true}   # what mail FROM this network must carry
    relay: {host: 127.0.0.1, port: 2602, tls: required}
  apicrypt:
    adapter: apicrypt
    codec: openpgp
    domains: ["*.apicrypt.org"]
    peers: {addresses: [127.0.0.1]}
    identity: apicrypt-pgp
    require: {encryption: true}
    relay: {host: 127.0.0.1, port: 2603, tls: opportunistic}

routes:                               # default deny: only these source -> destination pairs
  - {from: hospital, to: [medecin, apicrypt]}
  - {from: medecin, to: [hospital, apicrypt]}
  - {from: apicrypt, to: [hospital, medecin]}
"""

# One of every kind of mistake, each marked by a comment, for the "report them all" tests.
BROKEN = """\
version: 1
gateway:
  hostname: passerelle.example.org
  listen:
    - {address: 127.0.0.1, port: 2525, tls: starttls, client_certificate: optional}
  tls: {certificate: pki/gateway.pem, key: pki/gateway.key}
  spool: {path: var/spool}
  max_message_size: 25 megabytes                       # bad size
  retry: {schedule: [1m, 5m], give_up_after: 5x}       # bad duration
  metrics: {port: 99999}                               # bad port
trust:
  anchors: [pki/ca.pem, pki/missing.pem]               # missing file
  crls: [pki/ca.crl, pki/organisations.crl]
keys:
  medecin-smime: {certificate: pki/medecin.pem, key: pki/gateway.key}   # key mismatch
  apicrypt-pgp: {secret_key: pki/apicrypt.asc}
  half: {certificate: pki/medecin.pem}                 # no key
directory: [pki/directory/]
networks:
  hospital:
    adapter: mime
    domains: [chu-exemple.fr, "*.mssante.fr"]
    peers: {whitelist: mssante}                        # no whitelist under trust
    relay: {host: 127.0.0.1, port: 2601, tls: required}
  medecin:
    adapter: smime
    domains: [medecin.fr]
    signatur: opaque                                   # unknown option key
    peers: {subjects: ["CN=mx.medecin.fr,XX=1"], addresses: [10.0.0.1/8]}   # bad DN, bad CIDR
    identity: medecin-smim                             # unknown key name
    relay: {host: 127.0.0.1, port: 2602, tls: mandatory}   # bad choice
  cabinet:
    adapter: smtp                                      # unknown adapter
    domains: [Medecin.fr.]                             # domain claimed twice
    relai: {host: 127.0.0.1}                           # typo of a generic key
    relay: {host: 127.0.0.1}
routes:
  - {from: hospital, to: [medcin, cabinet]}            # unknown network
  - {from: medecin, to: [hospital], via: x}            # unknown key
"""


@dataclass
class Site:
    root: Path
    config: Path
    pki: testpki.IgcSante
    gateway: testpki.Issued
    medecin: testpki.Issued
    correspondent: testpki.Issued
    apicrypt_secret: bytes
    correspondent_pgp: bytes

    def write(self, text: str) -> Path:
        self.config.write_text(text)
        return self.config

    def line_of(self, needle: str, text: str | None = None) -> int:
        """1-based line of the first line of routing.yaml containing `needle`."""
        text = text if text is not None else self.config.read_text()
        for number, line in enumerate(text.splitlines(), start=1):
            if needle in line:
                return number
        raise AssertionError(f"{needle!r} not in routing.yaml")


def private(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    path.chmod(0o600)
    return path


def build_site(root: Path, *, medecin_not_after: dt.datetime | None = None) -> Site:
    pki_dir = root / "pki"
    (pki_dir / "directory").mkdir(parents=True)
    (root / "data").mkdir()
    # The published list with its closing root tag restored, so that a clean site checks with
    # no warning at all (the list as published is tested in tests/unit/test_whitelist.py).
    (root / "data" / "listeblanchemssante.xml").write_bytes(
        WHITELIST.read_bytes().rstrip() + b"\n</ListeBlancheMSSante>\n")

    pki = testpki.IgcSante.create()
    (pki_dir / "ca.pem").write_bytes(pki.root.cert_pem + pki.organisations.cert_pem)
    (pki_dir / "ca.crl").write_bytes(testpki.crl_pem(pki.root.crl()))
    (pki_dir / "organisations.crl").write_bytes(testpki.crl_pem(pki.organisations.crl()))

    gateway = pki.server("passerelle.example.org")
    (pki_dir / "gateway.pem").write_bytes(gateway.chain_pem())
    private(pki_dir / "gateway.key", gateway.key_pem)

    medecin = pki.organisations.issue(
        testpki.name(CN="Passerelle medecin.fr", O="CHU TEST", C="FR"),
        emails=["passerelle@medecin.fr"], key_kind="rsa", not_after=medecin_not_after,
    )
    (pki_dir / "medecin.pem").write_bytes(medecin.chain_pem())
    private(pki_dir / "medecin.key", medecin.key_pem)

    secret = generate_identity("Passerelle <passerelle@gw.apicrypt.org>")
    private(pki_dir / "apicrypt.asc", secret)
    private(pki_dir / "spool.key", bytes(range(32)))

    correspondent = pki.organisations.issue(
        testpki.name(CN="Dr Exemple", C="FR"), emails=["dr.exemple@medecin.fr"],
        key_kind="rsa",
    )
    (pki_dir / "directory" / "dr-exemple.pem").write_bytes(correspondent.cert_pem)
    peer_secret = generate_identity("Dr Apicrypt <dr@cabinet.apicrypt.org>")
    public = str(pysequoia.Tsk.from_bytes(peer_secret).extract_certificate()).encode()
    (pki_dir / "directory" / "dr-apicrypt.asc").write_bytes(public)
    (pki_dir / "directory" / "README.txt").write_text("ignored\n")

    config = root / "routing.yaml"
    config.write_text(ROUTING)
    return Site(root, config, pki, gateway, medecin, correspondent, secret, public)
