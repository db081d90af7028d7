"""A small world for end-to-end tests: a test PKI, recording SMTP sinks, and a routing.yaml.

Networks (all `mime`; crypto adapters add their own worlds):
- hospital  chu-test.fr            peers by certificate subject (mutual TLS), relay = sink "hospital"
- clinic    clinique-test.fr,      peers by address 127.0.0.1,  relay = sink "clinic"
            *.mssante-test.fr
- lab       labo-test.fr           peers by address 127.0.0.2 (nobody here), relay = sink "lab"
Routes: hospital -> clinic, clinic -> hospital. Nothing routes to lab.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import textwrap
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiosmtpd.smtp import SMTP, Envelope, Session

from tests.support import testpki


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class Received:
    sender: str
    recipients: list[str]
    data: bytes
    peer_certificate: dict[str, Any] | None = None


@dataclass
class SinkHandler:
    """Records what arrives; `script` lets a test choose replies ("RCPT addr" / "DATA" keys)."""

    messages: list[Received] = field(default_factory=list)
    data_replies: list[str] = field(default_factory=list)  # consumed one per DATA
    rcpt_replies: dict[str, str] = field(default_factory=dict)  # address -> reply
    connections: int = 0
    arrived: asyncio.Event = field(default_factory=asyncio.Event)

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope,
                          address: str, options: list[str]) -> str:
        reply = self.rcpt_replies.get(address)
        if reply and not reply.startswith("250"):
            return reply
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        if self.data_replies:
            reply = self.data_replies.pop(0)
            if not reply.startswith("250"):
                return reply
        cert = None
        ssl_object = server.transport.get_extra_info("ssl_object") if server.transport else None
        if ssl_object is not None:
            cert = ssl_object.getpeercert() or None
        self.messages.append(Received(envelope.mail_from, list(envelope.rcpt_tos),
                                      envelope.original_content, cert))
        self.arrived.set()
        return "250 2.0.0 OK sink"


class Sink:
    def __init__(self, name: str, tls: ssl.SSLContext | None) -> None:
        self.name = name
        self.tls = tls
        self.port = free_port()
        self.handler = SinkHandler()
        self.server: asyncio.Server | None = None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()

        def factory() -> SMTP:
            self.handler.connections += 1
            return SMTP(self.handler, hostname=f"sink.{self.name}", decode_data=False,
                        tls_context=self.tls, require_starttls=False)

        self.server = await loop.create_server(factory, "127.0.0.1", self.port)

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None

    @property
    def messages(self) -> list[Received]:
        return self.handler.messages

    async def wait(self, count: int = 1, timeout: float = 20.0) -> list[Received]:
        async def until() -> None:
            while len(self.handler.messages) < count:
                self.handler.arrived.clear()
                await self.handler.arrived.wait()
        await asyncio.wait_for(until(), timeout)
        return self.handler.messages


@dataclass
class World:
    root: Path
    pki: testpki.IgcSante
    gateway_cert: testpki.Issued
    hospital_client: testpki.Issued
    stranger_client: testpki.Issued  # chains to the anchors, but is listed nowhere
    sinks: dict[str, Sink]
    port: int  # the gateway's STARTTLS listener
    implicit_port: int  # the gateway's implicit-TLS listener
    config: Path
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def anchor(self) -> Path:
        return self.root / "pki" / "ca.pem"

    def client_context(self, who: testpki.Issued | None) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.anchor))
        context.check_hostname = False  # the gateway's name is 127.0.0.1 here
        if who is not None:
            folder = self.root / "pki" / "clients"
            stem = who.certificate.serial_number
            cert, key = folder / f"{stem}.pem", folder / f"{stem}.key"
            if not cert.exists():
                folder.mkdir(parents=True, exist_ok=True)
                cert.write_bytes(who.chain_pem())
                key.write_bytes(who.key_pem)
            context.load_cert_chain(cert, key)
        return context


def sink_context(pki: testpki.IgcSante, root: Path, name: str) -> ssl.SSLContext:
    issued = pki.server(f"mx.{name}.test", dns=[f"mx.{name}.test", "localhost"], ips=["127.0.0.1"])
    cert, key = root / "pki" / f"sink-{name}.pem", root / "pki" / f"sink-{name}.key"
    cert.write_bytes(issued.chain_pem())
    key.write_bytes(issued.key_pem)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    context.load_verify_locations(cafile=str(root / "pki" / "ca.pem"))
    context.verify_mode = ssl.CERT_OPTIONAL
    return context


def build_world(root: Path, *, retry: str = "[1s, 2s]", give_up: str = "1h",
                spool_key: bool = False, relay_host: str = "127.0.0.1",
                edit: Callable[[str], str] | None = None) -> World:
    pki_dir = root / "pki"
    pki_dir.mkdir(parents=True, exist_ok=True)
    pki = testpki.IgcSante.create()
    (pki_dir / "ca.pem").write_bytes(pki.root.cert_pem + pki.organisations.cert_pem)
    gateway_cert = pki.server("passerelle.test", dns=["passerelle.test", "localhost"],
                              ips=["127.0.0.1"])
    (pki_dir / "gateway.pem").write_bytes(gateway_cert.chain_pem())
    (pki_dir / "gateway.key").write_bytes(gateway_cert.key_pem)
    (pki_dir / "gateway.key").chmod(0o600)
    hospital = pki.server("mx.chu-test.fr", structure="1750000001", org="CHU TEST")
    stranger = pki.server("mx.inconnu.test", structure="1990000000", org="INCONNU")
    if spool_key:
        (pki_dir / "spool.key").write_bytes(bytes(range(32)))
        (pki_dir / "spool.key").chmod(0o600)
    sinks = {name: Sink(name, sink_context(pki, root, name)) for name in ("hospital", "clinic", "lab")}
    port, implicit_port = free_port(), free_port()
    hospital_dn = hospital.certificate.subject.rfc4514_string()
    spool_line = "  spool: {path: var/spool" + (", encryption_key: pki/spool.key}" if spool_key else "}")
    text = textwrap.dedent(f"""\
        version: 1
        gateway:
          hostname: passerelle.test
          listen:
            - {{address: 127.0.0.1, port: {port}, tls: starttls, client_certificate: optional}}
            - {{address: 127.0.0.1, port: {implicit_port}, tls: implicit, client_certificate: optional}}
          tls: {{certificate: pki/gateway.pem, key: pki/gateway.key}}
        {spool_line}
          audit: {{path: var/audit}}
          max_message_size: 1MiB
          retry: {{schedule: {retry}, give_up_after: {give_up}}}
        trust:
          anchors: [pki/ca.pem]
        networks:
          hospital:
            adapter: mime
            domains: [chu-test.fr]
            peers: {{subjects: ["{hospital_dn}"]}}
            relay: {{host: {relay_host}, port: {sinks["hospital"].port}, tls: required}}
          clinic:
            adapter: mime
            domains: [clinique-test.fr, "*.mssante-test.fr"]
            peers: {{addresses: [127.0.0.1]}}
            relay: {{host: {relay_host}, port: {sinks["clinic"].port}, tls: opportunistic}}
          lab:
            adapter: mime
            domains: [labo-test.fr]
            peers: {{addresses: [127.0.0.2]}}
            relay: {{host: {relay_host}, port: {sinks["lab"].port}, tls: none}}
        routes:
          - {{from: hospital, to: [clinic]}}
          - {{from: clinic, to: [hospital]}}
        """)
    if edit is not None:
        text = edit(text)
    config = root / "routing.yaml"
    config.write_text(text)
    return World(root, pki, gateway_cert, hospital, stranger, sinks, port, implicit_port, config)


def message(sender: str, recipient: str, subject: str = "Compte rendu", body: str = "Bonjour.\r\n",
            extra: str = "") -> bytes:
    return (
        f"From: <{sender}>\r\nTo: <{recipient}>\r\nSubject: {subject}\r\n"
        f"Message-ID: <{abs(hash((sender, recipient, subject, body)))}@test>\r\n"
        f"Date: Mon, 23 Nov 2026 10:00:00 +0100\r\nMIME-Version: 1.0\r\n"
        f"Content-Type: text/plain; charset=utf-8\r\n{extra}\r\n{body}"
    ).encode()
