"""What an operator relies on while the gateway runs: reload under load, health, quiet logs,
and `gateway explain` telling the truth about what delivery then does."""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import Callable
from pathlib import Path

import aiosmtplib
import pytest

from gateway import audit
from gateway.cli import _configure_logging as configure_logging
from gateway.cli import main
from gateway.explain import _describe_key
from tests.e2e.conftest import start
from tests.e2e.test_crypto_routes import letter
from tests.e2e.test_observability import http_get
from tests.support.crypto_world import DOCTOR, GP, build_crypto_world
from tests.support.world import World, free_port, message

pytestmark = pytest.mark.e2e

SUBJECT = "DUPONT Jean né le 01/02/1950 XDM/1.0/DDM+12345"


def audit_records(world: World) -> list[dict[str, object]]:
    folder = world.root / "var" / "audit"
    return [json.loads(line) for path in sorted(folder.iterdir())
            for line in path.read_text().splitlines() if line.strip()]


async def send_one(world: World, index: int) -> None:
    smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=world.port, start_tls=True,
                           tls_context=world.client_context(None), timeout=30)
    await smtp.connect()
    try:
        data = message("a@clinique-test.fr", "b@chu-test.fr", subject=f"load {index}")
        data = data.replace(b"Subject:", f"Message-ID: <load-{index}@clinique-test.fr>\r\n"
                            "Subject:".encode(), 1)
        await smtp.sendmail("a@clinique-test.fr", ["b@chu-test.fr"], data)
    finally:
        await smtp.quit()


async def test_reload_under_load_loses_and_duplicates_nothing(
    world_factory: Callable[..., World],
) -> None:
    world = world_factory()
    original = world.config.read_text()
    async with start(world) as running:
        total, connections = 60, 4

        async def sender(first: int) -> None:
            for index in range(first, total, connections):
                await send_one(world, index)

        async def reloader() -> list[bool]:
            outcomes = []
            for round_ in range(6):
                await asyncio.sleep(0.15)
                if round_ % 2:
                    world.config.write_text(original.replace("to: [hospital]", "to: [nowhere]"))
                else:
                    world.config.write_text(original + f"\n# reload {round_}\n")
                outcomes.append(running.gateway.reload())
            world.config.write_text(original)
            return outcomes

        results = await asyncio.gather(*(sender(i) for i in range(connections)), reloader())
        outcomes = results[-1]
        assert outcomes == [True, False, True, False, True, False]
        got = await world.sinks["hospital"].wait(total, timeout=60)
        await asyncio.sleep(0.5)  # a duplicate would arrive now
        ids = [re.search(rb"Message-ID: <(load-\d+)@", m.data).group(1)  # type: ignore[union-attr]
               for m in world.sinks["hospital"].messages]
        assert len(got) == total and len(set(ids)) == total, "lost or duplicated"
    events = [r["event"] for r in audit_records(world)]
    assert events.count("reload") == 3 and events.count("reload_refused") == 3
    assert events.count("delivered") == total
    count, broken = audit.verify(world.root / "var" / "audit")
    assert broken is None and count > total


async def test_healthz_says_not_ready_when_the_spool_cannot_be_written(
    world_factory: Callable[..., World],
) -> None:
    port = free_port()
    world = world_factory(edit=lambda text: text.replace(
        "  audit: {path: var/audit}",
        f"  audit: {{path: var/audit}}\n  metrics: {{address: 127.0.0.1, port: {port}}}"))
    async with start(world) as running:
        assert await http_get(port, "/healthz") == (200, "ready\n")
        # A folder that cannot take a file, whoever runs the gateway (root ignores modes):
        # the spool's incoming/ replaced by a plain file.
        incoming = running.gateway.spool.root / "incoming"
        aside = incoming.with_name("incoming.aside")
        incoming.rename(aside)
        incoming.write_bytes(b"")
        try:
            status, body = await http_get(port, "/healthz")
            assert status == 503 and "spool cannot be written" in body
        finally:
            incoming.unlink()
            aside.rename(incoming)
        assert (await http_get(port, "/healthz"))[0] == 200


async def test_subject_and_content_never_reach_the_logs_or_the_audit(
    world_factory: Callable[..., World], caplog: pytest.LogCaptureFixture,
) -> None:
    world = world_factory()
    caplog.set_level(logging.DEBUG)
    body = "Résultat: hémoglobine 14,2 g/dl, patient DUPONT"
    async with start(world) as running:
        data = message("a@clinique-test.fr", "b@chu-test.fr", subject=SUBJECT)
        data = message("a@clinique-test.fr", "b@chu-test.fr", subject=SUBJECT, body=body + "\r\n")
        await running.send("a@clinique-test.fr", ["b@chu-test.fr"], data)
        # One that bounces (unknown recipient at the next hop) makes a DSN as well.
        world.sinks["hospital"].handler.rcpt_replies["gone@chu-test.fr"] = "550 5.1.1 no such user"
        await running.send("a@clinique-test.fr", ["gone@chu-test.fr"],
                           message("a@clinique-test.fr", "gone@chu-test.fr", subject=SUBJECT))
        await world.sinks["hospital"].wait(1)
        await world.sinks["clinic"].wait(1)  # the DSN back to the clinic
    # What `gateway serve` writes, even with -v: every gateway logger at DEBUG, aiosmtpd's own
    # per-line chatter (it logs DATA lines at DEBUG) held at WARNING by the command line.
    configure_logging("text", verbose=True)
    assert logging.getLogger("mail.log").getEffectiveLevel() >= logging.WARNING
    kept = [r for r in caplog.records if r.name.startswith("gateway")
            or (r.name == "mail.log" and r.levelno >= logging.WARNING)]
    logs = "\n".join(r.getMessage() for r in kept)
    assert "received" in logs and "delivered" in logs  # the logs did run
    text = "\n".join(p.read_text() for p in (world.root / "var" / "audit").iterdir())
    for secret in ("DUPONT", "01/02/1950", "XDM/1.0/DDM", "hémoglobine", "Bonjour"):
        assert secret not in logs, secret
        assert secret not in text, secret


async def test_explain_matches_what_delivery_then_does(
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    built = build_crypto_world(tmp_path)
    try:
        world = built.world
        hospital_pem = tmp_path / "hospital.pem"
        hospital_pem.write_bytes(world.hospital_client.cert_pem)
        sender = "dr.martin@chu-test.fr"
        code = main(["explain", "-c", str(world.config), "--from", sender, "--to", DOCTOR,
                     "--to", GP, "--peer-certificate", str(hospital_pem)])
        explained = capsys.readouterr().out
        assert code == 0, explained
        promised = {}
        for block in explained.split("\n\n"):
            for address in (DOCTOR, GP):
                if f"<{address}>" in block:
                    line = next(x for x in block.splitlines() if x.startswith("encrypts to"))
                    promised[address] = line.removeprefix("encrypts to").strip()
        async with start(world) as running:
            await running.send(sender, [DOCTOR], letter(sender, DOCTOR),
                               client=world.hospital_client)
            await running.send(sender, [GP], letter(sender, GP), client=world.hospital_client)
            await world.sinks["medecin"].wait(1, timeout=30)
            await world.sinks["apicrypt"].wait(1, timeout=30)
            runtime = running.gateway.runtime()
            used = {}
            for record in audit_records(world):
                if record["event"] == "wrapped":
                    used.update(record["recipient_keys"])  # type: ignore[arg-type]
            for address in (DOCTOR, GP):
                assert _describe_key(runtime, str(used[address])) == promised[address], address
    finally:
        built.gpg.close()
