"""The e2e world with crypto networks added: an S/MIME network and an Apicrypt (OpenPGP) one.

On top of tests/support/world.py's hospital / clinic / lab:
- medecin   medecin-test.fr        smime, peers by the subject of mx.medecin-test.fr,
            identity medecin-smime, require signature + encryption, relay = sink "medecin"
- apicrypt  *.apicrypt-test.org    apicrypt (codec openpgp, v1), peers by address,
            identity apicrypt-pgp, require encryption, relay = sink "apicrypt"
Routes: hospital -> clinic, medecin, apicrypt; medecin -> hospital, apicrypt;
apicrypt -> hospital, medecin; clinic -> hospital.

Correspondents: dr.durand@medecin-test.fr (S/MIME certificate and key, in the directory) and
dr.gp@cabinet.apicrypt-test.org (a GnuPG key made by gpg itself, public part in the directory).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

from cryptography.x509.oid import ExtendedKeyUsageOID

from adapters.pgpkeys import generate_identity
from tests.support import testpki
from tests.support.gpg import Gpg
from tests.support.world import Sink, World, build_world, sink_context

DOCTOR = "dr.durand@medecin-test.fr"
GP = "dr.gp@cabinet.apicrypt-test.org"
GATEWAY_PGP = "passerelle@apicrypt-test.org"


@dataclass
class CryptoWorld:
    world: World
    doctor: testpki.Issued  # the S/MIME correspondent
    medecin_mta: testpki.Issued  # the medecin network's MTA client certificate
    gateway_smime: testpki.Issued  # the gateway's identity on the medecin network
    gpg: Gpg  # holds the GP's secret key and the gateway's public key
    gp_fingerprint: str

    @property
    def pki(self) -> Path:
        return self.world.root / "pki"

    def write(self, name: str, data: bytes) -> Path:
        path = self.world.root / "work" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return path


def build_crypto_world(root: Path, **kwargs: object) -> CryptoWorld:
    # Start from the plain world, then add the crypto networks' sinks, keys and sections.
    world = build_world(root, **kwargs)  # type: ignore[arg-type]
    pki_dir = root / "pki"
    pki = world.pki
    for name in ("medecin", "apicrypt"):
        world.sinks[name] = Sink(name, sink_context(pki, root, name))
    gateway_smime = pki.organisations.issue(
        testpki.name(CN="Passerelle medecin-test.fr", O="CHU TEST", C="FR"),
        key_kind="rsa", emails=["passerelle@medecin-test.fr"],
    )
    gateway_smime.write(pki_dir, "medecin")
    doctor = pki.organisations.issue(
        testpki.name(CN="Dr Jeanne Durand", O="Cabinet Durand", C="FR"),
        key_kind="rsa", emails=[DOCTOR], eku=[ExtendedKeyUsageOID.EMAIL_PROTECTION],
    )
    (pki_dir / "directory").mkdir(exist_ok=True)
    (pki_dir / "directory" / "durand.pem").write_bytes(doctor.cert_pem)
    doctor.write(root / "work", "doctor")
    medecin_mta = pki.server("mx.medecin-test.fr", structure="3490000000001", org="ORDRE TEST")
    secret = generate_identity(f"Passerelle <{GATEWAY_PGP}>",
                               created=dt.datetime.now(dt.UTC) - dt.timedelta(days=1))
    (pki_dir / "apicrypt.asc").write_bytes(secret)
    (pki_dir / "apicrypt.asc").chmod(0o600)
    gpg = Gpg(root / "gpg")
    gpg.import_key(secret)
    gp = gpg.generate(f"Dr GP <{GP}>")
    (pki_dir / "directory" / "gp.asc").write_bytes(gpg.export_public(gp))

    mta_dn = medecin_mta.certificate.subject.rfc4514_string()
    text = world.config.read_text()
    text = text.replace("networks:\n", f"""keys:
  medecin-smime: {{certificate: pki/medecin.pem, key: pki/medecin.key}}
  apicrypt-pgp: {{secret_key: pki/apicrypt.asc}}
directory: [pki/directory/]
networks:
  medecin:
    adapter: smime
    domains: [medecin-test.fr]
    peers: {{subjects: ["{mta_dn}"]}}
    identity: medecin-smime
    require: {{signature: true, encryption: true}}
    relay: {{host: 127.0.0.1, port: {world.sinks["medecin"].port}, tls: required}}
  apicrypt:
    adapter: apicrypt
    codec: openpgp
    version: 1
    domains: ["*.apicrypt-test.org"]
    peers: {{addresses: [127.0.0.1]}}
    identity: apicrypt-pgp
    require: {{encryption: true}}
    relay: {{host: 127.0.0.1, port: {world.sinks["apicrypt"].port}, tls: opportunistic}}
""", 1)
    text = text.replace("  - {from: hospital, to: [clinic]}\n",
                        "  - {from: hospital, to: [clinic, medecin, apicrypt]}\n"
                        "  - {from: medecin, to: [hospital, apicrypt]}\n"
                        "  - {from: apicrypt, to: [hospital, medecin]}\n")
    world.config.write_text(text)
    return CryptoWorld(world, doctor, medecin_mta, gateway_smime, gpg, gp)
