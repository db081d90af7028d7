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

_GIVEN: set[int] = set()


def free_port() -> int:
    """A port free now and never handed out before in this test run: the kernel may give the
    same ephemeral port to two binds in a row once the first is closed, and a world that
    listens on both would be refused (a port listed twice)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port: int = s.getsockname()[1]
        if port not in _GIVEN:
            _GIVEN.add(port)
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
    def __init__(self, name: str, tls: ssl.SSLContext | None, port: int | None = None) -> None:
        self.name = name
        self.tls = tls
        self._reserved: socket.socket | None = None
        if port is None:
            # The port stays bound from now on, so no other test (nor an outgoing connection)
            # can take it between the moment the world's routing.yaml names it and start().
            self._reserved = socket.socket()
            self._reserved.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self._reserved.bind(("127.0.0.1", 0))
            port = int(self._reserved.getsockname()[1])
        self.port = port  # given: another sink's port, taken over (it must not be listening)
        self.handler = SinkHandler()
        self.server: asyncio.Server | None = None
        self.protocols: list[SMTP] = []

    async def start(self) -> None:
        loop = asyncio.get_running_loop()

        def factory() -> SMTP:
            self.handler.connections += 1
            protocol = SMTP(self.handler, hostname=f"sink.{self.name}", decode_data=False,
                            tls_context=self.tls, require_starttls=False)
            self.protocols.append(protocol)
            return protocol

        if self._reserved is not None:
            reserved, self._reserved = self._reserved, None
            self.server = await loop.create_server(factory, sock=reserved)
        else:  # started again after stop(): the next hop comes back on the same port
            self.server = await loop.create_server(factory, "127.0.0.1", self.port)

    async def stop(self) -> None:
        """The next hop goes down: no more connections, and open ones are cut."""
        if self._reserved is not None:
            self._reserved.close()
            self._reserved = None
        if self.server is not None:
            self.server.close()
            self.server = None
        for protocol in self.protocols:
            if protocol.transport is not None:
                protocol.transport.close()
        self.protocols.clear()

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


# -- the MSSanté trust space (issue 5): whitelist peers, CRLs, an IGC-Santé-shaped PKI --------


def mssante_whitelist_xml(entries: list[tuple[str, str]], *, closed: bool = False) -> bytes:
    """A list in the official format; like the published one, without its closing root tag
    unless `closed`."""
    from xml.sax.saxutils import escape

    body = "".join(
        "        <Domaine>\n"
        f"            <Nom>{escape(domain)}</Nom>\n"
        "            <Description>Domaine de test</Description>\n"
        f"            <DNCertificatOperateur>{escape(dn)}</DNCertificatOperateur>\n"
        "            <ResponsableContact>01 00 00 00 00, test@example.test</ResponsableContact>\n"
        "            <SupportContact>01 00 00 00 00, test@example.test</SupportContact>\n"
        "            <DateMAJ>2025-03-13T14:54:10Z</DateMAJ>\n"
        "        </Domaine>\n"
        for domain, dn in entries
    )
    text = (
        '<?xml version="1.0" encoding="UTF-8"?><ListeBlancheMSSante '
        'xmlns="https://listeblanche.mssante.fr/schema">\n'
        "    <DateDeGeneration>2025-03-13T14:54:10Z</DateDeGeneration>\n"
        f"    <ListeDomaines>\n{body}    </ListeDomaines>\n"
        + ("</ListeBlancheMSSante>\n" if closed else "")
    )
    return text.encode("utf-8")


def sink_context_for(issued: testpki.Issued, root: Path, name: str) -> ssl.SSLContext:
    """A sink's TLS context presenting `issued` (for next hops with a chosen certificate)."""
    cert, key = root / "pki" / f"sink-{name}.pem", root / "pki" / f"sink-{name}.key"
    cert.write_bytes(issued.chain_pem())
    key.write_bytes(issued.key_pem)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    context.load_verify_locations(cafile=str(root / "pki" / "ca.pem"))
    context.verify_mode = ssl.CERT_OPTIONAL
    return context


def reversed_subject(issued: testpki.Issued) -> Any:
    """The subject of `issued` with its RDNs in the opposite order (same attributes)."""
    from cryptography import x509

    return x509.Name(list(reversed(list(issued.certificate.subject))))


@dataclass
class MssanteWorld(World):
    """`World` for the trust space. `operators` maps a role to a client certificate:
    listed, nosan, revoked, expired, unlisted, cn_twin, reordered, untrusted."""

    operators: dict[str, testpki.Issued] = field(default_factory=dict)
    whitelist: Path = Path()
    listed: list[tuple[str, str]] = field(default_factory=list)

    def dn(self, role: str) -> str:
        from gateway.dn import dn_from_name

        return str(dn_from_name(self.operators[role].certificate.subject))

    def write_whitelist(self, entries: list[tuple[str, str]]) -> None:
        self.listed = list(entries)
        self.whitelist.write_bytes(mssante_whitelist_xml(entries))


def build_mssante_world(root: Path, *, retry: str = "[1s, 2s]", give_up: str = "1h",
                        x_mss_nil: str | None = None) -> MssanteWorld:
    """Networks:
    - mssante   *.mssante-test.fr        peers {whitelist: mssante}, relay = sink "mssante"
                                          (tls required, whitelist: mssante)
    - autre     *.autre-mssante-test.fr  peers {whitelist: mssante}, relay = sink "revokedhop"
                                          whose certificate is listed but revoked
    - clinic    clinique-test.fr         peers by address 127.0.0.1, relay = sink "clinic"
    Routes: mssante -> clinic, autre -> clinic, clinic -> mssante, autre.
    Whitelist: a.mssante-test.fr (listed, revoked, expired, next hop), b (nosan, next hop),
    c (listed only: the next hop is NOT listed), d.autre-mssante-test.fr (revoked next hop).
    """
    from cryptography import x509 as _x509

    pki_dir = root / "pki"
    pki_dir.mkdir(parents=True, exist_ok=True)
    (root / "data").mkdir(parents=True, exist_ok=True)
    pki = testpki.IgcSante.create()
    (pki_dir / "ca.pem").write_bytes(pki.root.cert_pem + pki.organisations.cert_pem)
    gateway_cert = pki.server("passerelle.test", dns=["passerelle.test", "localhost"],
                              ips=["127.0.0.1"], structure="1690000000", org="PASSERELLE TEST")
    (pki_dir / "gateway.pem").write_bytes(gateway_cert.chain_pem())
    (pki_dir / "gateway.key").write_bytes(gateway_cert.key_pem)
    (pki_dir / "gateway.key").chmod(0o600)
    now = testpki.NOW
    import datetime as _dt

    operators = {
        # FINESS-shaped (1+) and SIRET-shaped (3+) structure identifiers, as IGC-Santé writes.
        "listed": pki.server("mx.operateur-a.test", structure="1750000001",
                             org="CH OPERATEUR A", department="Paris (75)"),
        "nosan": pki.server("mx.operateur-b.test", structure="312345678900017",
                            org="OPERATEUR B", department="Gironde (33)", dns=[]),
        "revoked": pki.server("mx.operateur-r.test", structure="1750000002",
                              org="CH REVOQUE", department="Paris (75)"),
        "expired": pki.server("mx.operateur-e.test", structure="1750000003",
                              org="CH EXPIRE", department="Paris (75)",
                              not_before=now - _dt.timedelta(days=400),
                              not_after=now - _dt.timedelta(days=1)),
        "unlisted": pki.server("mx.inconnu.test", structure="1990000000", org="INCONNU",
                               department="Nord (59)"),
        # Same CN as the listed operator, another organisation: must not pass as it.
        "cn_twin": pki.server("mx.operateur-a.test", structure="1990000001", org="IMPOSTEUR",
                              department="Paris (75)"),
        "untrusted": testpki.IgcSante.create().server(
            "mx.operateur-a.test", structure="1750000001", org="CH OPERATEUR A",
            department="Paris (75)"),
    }
    listed = operators["listed"]
    operators["reordered"] = pki.organisations.issue(
        reversed_subject(listed), dns=["mx.operateur-a.test"])
    pki.organisations.revoke(operators["revoked"])
    revoked_hop = pki.server("mx.revokedhop.test", dns=["mx.revokedhop.test", "localhost"],
                             ips=["127.0.0.1"], structure="1750000009", org="CH HOP REVOQUE")
    pki.organisations.revoke(revoked_hop)
    (pki_dir / "root.crl").write_bytes(testpki.crl_pem(pki.root.crl()))
    (pki_dir / "organisations.crl").write_bytes(testpki.crl_pem(pki.organisations.crl()))
    sinks = {
        "mssante": Sink("mssante", sink_context(pki, root, "mssante")),
        "revokedhop": Sink("revokedhop", sink_context_for(revoked_hop, root, "revokedhop")),
        "clinic": Sink("clinic", sink_context(pki, root, "clinic")),
    }
    from gateway.dn import dn_from_name

    def dn(issued: testpki.Issued | _x509.Certificate) -> str:
        cert = issued if isinstance(issued, _x509.Certificate) else issued.certificate
        return str(dn_from_name(cert.subject))

    next_hop = _x509.load_pem_x509_certificate((pki_dir / "sink-mssante.pem").read_bytes())
    # The listed operator's DN as an operator might type it: other case, extra spaces.
    typed = ("cn=MX.OPERATEUR-A.TEST, ou=1750000001, o=CH  Operateur A, "
             "stateOrProvinceName=paris (75), c=fr")
    entries = [
        ("a.mssante-test.fr", typed),
        ("A.mssante-test.fr", dn(operators["revoked"])),
        ("a.mssante-test.fr", dn(operators["expired"])),
        ("a.mssante-test.fr", dn(next_hop)),
        ("b.mssante-test.fr", dn(operators["nosan"])),
        ("b.mssante-test.fr", dn(next_hop)),
        ("c.mssante-test.fr", dn(listed)),
        ("d.autre-mssante-test.fr", dn(revoked_hop)),
        ("d.autre-mssante-test.fr", dn(listed)),
    ]
    whitelist = root / "data" / "listeblanchemssante.xml"
    whitelist.write_bytes(mssante_whitelist_xml(entries))
    port, implicit_port = free_port(), free_port()
    nil = f"\n            x_mss_nil: {x_mss_nil}" if x_mss_nil is not None else ""
    text = textwrap.dedent(f"""\
        version: 1
        gateway:
          hostname: passerelle.test
          listen:
            - {{address: 127.0.0.1, port: {port}, tls: starttls, client_certificate: optional}}
            - {{address: 127.0.0.1, port: {implicit_port}, tls: implicit, client_certificate: optional}}
          tls: {{certificate: pki/gateway.pem, key: pki/gateway.key}}
          spool: {{path: var/spool}}
          audit: {{path: var/audit}}
          max_message_size: 1MiB
          retry: {{schedule: {retry}, give_up_after: {give_up}}}
        trust:
          anchors: [pki/ca.pem]
          crls: [pki/root.crl, pki/organisations.crl]
          mssante_whitelist: data/listeblanchemssante.xml
        networks:
          mssante:
            adapter: mime
            domains: ["*.mssante-test.fr"]
            peers: {{whitelist: mssante}}
            relay: {{host: 127.0.0.1, port: {sinks["mssante"].port}, tls: required, whitelist: mssante}}{nil}
          autre:
            adapter: mime
            domains: ["*.autre-mssante-test.fr"]
            peers: {{whitelist: mssante}}
            relay: {{host: 127.0.0.1, port: {sinks["revokedhop"].port}, tls: required, whitelist: mssante}}
          clinic:
            adapter: mime
            domains: [clinique-test.fr]
            peers: {{addresses: [127.0.0.1]}}
            relay: {{host: 127.0.0.1, port: {sinks["clinic"].port}, tls: opportunistic}}
        routes:
          - {{from: mssante, to: [clinic]}}
          - {{from: autre, to: [clinic]}}
          - {{from: clinic, to: [mssante, autre]}}
        """)
    config = root / "routing.yaml"
    config.write_text(text)
    return MssanteWorld(root, pki, gateway_cert, listed, operators["unlisted"], sinks, port,
                        implicit_port, config, operators=operators, whitelist=whitelist,
                        listed=entries)
