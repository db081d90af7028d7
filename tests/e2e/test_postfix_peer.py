"""A real Postfix (Debian's) as a hospital MTA of the MSSanté space, peering with the gateway
over mutually authenticated TLS on 127.0.0.1 (DESIGN.md §1, issue 5).

- Postfix relays a hospital's mail to the gateway (`smtp_tls_security_level = secure`: it
  verifies the gateway's certificate and name) presenting an IGC-Santé-shaped client
  certificate without subjectAltName whose DN the whitelist lists for the sender's domain;
  the gateway delivers to a sink.
- The same Postfix sends for a domain its DN is not listed for: the gateway answers
  550 5.7.1 at MAIL FROM, Postfix bounces the message and logs the gateway's reply, and only
  the audit trail says which DN was presented and which the list expects.
- The gateway delivers into the hospital through Postfix with `tls: required` and
  `relay.whitelist: mssante`, presenting its client certificate; Postfix insists on a
  verified client certificate on that port (`smtpd_tls_req_ccert`) and logs the TLS session.

Postfix runs as a private instance (../shared/notes/postfix-baseline.md): its own main.cf and
master.cf, queue and log file under one fixed folder, since the default main.cf must name the
folder in `alternate_config_directories` (added once, only if missing). A lock file keeps two
test runs on the same machine from sharing it. Needs root and the postfix package (`make test`
installs it).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import re
import shutil
import socket
import subprocess
import textwrap
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest

from gateway.audit import read_records
from gateway.dn import dn_from_name
from tests.e2e.conftest import Running, start
from tests.support import testpki
from tests.support.world import (
    Sink,
    World,
    free_port,
    message,
    mssante_whitelist_xml,
    sink_context,
)

pytestmark = [pytest.mark.e2e, pytest.mark.interop]

SBIN = "/usr/sbin:/usr/bin:/sbin:/bin"
POSTFIX = shutil.which("postfix", path=SBIN)
DEFAULT_MAIN_CF = Path("/etc/postfix/main.cf")
# One fixed folder, so that the line naming it in the default main.cf is written once.
BASE = Path("/var/tmp/passerelle-test-postfix")
LOCK = Path("/var/tmp/passerelle-test-postfix.lock")

if POSTFIX is None or os.geteuid() != 0 or not DEFAULT_MAIN_CF.exists():
    pytestmark.append(pytest.mark.skip(
        reason="needs root and Debian's postfix package (make test installs it)"))

HOSPITAL = "hopital.mssante-test.fr"  # the Postfix MTA's own domain (its mailboxes: a sink)
UNLISTED = "c.mssante-test.fr"  # a domain the whitelist lists for another operator only
CLINIC = "secretariat@clinique-test.fr"


@dataclass
class PostfixPeer:
    """The private Postfix instance and what the tests look at."""

    directory: Path
    submission_port: int  # plain SMTP from the test (mynetworks), as the hospital's users
    tls_port: int  # where the gateway delivers: TLS and a verified client certificate required
    client_dn: str  # the DN Postfix presents to the gateway (RFC 4514, as the list writes it)
    server_dn: str

    @property
    def etc(self) -> Path:
        return self.directory / "etc"

    @property
    def maillog(self) -> Path:
        return self.directory / "maillog"

    def log(self) -> str:
        try:
            return self.maillog.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    async def wait_log(self, pattern: str, timeout: float = 15.0) -> re.Match[str]:
        """The first maillog line matching `pattern`, waiting for Postfix to write it."""
        compiled = re.compile(pattern)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            found = compiled.search(self.log())
            if found is not None:
                return found
            if loop.time() > deadline:
                raise AssertionError(f"Postfix never logged {pattern!r}; its log:\n{self.log()}")
            await asyncio.sleep(0.1)

    async def submit(self, sender: str, recipient: str, data: bytes) -> None:
        """Hand a message to Postfix as a hospital mail client would."""
        smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=self.submission_port,
                               start_tls=False, timeout=20)
        await smtp.connect()
        try:
            await smtp.sendmail(sender, [recipient], data)
        finally:
            await smtp.quit()


def _postfix(etc: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[bytes]:
    assert POSTFIX is not None
    done = subprocess.run([POSTFIX, "-c", str(etc), *args], capture_output=True, timeout=60,
                          check=False, env={**os.environ, "PATH": SBIN})
    if check and done.returncode != 0:
        raise AssertionError(f"postfix {' '.join(args)} failed: {done.stderr.decode()}")
    return done


def _name_alternate_config_directory(etc: Path) -> None:
    """Postfix refuses `-c DIR` unless the default main.cf names DIR; add it if missing.

    What counts is the value Postfix reads (the last assignment wins), so it is asked of
    `postconf`; `postconf -e` then rewrites the setting in place with the folders already
    named kept first, instead of appending a second assignment that would hide theirs."""
    postconf = shutil.which("postconf", path=SBIN)
    assert postconf is not None
    environment = {**os.environ, "PATH": SBIN}
    named = subprocess.run([postconf, "-c", str(DEFAULT_MAIN_CF.parent), "-h",
                            "alternate_config_directories"], capture_output=True, check=True,
                           timeout=30, env=environment).stdout.decode().replace(",", " ").split()
    if str(etc) in named:
        return
    setting = "alternate_config_directories = " + " ".join([*named, str(etc)])
    subprocess.run([postconf, "-c", str(DEFAULT_MAIN_CF.parent), "-e", setting],
                   capture_output=True, check=True, timeout=30, env=environment)


def _master_cf(submission_port: int, tls_port: int) -> str:
    """Debian's master.cf, without chroot (the queue is outside /var/spool/postfix), with
    `smtp inet` on the submission port and a second smtpd on the TLS port."""
    lines = []
    for raw in Path("/etc/postfix/master.cf").read_text().splitlines():
        fields = raw.split()
        if raw and not raw[0].isspace() and not raw.startswith("#") and len(fields) >= 8:
            if fields[0] == "smtp" and fields[1] == "inet":
                fields[0] = f"127.0.0.1:{submission_port}"
            fields[4] = "n"
            raw = "  ".join(fields)
        lines.append(raw)
    lines.append(f"127.0.0.1:{tls_port}  inet  n  -  n  -  -  smtpd"
                 " -o smtpd_tls_security_level=encrypt -o smtpd_tls_req_ccert=yes")
    return "\n".join(lines) + "\n"


def _stop(etc: Path) -> None:
    """Stop the instance and wait for its master process (the one this test started, by the
    pid it wrote) to be gone; `postfix abort` if it does not go."""
    pid_file = BASE / "spool" / "pid" / "master.pid"
    try:
        pid = int(pid_file.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        pid = None
    _postfix(etc, "stop", check=False)
    for _ in range(200):
        if pid is None or not _alive(pid):
            return
        time.sleep(0.05)
    _postfix(etc, "abort", check=False)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _wait_listening(port: int, peer: PostfixPeer) -> None:
    for _ in range(200):
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"Postfix does not listen on {port}; its log:\n{peer.log()}")


@contextlib.contextmanager
def _postfix_instance(pki: testpki.IgcSante, gateway_port: int, mailbox_port: int
                      ) -> Iterator[PostfixPeer]:
    LOCK.touch(exist_ok=True)
    with LOCK.open("r+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another test run on this machine waits its turn
        etc = BASE / "etc"
        if (etc / "main.cf").exists():
            _stop(etc)  # a run that was interrupted
        shutil.rmtree(BASE, ignore_errors=True)
        for folder in ("etc", "spool", "data", "tls"):
            (BASE / folder).mkdir(parents=True)
        shutil.chown(BASE / "data", "postfix")
        _name_alternate_config_directory(etc)
        tls = BASE / "tls"
        (tls / "ca.pem").write_bytes(pki.root.cert_pem + pki.organisations.cert_pem)
        # The MTA's client certificate has no subjectAltName, as IGC-Santé client
        # certificates may; the whitelist matches on its subject DN. Its server certificate
        # names 127.0.0.1, the host name the gateway's relay uses.
        client = pki.server("mx.hopital.mssante-test.fr", structure="1130780001",
                            org="CH POSTFIX TEST", department="Bouches-du-Rhone (13)", dns=[])
        server = pki.server("mx.hopital.mssante-test.fr", structure="313078000100017",
                            org="CH POSTFIX TEST", department="Bouches-du-Rhone (13)",
                            dns=["mx.hopital.mssante-test.fr", "localhost"], ips=["127.0.0.1"])
        (tls / "client.pem").write_bytes(client.chain_pem())
        (tls / "client.key").write_bytes(client.key_pem)
        (tls / "server.pem").write_bytes(server.chain_pem())
        (tls / "server.key").write_bytes(server.key_pem)
        for key in ("client.key", "server.key"):
            (tls / key).chmod(0o600)
        peer = PostfixPeer(BASE, free_port(), free_port(),
                           str(dn_from_name(client.certificate.subject)),
                           str(dn_from_name(server.certificate.subject)))
        (etc / "main.cf").write_text(textwrap.dedent(f"""\
            compatibility_level = 3.6
            queue_directory = {BASE}/spool
            data_directory = {BASE}/data
            maillog_file = {peer.maillog}
            maillog_file_prefixes = {BASE}
            inet_interfaces = 127.0.0.1
            inet_protocols = ipv4
            myhostname = mx.{HOSPITAL}
            mydomain = {HOSPITAL}
            mydestination =
            mynetworks = 127.0.0.0/8
            smtpd_relay_restrictions = permit_mynetworks, reject
            smtp_dns_support_level = disabled
            biff = no
            # The hospital's mailboxes are a sink; bounces for the unlisted domain are dropped
            # (the test reads the bounce in the log); everything else goes to the gateway.
            relayhost = [127.0.0.1]:{gateway_port}
            transport_maps = inline:{{{HOSPITAL}=smtp:[127.0.0.1]:{mailbox_port}, {UNLISTED}=discard:}}
            smtp_tls_security_level = secure
            smtp_tls_secure_cert_match = passerelle.test
            smtp_tls_CAfile = {tls}/ca.pem
            smtp_tls_cert_file = {tls}/client.pem
            smtp_tls_key_file = {tls}/client.key
            smtp_tls_policy_maps = inline:{{[127.0.0.1]:{mailbox_port}=none}}
            smtp_tls_loglevel = 1
            smtpd_tls_security_level = may
            smtpd_tls_cert_file = {tls}/server.pem
            smtpd_tls_key_file = {tls}/server.key
            smtpd_tls_CAfile = {tls}/ca.pem
            smtpd_tls_ask_ccert = yes
            smtpd_tls_received_header = yes
            smtpd_tls_loglevel = 1
            """))
        (etc / "master.cf").write_text(_master_cf(peer.submission_port, peer.tls_port))
        try:
            _postfix(etc, "check")
            _postfix(etc, "start")
            _wait_listening(peer.submission_port, peer)
            _wait_listening(peer.tls_port, peer)
            yield peer
        finally:
            _stop(etc)


@dataclass
class Site:
    running: Running
    postfix: PostfixPeer
    sinks: dict[str, Sink]

    def audit(self, event: str) -> list[dict[str, Any]]:
        folder = self.running.gateway.audit.folder
        return [r for r in read_records(sorted(folder.iterdir())) if r.get("event") == event]


async def wait_audit(site: Site, event: str, timeout: float = 15.0) -> list[dict[str, Any]]:
    """The audit records of `event`, once there is at least one (delivery is asynchronous)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not (records := site.audit(event)):
        if loop.time() > deadline:
            raise AssertionError(f"no {event!r} audit record")
        await asyncio.sleep(0.1)
    return records


@pytest.fixture
async def site(tmp_path: Path) -> AsyncIterator[Site]:
    pki_dir = tmp_path / "pki"
    pki_dir.mkdir()
    (tmp_path / "data").mkdir()
    pki = testpki.IgcSante.create()
    (pki_dir / "ca.pem").write_bytes(pki.root.cert_pem + pki.organisations.cert_pem)
    (pki_dir / "root.crl").write_bytes(testpki.crl_pem(pki.root.crl()))
    (pki_dir / "organisations.crl").write_bytes(testpki.crl_pem(pki.organisations.crl()))
    gateway_cert = pki.server("passerelle.test", dns=["passerelle.test", "localhost"],
                              ips=["127.0.0.1"], structure="1690000000", org="PASSERELLE TEST")
    (pki_dir / "gateway.pem").write_bytes(gateway_cert.chain_pem())
    (pki_dir / "gateway.key").write_bytes(gateway_cert.key_pem)
    (pki_dir / "gateway.key").chmod(0o600)
    other = pki.server("mx.autre-operateur.test", structure="1750000009", org="AUTRE")
    sinks = {
        "clinic": Sink("clinic", sink_context(pki, tmp_path, "clinic")),
        "mailboxes": Sink("mailboxes", None),  # behind Postfix: the hospital's mailboxes
    }
    port = free_port()
    with _postfix_instance(pki, port, sinks["mailboxes"].port) as postfix:
        (tmp_path / "data" / "listeblanchemssante.xml").write_bytes(mssante_whitelist_xml([
            (HOSPITAL, postfix.client_dn),
            (HOSPITAL, postfix.server_dn),
            (UNLISTED, str(dn_from_name(other.certificate.subject))),
        ]))
        config = tmp_path / "routing.yaml"
        config.write_text(textwrap.dedent(f"""\
            version: 1
            gateway:
              hostname: passerelle.test
              listen:
                - {{address: 127.0.0.1, port: {port}, tls: starttls, client_certificate: optional}}
              tls: {{certificate: pki/gateway.pem, key: pki/gateway.key}}
              spool: {{path: var/spool}}
              audit: {{path: var/audit}}
              max_message_size: 1MiB
              retry: {{schedule: [1s, 2s], give_up_after: 1h}}
            trust:
              anchors: [pki/ca.pem]
              crls: [pki/root.crl, pki/organisations.crl]
              mssante_whitelist: data/listeblanchemssante.xml
            networks:
              mssante:
                adapter: mime
                domains: ["*.mssante-test.fr"]
                peers: {{whitelist: mssante}}
                relay: {{host: 127.0.0.1, port: {postfix.tls_port}, tls: required, whitelist: mssante}}
              clinic:
                adapter: mime
                domains: [clinique-test.fr]
                peers: {{addresses: [127.0.0.1]}}
                relay: {{host: 127.0.0.1, port: {sinks["clinic"].port}, tls: opportunistic}}
            routes:
              - {{from: mssante, to: [clinic]}}
              - {{from: clinic, to: [mssante]}}
            """))
        world = World(tmp_path, pki, gateway_cert, gateway_cert, other, sinks, port, 0, config)
        async with start(world) as running:
            yield Site(running, postfix, sinks)


async def test_postfix_with_a_listed_certificate_relays_through_the_gateway(site: Site) -> None:
    postfix = site.postfix
    data = message(f"dr.martin@{HOSPITAL}", CLINIC, subject="Compte rendu")
    await postfix.submit(f"dr.martin@{HOSPITAL}", CLINIC, data)
    [got] = await site.sinks["clinic"].wait(timeout=20)
    assert got.sender == f"dr.martin@{HOSPITAL}" and got.recipients == [CLINIC]
    assert data.split(b"\r\n\r\n", 1)[1] in got.data
    # Postfix verified the gateway's certificate and name ("secure"), and logged the
    # gateway's 250 with the gateway's queue id.
    port = site.running.world.port
    await postfix.wait_log(rf"Verified TLS connection established to 127\.0\.0\.1\[127\.0\.0\.1\]:"
                           rf"{port}: TLSv1\.[23]")
    sent = await postfix.wait_log(
        rf"to=<{re.escape(CLINIC)}>, relay=127\.0\.0\.1\[127\.0\.0\.1\]:{port},.* "
        r"status=sent \(250 2\.0\.0 Ok: queued as (\w+)\)")
    # The gateway authenticated Postfix by its certificate's DN (no subjectAltName) as a
    # peer of the MSSanté network.
    [received] = site.audit("received")
    assert received["queue_id"] == sent.group(1)
    assert received["peer_subject"] == postfix.client_dn
    assert received["source"] == "mssante"


async def test_postfix_not_listed_for_the_sender_domain_gets_550_5_7_1(site: Site) -> None:
    postfix = site.postfix
    sender = f"dr.x@{UNLISTED}"
    await postfix.submit(sender, CLINIC, message(sender, CLINIC))
    # Postfix bounces on the gateway's reply to MAIL FROM, and its log carries that reply.
    bounced = await postfix.wait_log(
        rf"to=<{re.escape(CLINIC)}>, relay=127\.0\.0\.1\[127\.0\.0\.1\]:{site.running.world.port}"
        r",.* status=bounced \(host 127\.0\.0\.1\[127\.0\.0\.1\] said: (550 5\.7\.1 [^\n]*)")
    reply = bounced.group(1)
    assert "in reply to MAIL FROM command" in reply
    # The peer learns no DN; the audit trail records the one presented and the one expected.
    assert "CN=" not in reply
    [rejected] = site.audit("rejected")
    assert rejected["reply"].startswith("550 5.7.1") and rejected["command"] == "MAIL"
    assert postfix.client_dn in rejected["detail"]
    assert "the whitelist expects CN=mx.autre-operateur.test" in rejected["detail"]
    assert site.sinks["clinic"].messages == []


async def test_gateway_delivers_into_postfix_over_required_tls_with_its_certificate(
    site: Site,
) -> None:
    postfix = site.postfix
    recipient = f"dr.martin@{HOSPITAL}"
    data = message(CLINIC, recipient, subject="Resultats")
    refused, _ = await site.running.send(CLINIC, [recipient], data)
    assert refused == {}
    [got] = await site.sinks["mailboxes"].wait(timeout=20)
    assert got.recipients == [recipient] and data.split(b"\r\n\r\n", 1)[1] in got.data
    # The gateway's delivery is the TLS session Postfix logged on the port that requires a
    # verified client certificate: Postfix's queue id, from the gateway's audit record, leads
    # to the smtpd process that logged it.
    [delivered] = await wait_audit(site, "delivered")
    assert delivered["route"] == "clinic->mssante"
    queued = re.fullmatch(r"250 2\.0\.0 Ok: queued as (\w+)", delivered["reply"])
    assert queued, delivered["reply"]
    client = await postfix.wait_log(rf"postfix/smtpd\[(\d+)\]: {queued.group(1)}: client=")
    await postfix.wait_log(rf"postfix/smtpd\[{client.group(1)}\]: Trusted TLS connection "
                           r"established from \S+\[127\.0\.0\.1\]: TLSv1\.[23]")
    # Postfix's Received header says the gateway's certificate verified.
    head = got.data.split(b"\r\n\r\n", 1)[0].decode()
    assert re.search(r'Client CN "passerelle\.test", Issuer "TEST AC IGC-SANTE ELEMENTAIRE '
                     r'ORGANISATIONS" \(verified OK\)', head), head
