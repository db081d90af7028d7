"""The three simulated networks of `gateway demo`: real SMTP servers and clients with their keys.

Each network has a receiving MTA (an aiosmtpd server with its own IGC-Santé-shaped TLS
certificate, listening where routing.yaml's `relay:` points) that records what arrives, and a
sending side (aiosmtplib over STARTTLS, presenting its MTA's client certificate). What a network's
users' mail clients do is done with independent tools where possible:

- @medecin.fr doctors read with `openssl cms -decrypt` then `openssl cms -verify` (RFC 8551);
- Apicrypt users read each encrypted block with `gpg --decrypt` in a throw-away GNUPGHOME;
- when openssl or gpg is missing, the project's own adapters stand in, and the table says so.

Sending clients build their envelopes with the adapters from the sender's side: a doctor's client
is `SmimeAdapter.wrap` with the doctor's certificate and key, encrypting to the gateway's medecin
certificate; a GP's client is `ApicryptAdapter.wrap` with the GP's key, encrypting to the
gateway's Apicrypt key. The tampered message is signed, changed, then encrypted, as a client
plug-in that edits signed text would do.

Untrusted input: whatever reaches the simulated servers (it is only recorded and then read by
openssl, gpg or the adapters).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as dt
import os
import shutil
import ssl
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import aiosmtplib
from aiosmtpd.smtp import SMTP, Envelope, Session
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

from adapters.apicrypt import ApicryptAdapter
from adapters.base import (
    Directory,
    Identity,
    TrustStore,
    UnwrapContext,
    Unwrapped,
    Verdict,
    WrapContext,
    certificate_addresses,
)
from adapters.cms.encrypt import encrypt_content
from adapters.cms.entity import field_blocks, parse_entity, seven_bit
from adapters.cms.sign import sign_content
from adapters.cms.trust import fingerprint
from adapters.pgpkeys import key_index
from adapters.smime import SmimeAdapter
from gateway.demo_pki import GATEWAY_PGP_ADDRESS, GATEWAY_SMIME_ADDRESS, DemoPki, Person
from gateway.demo_traffic import Leaf, leaves
from gateway.errors import GatewayError, Reason

__all__ = [
    "Arrival",
    "NetworkServer",
    "Reading",
    "Submission",
    "gp_client",
    "read_apicrypt",
    "read_smime",
    "server_context",
    "smime_client",
    "submit",
    "tampered_smime",
]

OPENSSL = shutil.which("openssl")
GPG = shutil.which("gpg")
GPGCONF = shutil.which("gpgconf")


# -- receiving MTAs --------------------------------------------------------------------------


@dataclass(frozen=True)
class Arrival:
    sender: str  # "" for the null sender
    recipients: tuple[str, ...]
    data: bytes
    peer_subject: str | None  # the client certificate the gateway presented, if any
    tls: bool
    at: float  # time.monotonic()


@dataclass
class _Recorder:
    client_certificate: bool  # refuse MAIL from a peer that presented none (mutual TLS)
    arrivals: list[Arrival] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    async def handle_MAIL(self, server: SMTP, session: Session, envelope: Envelope,
                          address: str, options: list[str]) -> str:
        transport = server.transport
        ssl_object = transport.get_extra_info("ssl_object") if transport else None
        if self.client_certificate and (ssl_object is None or not ssl_object.getpeercert()):
            return "530 5.7.0 This MTA only accepts mail over mutual TLS"
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        transport = server.transport
        ssl_object = transport.get_extra_info("ssl_object") if transport else None
        subject = None
        if ssl_object is not None:
            der = ssl_object.getpeercert(binary_form=True)
            if der:
                subject = x509.load_der_x509_certificate(der).subject.rfc4514_string()
        mail_from = "" if envelope.mail_from in (None, "<>") else str(envelope.mail_from)
        self.arrivals.append(Arrival(mail_from, tuple(envelope.rcpt_tos),
                                     bytes(envelope.original_content or b""), subject,
                                     ssl_object is not None, time.monotonic()))
        self.changed.set()
        return "250 2.0.0 Stored in the demo mailbox"


def server_context(certificate: Path, key: Path, anchors: Path) -> ssl.SSLContext:
    """A receiving MTA's TLS: its own certificate; client certificates checked on the anchors.

    CERT_OPTIONAL rather than CERT_REQUIRED, as aiosmtpd advises: the mutual-TLS network
    refuses MAIL without a verified client certificate instead of failing the handshake.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(certificate, key)
    context.load_verify_locations(cafile=str(anchors))
    context.verify_mode = ssl.CERT_OPTIONAL
    return context


class NetworkServer:
    """One simulated network's receiving MTA on 127.0.0.1."""

    def __init__(self, name: str, fqdn: str, host: str, port: int, tls: ssl.SSLContext,
                 require_tls: bool, client_certificate: bool = False) -> None:
        self.name, self.fqdn, self.host, self.port = name, fqdn, host, port
        self.tls, self.require_tls = tls, require_tls
        self.recorder = _Recorder(client_certificate)
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()

        def factory() -> SMTP:
            return SMTP(self.recorder, hostname=self.fqdn, decode_data=False,
                        tls_context=self.tls, require_starttls=self.require_tls,
                        ident="demo MTA")

        self._server = await loop.create_server(factory, self.host, self.port)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), 5)
            self._server = None

    @property
    def arrivals(self) -> list[Arrival]:
        return self.recorder.arrivals

    async def wait_for(self, wanted: Callable[[Arrival], bool], timeout: float) -> Arrival:
        """The first arrival `wanted` accepts; TimeoutError after `timeout` seconds."""
        async def look() -> Arrival:
            while True:
                for arrival in self.recorder.arrivals:
                    if wanted(arrival):
                        return arrival
                self.recorder.changed.clear()
                await self.recorder.changed.wait()
        return await asyncio.wait_for(look(), timeout)


# -- sending MTAs ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Submission:
    accepted: bool
    reply: str  # the gateway's last reply, "250 ..." or the refusal


async def submit(port: int, anchors: Path, client: tuple[Path, Path] | None, helo: str,
                 sender: str, recipients: Sequence[str], data: bytes) -> Submission:
    """Hand a message to the gateway over STARTTLS, as a network's MTA does."""
    context = ssl.create_default_context(cafile=str(anchors))
    if client is not None:
        context.load_cert_chain(client[0], client[1])
    smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=True, tls_context=context,
                           local_hostname=helo, timeout=20)
    await smtp.connect()
    try:
        refused, reply = await smtp.sendmail(sender, list(recipients), data)
    except aiosmtplib.SMTPRecipientsRefused as error:
        first = error.recipients[0]
        return Submission(False, f"{first.code} {first.message}")
    except aiosmtplib.SMTPResponseException as error:
        return Submission(False, f"{error.code} {error.message}")
    finally:
        with contextlib.suppress(aiosmtplib.SMTPException, OSError):
            await smtp.quit()
        smtp.close()
    if refused:
        code, text = next(iter(refused.values()))
        return Submission(False, f"{code} {text}")
    return Submission(True, reply)


# -- the senders' mail clients ---------------------------------------------------------------


def smime_client(pki: DemoPki, doctor: Person, content: bytes, now: dt.datetime) -> bytes:
    """What a doctor's S/MIME client sends: signed with their key, encrypted to the gateway."""
    context = WrapContext(
        network="medecin",
        identity=Identity(doctor.address, certificate=doctor.certificate,
                          private_key=doctor.key, chain=(pki.organisations,)),
        trust=TrustStore(anchors=(pki.root,)),
        directory=Directory(x509=(pki.gateway_smime, pki.organisations)),
        now=now, sender=doctor.address, recipients=(GATEWAY_SMIME_ADDRESS,),
    )
    wrapped = SmimeAdapter().wrap(Unwrapped(content, Verdict.unsigned(), "mime"), context)
    if wrapped.refused:
        raise RuntimeError(f"the doctor's client cannot encrypt to the gateway: "
                           f"{next(iter(wrapped.refused.values())).detail}")
    return wrapped.content


def tampered_smime(pki: DemoPki, doctor: Person, content: bytes, now: dt.datetime,
                   change: tuple[bytes, bytes]) -> bytes:
    """Signed by the doctor, then `change` made to the signed text, then encrypted."""
    signed_part = seven_bit(content)
    key: PrivateKeyTypes = doctor.key
    der, micalg = sign_content(signed_part, doctor.certificate, key,
                               chain=(pki.organisations,), now=now, detached=True)
    before, after = change
    # The same 7-bit encoding of the changed text: what a plug-in editing signed text yields.
    altered = seven_bit(content.replace(before, after))
    if altered == signed_part:
        raise RuntimeError(f"the text to tamper with ({before!r}) is not in the message")
    boundary = b"=_demo_signed_" + os.urandom(6).hex().encode()
    signature = base64.encodebytes(der).replace(b"\n", b"\r\n")
    multipart = (
        b'Content-Type: multipart/signed; protocol="application/pkcs7-signature"; '
        b"micalg=" + micalg.encode() + b'; boundary="' + boundary + b'"\r\n\r\n'
        b"--" + boundary + b"\r\n" + altered + b"\r\n--" + boundary + b"\r\n"
        b"Content-Type: application/pkcs7-signature; name=smime.p7s\r\n"
        b"Content-Transfer-Encoding: base64\r\n"
        b"Content-Disposition: attachment; filename=smime.p7s\r\n\r\n" + signature
        + b"--" + boundary + b"--\r\n"
    )
    envelope = encrypt_content(multipart, [pki.gateway_smime], random=os.urandom)
    head = parse_entity(content).head
    outer = b"".join(raw for name, raw in field_blocks(head)
                     if not name.startswith("content-") and name != "mime-version")
    return outer + (
        b"MIME-Version: 1.0\r\n"
        b"Content-Type: application/pkcs7-mime; smime-type=enveloped-data; name=smime.p7m\r\n"
        b"Content-Transfer-Encoding: base64\r\n"
        b"Content-Disposition: attachment; filename=smime.p7m\r\n\r\n"
    ) + base64.encodebytes(envelope).replace(b"\n", b"\r\n")


def gp_client(pki: DemoPki, gp: str, content: bytes, now: dt.datetime) -> bytes:
    """What a GP's Apicrypt client sends: the text block encrypted to the gateway, signed."""
    context = WrapContext(
        network="apicrypt",
        identity=Identity(gp, openpgp_secret=pki.gps[gp]),
        trust=TrustStore(),
        directory=Directory(openpgp=(pki.gateway_pgp_public,)),
        now=now, sender=gp, recipients=(GATEWAY_PGP_ADDRESS,),
        options={"codec": "openpgp", "version": 1},
    )
    wrapped = ApicryptAdapter().wrap(Unwrapped(content, Verdict.unsigned(), "mime"), context)
    if wrapped.refused:
        raise RuntimeError(f"the GP's client cannot encrypt to the gateway: "
                           f"{next(iter(wrapped.refused.values())).detail}")
    return wrapped.content


# -- the recipients' mail clients ------------------------------------------------------------


@dataclass(frozen=True)
class Reading:
    """What a recipient's client made of a message: decrypted content and who signed it."""

    ok: bool
    content: bytes  # the decrypted, verified message (empty when not ok)
    signer: str | None  # mail address of the signature that verified
    tool: str  # which program read it
    detail: str = ""  # why it could not be read


def _run(command: list[str], env: dict[str, str] | None = None,
         data: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(command, input=data, capture_output=True, timeout=60, check=False,
                          env=env)


def read_smime(raw: bytes, doctor: Person, pki: DemoPki, now: dt.datetime) -> Reading:
    """Decrypt with the doctor's key and verify the gateway's signature."""
    if OPENSSL is None:
        return _read_smime_adapter(raw, doctor, pki, now)
    with tempfile.TemporaryDirectory(prefix="passerelle-demo-") as folder:
        work = Path(folder)
        (work / "in.eml").write_bytes(raw)
        done = _run([OPENSSL, "cms", "-decrypt", "-in", str(work / "in.eml"),
                     "-recip", str(doctor.certificate_path), "-inkey", str(doctor.key_path),
                     "-out", str(work / "signed.eml")])
        if done.returncode != 0:
            return Reading(False, b"", None, "openssl cms",
                           "decrypt: " + done.stderr.decode(errors="replace").strip()[:200])
        done = _run([OPENSSL, "cms", "-verify", "-in", str(work / "signed.eml"),
                     "-CAfile", str(pki.anchors), "-signer", str(work / "signer.pem"),
                     "-out", str(work / "content.eml")])
        if done.returncode != 0:
            return Reading(False, b"", None, "openssl cms",
                           "verify: " + done.stderr.decode(errors="replace").strip()[:200])
        signer = x509.load_pem_x509_certificate((work / "signer.pem").read_bytes())
        addresses = sorted(certificate_addresses(signer))
        return Reading(True, (work / "content.eml").read_bytes(),
                       addresses[0] if addresses else None, "openssl cms")


def _read_smime_adapter(raw: bytes, doctor: Person, pki: DemoPki, now: dt.datetime) -> Reading:
    context = UnwrapContext(
        network="medecin",
        identity=Identity(doctor.address, certificate=doctor.certificate,
                          private_key=doctor.key),
        trust=TrustStore(anchors=(pki.root,)),
        directory=Directory(x509=(pki.gateway_smime, pki.organisations)),
        now=now,
    )
    return _judge(lambda: SmimeAdapter().unwrap(raw, context), fingerprint(pki.gateway_smime),
                  "adapters.smime (openssl not found)", GATEWAY_SMIME_ADDRESS)


def _judge(unwrap: Callable[[], Unwrapped], gateway_key: str, tool: str,
           gateway_address: str) -> Reading:
    try:
        unwrapped = unwrap()
    except GatewayError as error:
        return Reading(False, b"", None, tool, error.detail or error.advice)
    verdict = unwrapped.signature
    # The gateway signs for authors of other networks, so its key never names the From:
    # address; the signature itself verified when that mismatch is the only complaint.
    by_gateway = gateway_key in verdict.fingerprints
    if verdict.result == "pass" or (by_gateway and verdict.failure == Reason.SIGNER_MISMATCH):
        return Reading(unwrapped.encrypted, unwrapped.content,
                       gateway_address if by_gateway else verdict.signer, tool,
                       "" if unwrapped.encrypted else "not encrypted")
    return Reading(False, b"", None, tool, f"signature {verdict.result}: {verdict.reason}")


def read_apicrypt(raw: bytes, gp: str, pki: DemoPki, now: dt.datetime) -> Reading:
    """Decrypt every block of an Apicrypt-layout message with the GP's key; check signatures."""
    if GPG is None:
        context = UnwrapContext(
            network="apicrypt", identity=Identity(gp, openpgp_secret=pki.gps[gp]),
            trust=TrustStore(), directory=Directory(openpgp=(pki.gateway_pgp_public,)),
            now=now, options={"codec": "openpgp", "version": 1},
        )
        directory = Directory(openpgp=(pki.gateway_pgp_public,))
        gateway_key = key_index(directory).certs[0].fingerprint
        return _judge(lambda: ApicryptAdapter().unwrap(raw, context), gateway_key,
                      "adapters.apicrypt (gpg not found)", GATEWAY_PGP_ADDRESS)
    home = Path(tempfile.mkdtemp(prefix="passerelle-demo-gpg-"))
    env = {**os.environ, "GNUPGHOME": str(home), "LC_ALL": "C"}
    base = [GPG, "--homedir", str(home), "--batch", "--no-tty", "--yes", "--trust-model",
            "always", "--status-fd", "2"]
    try:
        home.chmod(0o700)
        for key in (pki.gps[gp], pki.gateway_pgp_public):
            done = _run([*base, "--import"], env, key)
            if done.returncode != 0:
                return Reading(False, b"", None, "gpg", "cannot import the keys")
        return _gpg_open(raw, base, env)
    finally:
        if GPGCONF is not None:
            # gpg starts an agent for the secret key; it must not outlive the demo.
            _run([GPGCONF, "--homedir", str(home), "--kill", "all"], env)
        shutil.rmtree(home, ignore_errors=True)


def _gpg_open(raw: bytes, base: list[str], env: dict[str, str]) -> Reading:
    entity = parse_entity(raw)
    outer = b"".join(block for name, block in field_blocks(entity.head)
                     if not name.startswith("content-") and name != "mime-version")
    signers: set[str] = set()
    parts: list[Leaf] = []
    for leaf in leaves(raw):
        sealed = leaf.data
        done = _run([*base, "--decrypt"], env, sealed)
        status = done.stderr.decode(errors="replace")
        if done.returncode != 0 or "[GNUPG:] DECRYPTION_OKAY" not in status:
            return Reading(False, b"", None, "gpg", "a block does not decrypt with the key")
        good = [line for line in status.splitlines() if line.startswith("[GNUPG:] GOODSIG")]
        if not good:
            return Reading(False, b"", None, "gpg", "a block is not signed")
        signers.update(line.rpartition("<")[2].rstrip(">") for line in good)
        name = leaf.filename[:-4] if leaf.filename and leaf.filename.endswith(".apz") else None
        parts.append(Leaf("text/plain" if name is None else "application/octet-stream",
                          name, done.stdout, leaf.charset))
    if len(signers) != 1:
        return Reading(False, b"", None, "gpg", f"signed by {sorted(signers)}")
    return Reading(True, _rebuild(outer, parts), signers.pop(), "gpg")


def _rebuild(outer: bytes, parts: Sequence[Leaf]) -> bytes:
    """A plain MIME message from decrypted leaves, as the user's client would file it."""
    boundary = b"=_demo_decrypted"
    body = b""
    for part in parts:
        head = b"Content-Type: " + part.media_type.encode()
        if part.charset:
            head += b"; charset=" + part.charset.encode()
        if part.filename:
            head += b'\r\nContent-Disposition: attachment; filename="' + part.filename.encode()
            head += b'"'
        body += (b"--" + boundary + b"\r\n" + head + b"\r\nContent-Transfer-Encoding: base64"
                 b"\r\n\r\n" + base64.encodebytes(part.data).replace(b"\n", b"\r\n"))
    return (outer + b"MIME-Version: 1.0\r\n"
            b'Content-Type: multipart/mixed; boundary="' + boundary + b'"\r\n\r\n'
            + body + b"--" + boundary + b"--\r\n")

