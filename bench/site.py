"""The benchmark's world on disk: keys, routing.yaml and the input message of every route.

Networks (all peers by address 127.0.0.1, resolved by the MAIL FROM domain; every relay is
the one `smtp-sink`; clear text everywhere, as for the Postfix baseline):
- clinic    mime      clinique-test.fr              the plain route's source
- hospital  mime      chu-test.fr                   the plain route's destination
- medecin   smime     medecin-test.fr               require signature + encryption
- apicrypt  apicrypt  *.apicrypt-test.org (openpgp) require encryption
Recipients: r<i>@chu-test.fr and gp<i>@cabinet.apicrypt-test.org (i < 100, for the recipient
scaling curve), dr<i>@medecin-test.fr (i < 10), each crypto one with its own certificate or
OpenPGP key in the directory.

Besides routing.yaml (the throughput cells, relaying to `smtp-sink`), `variant` writes
routing-<name>.yaml: the same networks and keys with a spool, an audit trail, a listening port
and a next hop of its own, for the gateways that the latency, memory, backlog and profile cells
start fresh.
"""

from __future__ import annotations

import datetime as dt
import email.utils
import subprocess
import textwrap
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pysequoia
from cryptography.x509.oid import ExtendedKeyUsageOID

from adapters.apicrypt import ApicryptAdapter
from adapters.base import Directory, Identity, TrustStore, Unwrapped, Verdict, WrapContext
from adapters.pgpkeys import generate_identity
from gateway import pkigen

RECIPIENTS = 10  # the throughput matrix's "many recipients", and the S/MIME directory's size
MAX_RECIPIENTS = 100  # the recipient scaling curve's largest count
GATEWAY_PGP = "passerelle@apicrypt-test.org"
GATEWAY_SMIME = "passerelle@medecin-test.fr"
KIB, MIB = 1024, 1024 * 1024
SIZES = {"10KiB": 10 * KIB, "1MiB": MIB}  # the throughput matrix
SCALING_SIZES = {"1KiB": KIB, "10KiB": 10 * KIB, "100KiB": 100 * KIB, "1MiB": MIB,
                 "5MiB": 5 * MIB, "25MiB": 25 * MIB}
SCALING_RECIPIENTS = (1, 10, 50, 100)
SCALING_ROUTES = ("plain", "smime-to-apicrypt")  # the crypto route whose keys scale to 100
BIG = "25MiB"  # the memory cells' message


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
    # MAX_RECIPIENTS of them (RECIPIENTS for Apicrypt → S/MIME); a cell uses the first N
    recipients: tuple[str, ...]
    messages: dict[str, bytes]  # size label -> wire message (CRLF, not dot-stuffed)


@dataclass(frozen=True)
class Site:
    root: Path
    config: Path
    routes: dict[str, Route]
    sink_port: int
    gateway_pgp: bytes = b""  # the gateway's secret key (its certificate encrypts Apicrypt input)
    gp0_secret: bytes = b""  # the Apicrypt sender's secret key


def payload(size: int) -> bytes:
    """`size` bytes of ISO-8859-1 text in 76-character lines (an HPRIM-like report)."""
    line = b"RES|Hemoglobine|HB|N|13.5|g/dl|12|16|N||F| resultat valide par le biologiste.\r\n"
    body = (line * (size // len(line) + 1))[:size]
    return body[: body.rfind(b"\r\n") + 2]


def letter(sender: str, recipient: str, size: int, charset: str = "iso-8859-1",
           tag: str = "bench") -> bytes:
    return (
        f"From: <{sender}>\r\nTo: <{recipient}>\r\nSubject: Compte rendu\r\n"
        f"Message-ID: {message_id(sender, tag)}\r\n"
        # Now: an S/MIME signing time far from Date: fails verification (time mismatch).
        f"Date: {email.utils.formatdate(usegmt=True)}\r\n"
        f"MIME-Version: 1.0\r\nContent-Type: text/plain; charset={charset}\r\n"
        "Content-Transfer-Encoding: 8bit\r\n\r\n"
    ).encode() + payload(size)


def message_id(sender: str, tag: str) -> str:
    return f"<{tag}@{sender.split('@')[1]}>"


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




def smime_letter(root: Path, size: int, tag: str = "bench") -> bytes:
    """An S/MIME message from dr0 to gp0, signed then encrypted to the gateway by openssl (an
    independent implementation), like a doctor's mail client would send it."""
    work, pki_dir = root / "work", root / "pki"
    signed = openssl("cms", "-sign", "-signer", work / "dr0.pem", "-inkey", work / "dr0.key",
                     "-md", "sha256", "-binary", data=letter(doctor(0), gp(0), size, tag=tag))
    return crlf(openssl("cms", "-encrypt", "-aes-256-cbc", "-from", doctor(0), "-to", gp(0),
                        "-subject", "Compte rendu", pki_dir / "medecin.pem", data=signed))


def apicrypt_letter(site: Site, size: int) -> bytes:
    """An Apicrypt message from gp0 to dr0: the adapter itself on the sender's side (the same
    layout as a GP's client), encrypted to the gateway's key."""
    return crlf(ApicryptAdapter().wrap(
        Unwrapped(letter(gp(0), doctor(0), size), Verdict.unsigned(), "mime"),
        WrapContext("apicrypt", Identity("gp0", openpgp_secret=site.gp0_secret), TrustStore(),
                    Directory(openpgp=(public(site.gateway_pgp),)), pkigen.NOW, gp(0),
                    (GATEWAY_PGP,), options={"codec": "openpgp", "version": 1}),
    ).content)


def config_text(listen_port: int, relay_port: int, state: str) -> str:
    """routing.yaml for one gateway; `state` is the folder under var/ of its spool and audit."""
    return textwrap.dedent(f"""\
        version: 1
        gateway:
          hostname: passerelle.bench
          listen:
            - {{address: 127.0.0.1, port: {listen_port}, tls: none}}
          spool: {{path: {state}/spool}}
          audit: {{path: {state}/audit}}
          # Above the 25 MiB cells once S/MIME's base64 has grown them by a third.
          max_message_size: 64MiB
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
            relay: {{host: 127.0.0.1, port: {relay_port}, tls: none}}
          hospital:
            adapter: mime
            domains: [chu-test.fr]
            peers: {{addresses: [127.0.0.1]}}
            relay: {{host: 127.0.0.1, port: {relay_port}, tls: none}}
            limits: {{concurrency: 20}}
          medecin:
            adapter: smime
            domains: [medecin-test.fr]
            peers: {{addresses: [127.0.0.1]}}
            identity: medecin-smime
            require: {{signature: true, encryption: true}}
            relay: {{host: 127.0.0.1, port: {relay_port}, tls: none}}
            limits: {{concurrency: 20}}
          apicrypt:
            adapter: apicrypt
            codec: openpgp
            version: 1
            domains: ["*.apicrypt-test.org"]
            peers: {{addresses: [127.0.0.1]}}
            identity: apicrypt-pgp
            require: {{encryption: true}}
            relay: {{host: 127.0.0.1, port: {relay_port}, tls: none}}
            limits: {{concurrency: 20}}
        routes:
          - {{from: clinic, to: [hospital]}}
          - {{from: medecin, to: [apicrypt]}}
          - {{from: apicrypt, to: [medecin]}}
        """)


def variant(site: Site, name: str, listen_port: int, relay_port: int) -> Path:
    """routing-<name>.yaml beside routing.yaml (same keys), with var/<name>/ of its own."""
    path = site.root / f"routing-{name}.yaml"
    path.write_text(config_text(listen_port, relay_port, f"var/{name}"))
    return path


def build(root: Path, sink_port: int, listen_port: int) -> Site:
    pki_dir, work = root / "pki", root / "work"
    (pki_dir / "directory").mkdir(parents=True, exist_ok=True)
    work.mkdir(exist_ok=True)
    pki = pkigen.IgcSante.create()
    (pki_dir / "ca.pem").write_bytes(pki.root.cert_pem + pki.organisations.cert_pem)
    smime = pki.organisations.issue(pkigen.name(CN="Passerelle medecin-test.fr", O="BENCH",
                                                C="FR"), key_kind="rsa", emails=[GATEWAY_SMIME])
    smime.write(pki_dir, "medecin")
    for index in range(RECIPIENTS):
        issued = pki.organisations.issue(
            pkigen.name(CN=f"Dr {index}", O="Cabinet", C="FR"), key_kind="rsa",
            emails=[doctor(index)], eku=[ExtendedKeyUsageOID.EMAIL_PROTECTION])
        (pki_dir / "directory" / f"dr{index}.pem").write_bytes(issued.cert_pem)
        issued.write(work, f"dr{index}")
    yesterday = dt.datetime.now(dt.UTC) - dt.timedelta(days=1)  # no key "from the future"
    gateway_pgp = generate_identity(f"Passerelle <{GATEWAY_PGP}>", created=yesterday)
    (pki_dir / "apicrypt.asc").write_bytes(gateway_pgp)
    (pki_dir / "apicrypt.asc").chmod(0o600)
    gps = [generate_identity(f"Dr GP {index} <{gp(index)}>", created=yesterday)
           for index in range(MAX_RECIPIENTS)]
    for index, secret in enumerate(gps):
        (pki_dir / "directory" / f"gp{index}.asc").write_bytes(public(secret))
        (work / f"gp{index}.asc").write_bytes(secret)
    config = root / "routing.yaml"
    config.write_text(config_text(listen_port, sink_port, "var"))
    site = Site(root, config, {}, sink_port, gateway_pgp, gps[0])

    plain: dict[str, bytes] = {}
    to_apicrypt: dict[str, bytes] = {}
    to_smime: dict[str, bytes] = {}
    every = {**SIZES, **SCALING_SIZES}
    # Each route gets the matrix's sizes, the memory cell's, and the curve's if it has one.
    wanted = {route: set(SIZES) | {BIG} | (set(SCALING_SIZES) if route in SCALING_ROUTES
                                           else set())
              for route in ("plain", "smime-to-apicrypt", "apicrypt-to-smime")}
    for label, size in every.items():
        if label in wanted["plain"]:
            plain[label] = letter("a@clinique-test.fr", plain_recipient(0), size, "us-ascii")
        if label in wanted["smime-to-apicrypt"]:
            to_apicrypt[label] = smime_letter(root, size)
        if label in wanted["apicrypt-to-smime"]:
            to_smime[label] = apicrypt_letter(site, size)
    site.routes.update({
        "plain": Route("plain", "a@clinique-test.fr",
                       tuple(plain_recipient(i) for i in range(MAX_RECIPIENTS)), plain),
        "smime-to-apicrypt": Route("smime-to-apicrypt", doctor(0),
                                   tuple(gp(i) for i in range(MAX_RECIPIENTS)), to_apicrypt),
        "apicrypt-to-smime": Route("apicrypt-to-smime", gp(0),
                                   tuple(doctor(i) for i in range(RECIPIENTS)), to_smime),
    })
    return site


def tagged(site: Site, route: str, label: str, count: int,
           prefix: str = "lat") -> list[tuple[str, bytes]]:
    """`count` messages of one route and size, each with a Message-ID of its own that the
    next hop sees (for matching each 250 the relay gave with the next hop's 250).

    Where the Message-ID travels in clear (plain MIME; Apicrypt's clear header block, which
    the gateway hands on), it is replaced in the one message; S/MIME hides it inside the
    signed and encrypted content, so each of those is made by openssl, two at a time."""
    chosen = site.routes[route]
    template = chosen.messages[label]
    old = message_id(chosen.sender, "bench").encode()
    if route != "smime-to-apicrypt":
        return [(message_id(chosen.sender, f"{prefix}-{i}"),
                 template.replace(old, message_id(chosen.sender, f"{prefix}-{i}").encode(), 1))
                for i in range(count)]
    size = SCALING_SIZES.get(label) or SIZES[label]
    with ThreadPoolExecutor(2) as pool:
        made = list(pool.map(lambda i: smime_letter(site.root, size, f"{prefix}-{i}"),
                             range(count)))
    return [(message_id(chosen.sender, f"{prefix}-{i}"), made[i]) for i in range(count)]
