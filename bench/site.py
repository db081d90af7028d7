"""The benchmark's world on disk: keys, routing.yaml and the input message of every route.

Networks (all peers by address 127.0.0.1, resolved by the MAIL FROM domain; every relay is
the one `smtp-sink`; clear text everywhere, as for the Postfix baseline):
- clinic    mime      clinique-test.fr              the plain route's source
- hospital  mime      chu-test.fr                   the plain route's destination
- medecin   smime     medecin-test.fr               require signature + encryption
- apicrypt  apicrypt  *.apicrypt-test.org (openpgp) require encryption
Recipients: r<i>@chu-test.fr, dr<i>@medecin-test.fr, gp<i>@cabinet.apicrypt-test.org (i < 10),
each crypto one with its own certificate or OpenPGP key in the directory.
"""

from __future__ import annotations

import datetime as dt
import email.utils
import subprocess
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pysequoia
from cryptography.x509.oid import ExtendedKeyUsageOID

from adapters.apicrypt import ApicryptAdapter
from adapters.base import Directory, Identity, TrustStore, Unwrapped, Verdict, WrapContext
from adapters.pgpkeys import generate_identity
from gateway import pkigen

RECIPIENTS = 10
GATEWAY_PGP = "passerelle@apicrypt-test.org"
GATEWAY_SMIME = "passerelle@medecin-test.fr"
SIZES = {"10KiB": 10 * 1024, "1MiB": 1024 * 1024}


def doctor(index: int) -> str:
    return f"dr{index}@medecin-test.fr"


def gp(index: int) -> str:
    return f"gp{index}@cabinet.apicrypt-test.org"


def plain_recipient(index: int) -> str:
    return f"r{index}@chu-test.fr"


@dataclass(frozen=True)
class Route:
    name: str  # "plain", "smime-to-apicrypt", "apicrypt-to-smime"
    sender: str
    recipients: tuple[str, ...]  # RECIPIENTS of them; a run uses the first 1 or 10
    messages: dict[str, bytes]  # size label -> wire message (CRLF, not dot-stuffed)


@dataclass(frozen=True)
class Site:
    root: Path
    config: Path
    routes: dict[str, Route]
    sink_port: int


def payload(size: int) -> bytes:
    """`size` bytes of ISO-8859-1 text in 76-character lines (an HPRIM-like report)."""
    line = b"RES|Hemoglobine|HB|N|13.5|g/dl|12|16|N||F| resultat valide par le biologiste.\r\n"
    body = (line * (size // len(line) + 1))[:size]
    return body[: body.rfind(b"\r\n") + 2]


def letter(sender: str, recipient: str, size: int, charset: str = "iso-8859-1") -> bytes:
    return (
        f"From: <{sender}>\r\nTo: <{recipient}>\r\nSubject: Compte rendu\r\n"
        f"Message-ID: <bench@{sender.split('@')[1]}>\r\n"
        # Now: an S/MIME signing time far from Date: fails verification (time mismatch).
        f"Date: {email.utils.formatdate(usegmt=True)}\r\n"
        f"MIME-Version: 1.0\r\nContent-Type: text/plain; charset={charset}\r\n"
        "Content-Transfer-Encoding: 8bit\r\n\r\n"
    ).encode() + payload(size)


def crlf(data: bytes) -> bytes:
    return data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def openssl(*args: str | Path, data: bytes | None = None) -> bytes:
    done = subprocess.run(["openssl", *map(str, args)], input=data, capture_output=True,
                          timeout=300, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"openssl {args[:2]}: {done.stderr.decode()}")
    return done.stdout


def public(secret: bytes) -> bytes:
    return str(pysequoia.Tsk.from_bytes(secret).extract_certificate()).encode()


def build(root: Path, sink_port: int, listen_port: int) -> Site:
    pki_dir, work = root / "pki", root / "work"
    (pki_dir / "directory").mkdir(parents=True, exist_ok=True)
    work.mkdir(exist_ok=True)
    pki = pkigen.IgcSante.create()
    (pki_dir / "ca.pem").write_bytes(pki.root.cert_pem + pki.organisations.cert_pem)
    smime = pki.organisations.issue(pkigen.name(CN="Passerelle medecin-test.fr", O="BENCH",
                                                C="FR"), key_kind="rsa", emails=[GATEWAY_SMIME])
    smime.write(pki_dir, "medecin")
    doctors = []
    for index in range(RECIPIENTS):
        issued = pki.organisations.issue(
            pkigen.name(CN=f"Dr {index}", O="Cabinet", C="FR"), key_kind="rsa",
            emails=[doctor(index)], eku=[ExtendedKeyUsageOID.EMAIL_PROTECTION])
        (pki_dir / "directory" / f"dr{index}.pem").write_bytes(issued.cert_pem)
        issued.write(work, f"dr{index}")
        doctors.append(issued)
    yesterday = dt.datetime.now(dt.UTC) - dt.timedelta(days=1)  # no key "from the future"
    gateway_pgp = generate_identity(f"Passerelle <{GATEWAY_PGP}>", created=yesterday)
    (pki_dir / "apicrypt.asc").write_bytes(gateway_pgp)
    (pki_dir / "apicrypt.asc").chmod(0o600)
    gps = [generate_identity(f"Dr GP {index} <{gp(index)}>", created=yesterday)
           for index in range(RECIPIENTS)]
    for index, secret in enumerate(gps):
        (pki_dir / "directory" / f"gp{index}.asc").write_bytes(public(secret))
        (work / f"gp{index}.asc").write_bytes(secret)

    config = root / "routing.yaml"
    config.write_text(textwrap.dedent(f"""\
        version: 1
        gateway:
          hostname: passerelle.bench
          listen:
            - {{address: 127.0.0.1, port: {listen_port}, tls: none}}
          spool: {{path: var/spool}}
          audit: {{path: var/audit}}
          max_message_size: 30MiB
          retry: {{schedule: [5s], give_up_after: 1h}}
        trust:
          anchors: [pki/ca.pem]
        keys:
          medecin-smime: {{certificate: pki/medecin.pem, key: pki/medecin.key}}
          apicrypt-pgp: {{secret_key: pki/apicrypt.asc}}
        directory: [pki/directory/]
        networks:
          clinic:
            adapter: mime
            domains: [clinique-test.fr]
            peers: {{addresses: [127.0.0.1]}}
            relay: {{host: 127.0.0.1, port: {sink_port}, tls: none}}
          hospital:
            adapter: mime
            domains: [chu-test.fr]
            peers: {{addresses: [127.0.0.1]}}
            relay: {{host: 127.0.0.1, port: {sink_port}, tls: none}}
            limits: {{concurrency: 20}}
          medecin:
            adapter: smime
            domains: [medecin-test.fr]
            peers: {{addresses: [127.0.0.1]}}
            identity: medecin-smime
            require: {{signature: true, encryption: true}}
            relay: {{host: 127.0.0.1, port: {sink_port}, tls: none}}
            limits: {{concurrency: 20}}
          apicrypt:
            adapter: apicrypt
            codec: openpgp
            version: 1
            domains: ["*.apicrypt-test.org"]
            peers: {{addresses: [127.0.0.1]}}
            identity: apicrypt-pgp
            require: {{encryption: true}}
            relay: {{host: 127.0.0.1, port: {sink_port}, tls: none}}
            limits: {{concurrency: 20}}
        routes:
          - {{from: clinic, to: [hospital]}}
          - {{from: medecin, to: [apicrypt]}}
          - {{from: apicrypt, to: [medecin]}}
        """))

    plain, to_apicrypt, to_smime = {}, {}, {}
    for label, size in SIZES.items():
        plain[label] = letter("a@clinique-test.fr", plain_recipient(0), size, "us-ascii")
        # S/MIME from dr0: signed then encrypted to the gateway's certificate, by openssl.
        source = work / f"letter-{label}.eml"
        source.write_bytes(letter(doctor(0), gp(0), size))
        signed = openssl("cms", "-sign", "-in", source, "-signer", work / "dr0.pem",
                         "-inkey", work / "dr0.key", "-md", "sha256", "-binary")
        (work / "signed.eml").write_bytes(signed)
        to_apicrypt[label] = crlf(openssl(
            "cms", "-encrypt", "-in", work / "signed.eml", "-aes-256-cbc", "-from", doctor(0),
            "-to", gp(0), "-subject", "Compte rendu", pki_dir / "medecin.pem"))
        # Apicrypt from gp0: the adapter itself on the sender's side (same layout as a GP's).
        to_smime[label] = crlf(ApicryptAdapter().wrap(
            Unwrapped(letter(gp(0), doctor(0), size), Verdict.unsigned(), "mime"),
            WrapContext("apicrypt", Identity("gp0", openpgp_secret=gps[0]), TrustStore(),
                        Directory(openpgp=(public(gateway_pgp),)), pkigen.NOW, gp(0),
                        (GATEWAY_PGP,), options={"codec": "openpgp", "version": 1}),
        ).content)
    routes = {
        "plain": Route("plain", "a@clinique-test.fr",
                       tuple(plain_recipient(i) for i in range(RECIPIENTS)), plain),
        "smime-to-apicrypt": Route("smime-to-apicrypt", doctor(0),
                                   tuple(gp(i) for i in range(RECIPIENTS)), to_apicrypt),
        "apicrypt-to-smime": Route("apicrypt-to-smime", gp(0),
                                   tuple(doctor(i) for i in range(RECIPIENTS)), to_smime),
    }
    return Site(root, config, routes, sink_port)
