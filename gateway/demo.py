"""`gateway demo`: the gateway between three simulated networks, on loopback.

The gateway is the real one (`gateway.server.Gateway`, the code path of `gateway serve`) started
with routing.yaml; around it, three simulated networks (`gateway.demo_networks`), each a real
SMTP server and client with its own certificates and keys, made on first run beside routing.yaml
(`gateway.demo_pki`). The traffic comes from `examples/` (`gateway.demo_traffic`):

1. a GP on Apicrypt sends an HPRIM lab report (ISO-8859-1) to a hospital doctor;
2. the hospital sends a discharge letter with an IHE_XDM.ZIP to an @medecin.fr box, asking for
   a read receipt; 2b. the doctor's client sends the receipt (RFC 8098 MDN) back, in S/MIME;
3. an @medecin.fr doctor sends a signed and encrypted letter with a prescription to a GP;
4. a doctor's message whose signed text was changed after signing: bounced, DSN back to her;
5. a mail server outside the MSSanté trust space tries to send as the hospital: refused.

Each receiving side proves what it got with its own key (openssl and gpg where installed) and
compares it with what the sender wrote. The table says, per message, who sent what to whom,
which envelope came in and went out, what the gateway verified, what happened and how long it
took. The command exits 0 when every step behaved as expected, 1 naming the steps that did not.
Nothing is left running: the gateway and the simulated servers stop before it returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import os
import secrets
import shutil
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TextIO

from gateway.config import Config, ConfigError, load
from gateway.demo_networks import NetworkServer, server_context
from gateway.demo_pki import (
    APICRYPT_MTA,
    HOSPITAL_MTA,
    MEDECIN_MTA,
    PkiError,
    ensure_pki,
)
from gateway.demo_steps import WAIT, Row, StepFailed, Steps
from gateway.demo_traffic import examples_folder, load_examples

__all__ = ["run_demo"]

NETWORKS = {"hospital": ("mime", HOSPITAL_MTA), "medecin": ("smime", MEDECIN_MTA),
            "apicrypt": ("apicrypt", APICRYPT_MTA)}


class Screen:
    """Colours and a progress line on a terminal; plain lines otherwise (and with NO_COLOR)."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.tty = stream.isatty()
        self.colour = self.tty and not os.environ.get("NO_COLOR") and (
            os.environ.get("TERM") != "dumb")
        encoding = getattr(stream, "encoding", None) or "ascii"
        try:
            "→✓✗↳".encode(encoding)
            self.arrow, self.good, self.bad, self.hook = "→", "✓", "✗", "↳"
        except (UnicodeEncodeError, LookupError):
            self.arrow, self.good, self.bad, self.hook = "->", "ok", "FAILED", "  "

    def paint(self, text: str, code: str) -> str:
        return f"\033[{code}m{text}\033[0m" if self.colour else text

    def line(self, text: str = "") -> None:
        self.clear()
        print(self._fit(text), file=self.stream, flush=True)

    def _fit(self, text: str) -> str:
        # A terminal or pipe that cannot show é still gets the line, with "?" in its place.
        encoding = getattr(self.stream, "encoding", None) or "ascii"
        try:
            return text.encode(encoding, "replace").decode(encoding)
        except LookupError:
            return text

    def progress(self, text: str) -> None:
        if self.tty:
            self.stream.write("\r\033[K" + self.paint(self._fit(text), "2"))
            self.stream.flush()

    def clear(self) -> None:
        if self.tty:
            self.stream.write("\r\033[K")


def run_demo(config: Path) -> int:
    """Run the demo with the routing.yaml at `config`; 0 when every step behaved as expected."""
    screen = Screen(sys.stdout)
    try:
        return asyncio.run(_Demo(config, screen).run())
    except _Refused as refused:
        screen.line(f"gateway demo: {refused}")
        return 1


class _Refused(Exception):
    """The demo cannot start; the message says what to do."""


def _relay_port(config: Config, name: str) -> int:
    network = config.networks.get(name)
    expected, _ = NETWORKS[name]
    if network is None or network.adapter != expected or network.relay is None:
        raise _Refused(f"routing.yaml has no network {name!r} with adapter {expected} and a "
                       "relay; the demo needs the three networks of the shipped routing.yaml")
    return network.relay.port


class _Demo(Steps):
    def __init__(self, path: Path, screen: Screen) -> None:
        self.screen = screen
        self.arrow = screen.arrow
        try:
            self.config = load(path)
        except ConfigError as error:
            raise _Refused(f"{path} has errors ({error}); run gateway check -c {path}") from None
        except OSError as error:
            raise _Refused(f"cannot read {path}: {error.strerror}") from None
        self.base = self.config.path.parent
        self.now = dt.datetime.now(dt.UTC)
        if not self.config.gateway.listen:
            raise _Refused("routing.yaml has no gateway.listen; the demo sends mail to it")
        self.port = self.config.gateway.listen[0].port
        self.ports = {name: _relay_port(self.config, name) for name in NETWORKS}
        folder = examples_folder(self.base)
        if folder is None:
            raise _Refused("examples/ was not found beside routing.yaml nor in the source tree")
        self.token = secrets.token_hex(4)
        self.examples = load_examples(folder, self.token, self.now)
        self.out = self.base / "demo-run"
        self.rows: list[Row] = []
        self.servers: dict[str, NetworkServer] = {}
        self.pki = None
        self.letter = None
        self.mdn_id = f"<mdn.{self.token}@medecin.fr>"
        self.dsn_text = b""  # step 4's DSN, shown under the table

    # -- the run -------------------------------------------------------------------------------

    async def run(self) -> int:
        from gateway.server import Gateway

        screen = self.screen
        screen.progress("preparing the demo PKI and keys…")
        try:
            self.pki = ensure_pki(self.config, self.now)
        except PkiError as error:
            raise _Refused(str(error)) from None
        shutil.rmtree(self.out, ignore_errors=True)
        self.out.mkdir(parents=True)
        quiet = logging.getLogger("gateway")
        level = quiet.level
        quiet.setLevel(logging.WARNING)  # the table tells the story; warnings still show
        gateway: Gateway | None = None
        problems: list[str] = []
        started = time.monotonic()
        try:
            await self._start_networks()
            screen.progress("starting the gateway (as gateway serve does)…")
            try:
                gateway = Gateway(self.config.path)
                await gateway.start()
            except OSError as error:
                raise _Refused(f"the gateway cannot listen on port {self.port} "
                               f"({error.strerror}); is gateway serve running? Stop it "
                               "first") from None
            except Exception as error:
                raise _Refused(f"the gateway did not start: {error}") from None
            self._header()
            for number, title, step in self._steps():
                screen.progress(f"[{number}] {title}…")
                await self._play(number, title, step)
            screen.progress("waiting for the spool to empty…")
            problems += await self._drain(gateway)
            problems += await self._metrics()
        finally:
            if gateway is not None:
                await gateway.stop(grace=5)
            for server in self.servers.values():
                await server.stop()
            quiet.setLevel(level)
            screen.clear()
        self._table(time.monotonic() - started)
        failed = [row for row in self.rows if not row.ok]
        for row in reversed(failed):
            problems.insert(0, f"step {row.number} ({row.title}): {row.failure}")
        self._next_steps()
        if problems:
            screen.line(screen.paint("The demo did not behave as expected:", "1;31"))
            for problem in problems:
                screen.line(f"  - {problem}")
            return 1
        screen.line(screen.paint(f"{screen.good} every step behaved as expected.", "1;32"))
        return 0

    async def _start_networks(self) -> None:
        pki = self.pki
        assert pki is not None
        for name, (_, mta) in NETWORKS.items():
            certificate, key = pki.mta_files[mta.key]
            relay = self.config.networks[name].relay
            assert relay is not None
            tls = server_context(certificate, key, pki.anchors)
            # A hospital MTA peers over mutual TLS: it insists on the gateway's certificate.
            server = NetworkServer(name, mta.fqdn, relay.host, relay.port, tls,
                                   require_tls=relay.tls == "required",
                                   client_certificate=name == "hospital")
            try:
                await server.start()
            except OSError as error:
                raise _Refused(f"port {relay.port} of the simulated {name} network is taken "
                               f"({error.strerror}); stop what uses it, or change "
                               f"networks.{name}.relay.port") from None
            self.servers[name] = server

    def _steps(self) -> list[tuple[str, str, Callable[[Row], Awaitable[None]]]]:
        return [
            ("1", "HPRIM lab report", self._hprim),
            ("2", "discharge letter + IHE_XDM.ZIP", self._discharge),
            ("2b", "read receipt (MDN)", self._receipt),
            ("3", "S/MIME letter to a GP", self._smime_letter),
            ("4", "tampered signature", self._tampered),
            ("5", "peer outside the trust space", self._stranger),
        ]

    async def _play(self, number: str, title: str,
                    step: Callable[[Row], Awaitable[None]]) -> None:
        row = Row(number, title, "", "")
        self.rows.append(row)
        began = time.monotonic()
        try:
            await step(row)
            row.ok = True
        except StepFailed as failure:
            row.failure = str(failure)
        except TimeoutError:
            row.failure = f"nothing arrived within {WAIT:g} s"
        except Exception as error:  # a demo step must report, never crash the whole run
            row.failure = f"{type(error).__name__}: {error}"
        if not row.ok:
            row.outcome = "FAILED"
        row.seconds = time.monotonic() - began

    # -- end of run ----------------------------------------------------------------------------

    async def _drain(self, gateway: object) -> list[str]:
        from gateway.server import Gateway

        assert isinstance(gateway, Gateway)
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            left = list(gateway.spool.entries())
            if not left:
                return []
            await asyncio.sleep(0.1)
        return [f"spool: {len(left)} message(s) still queued after {WAIT:g} s; see "
                f"gateway queue list -c {self.config.path}"]

    async def _metrics(self) -> list[str]:
        metrics = self.config.gateway.metrics
        if metrics is None:
            return []
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(metrics.address, metrics.port), 5)
            writer.write(b"GET /metrics HTTP/1.0\r\nHost: demo\r\n\r\n")
            await writer.drain()
            answer = await asyncio.wait_for(reader.read(), 5)
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        except (OSError, TimeoutError) as error:
            return [f"metrics: http://{metrics.address}:{metrics.port}/metrics did not answer "
                    f"({error})"]
        self._save("metrics.txt", answer.partition(b"\r\n\r\n")[2])
        if b"gateway_messages_delivered_total" not in answer:
            return ["metrics: /metrics has no gateway_messages_delivered_total"]
        return []

    # -- output --------------------------------------------------------------------------------

    def _header(self) -> None:
        screen = self.screen
        metrics = self.config.gateway.metrics
        screen.line(screen.paint("Passerelle demo: three networks on loopback", "1"))
        where = f"127.0.0.1:{self.port}"
        extra = (f", metrics http://{metrics.address}:{metrics.port}/metrics"
                 if metrics else "")
        screen.line(f"  gateway   {where}, STARTTLS, the code of gateway serve{extra}")
        labels = {"hospital": "MIME over mutual TLS (MSSanté style)",
                  "medecin": "S/MIME (@medecin.fr)", "apicrypt": "Apicrypt layout, OpenPGP"}
        for name, (_, mta) in NETWORKS.items():
            screen.line(f"  {name:<9} 127.0.0.1:{self.ports[name]}  {mta.fqdn:<17} "
                        f"{labels[name]}")
        assert self.pki is not None
        made = "made now" if self.pki.generated else "reused"
        screen.line(f"  keys      {self.pki.anchors.parent} ({made})")
        screen.line()

    def _table(self, total: float) -> None:
        screen = self.screen
        head = ("#", "sender " + screen.arrow + " recipient", "envelope in " + screen.arrow
                + " out", "signature (gateway's verdict)", "outcome", "time")
        cells = [(r.number, r.route, r.envelopes, r.verdict, r.outcome, f"{r.seconds:.1f}s")
                 for r in self.rows]
        widths = [max(len(c[i]) for c in [head, *cells]) for i in range(len(head))]

        def render(values: tuple[str, ...]) -> str:
            return "  ".join(v.ljust(w) if i < 5 else v.rjust(w)
                             for i, (v, w) in enumerate(zip(values, widths, strict=True)))

        screen.line(screen.paint(render(head), "1"))
        for row, values in zip(self.rows, cells, strict=True):
            text = render(values)
            if screen.colour:
                mark = "32" if row.ok else "31"
                text = text.replace(row.outcome, screen.paint(row.outcome, mark), 1)
            screen.line(text)
            good = screen.paint(screen.good, "32")
            for proof in row.proof:
                screen.line(f"   {screen.hook} {good} {proof}")
            if row.failure:
                screen.line(f"   {screen.hook} {screen.paint(screen.bad, '31')} {row.failure}")
        dsn = self.dsn_text
        if dsn:
            screen.line()
            screen.line(screen.paint("The DSN of step 4, as the doctor reads it:", "1"))
            for line in dsn.decode("utf-8", "replace").strip().splitlines()[:12]:
                screen.line(f"   | {line}")
        screen.line()
        screen.line(f"{len(self.rows)} steps in {total:.1f}s.")

    def _next_steps(self) -> None:
        screen, config = self.screen, self.config.path
        shown = os.path.relpath(config) if not config.is_absolute() or config.is_relative_to(
            Path.cwd()) else str(config)
        out = os.path.relpath(self.out) if self.out.is_relative_to(Path.cwd()) else self.out
        metrics = self.config.gateway.metrics
        screen.line()
        screen.line(screen.paint("Where to look next", "1"))
        screen.line(f"  {out}/   what each side sent, received and decrypted (fictitious data)")
        screen.line(f"  gateway audit search -c {shown} --message-id "
                    f"'{self.examples['tampered'].message_id}'   what happened to step 4")
        screen.line(f"  gateway audit verify -c {shown}     the tamper-evident trail of this run")
        if metrics is not None:
            screen.line(f"  gateway serve -c {shown}, then http://{metrics.address}:"
                        f"{metrics.port}/metrics   (this run's snapshot: {out}/metrics.txt)")
        screen.line("  docs/operator-guide.md   every key of routing.yaml, and how to run it")
        screen.line()
