"""`gateway demo` end to end: the same entry point as `make demo`, on a copy of routing.yaml.

The demo runs in a subprocess (`python -m gateway.cli demo -c routing.yaml`) in a temporary
folder, so its PKI, spool, audit trail and received files never land in the repository. The
copy is the shipped routing.yaml with its five fixed ports swapped for free ones, so the test
does not collide with a `gateway serve` or another run on the same machine. Every row of the
table is checked, then the files the receiving sides saved, then that nothing is left queued,
then a second run (reusing the PKI), then a run that must fail and name its step.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from gateway import audit
from gateway.spool import Spool

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
SHIPPED_PORTS = (2525, 2601, 2602, 2603, 9464)


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def copy_routing(folder: Path) -> Path:
    text = (ROOT / "routing.yaml").read_text()
    for shipped, port in zip(SHIPPED_PORTS, free_ports(len(SHIPPED_PORTS)), strict=True):
        text, count = re.subn(rf"\bport: {shipped}\b", f"port: {port}", text)
        assert count == 1, f"routing.yaml should name port {shipped} once"
    config = folder / "routing.yaml"
    config.write_text(text)
    return config


def run_demo(config: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "NO_COLOR": "1"}
    return subprocess.run(
        [sys.executable, "-m", "gateway.cli", "demo", "-c", config.name],
        cwd=config.parent, env=env, capture_output=True, text=True, timeout=180, check=False,
    )


def row(output: str, number: str) -> str:
    """The table line of one step (plain output: no colours when not a TTY)."""
    for line in output.splitlines():
        if re.match(rf"{re.escape(number)}\s{{2,}}\S+@", line):
            return line
    raise AssertionError(f"no row {number} in:\n{output}")


def proofs(output: str, number: str) -> str:
    """The lines under a step's row that say what the receiving side checked."""
    lines = output.splitlines()
    start = lines.index(row(output, number)) + 1
    out = []
    for line in lines[start:]:
        if not line.startswith("   "):
            break
        out.append(line)
    return "\n".join(out)


def test_demo_plays_every_step_and_leaves_nothing_behind(tmp_path: Path) -> None:
    config = copy_routing(tmp_path)
    done = run_demo(config)
    out = done.stdout
    assert done.returncode == 0, out + done.stderr
    assert "(made now)" in out
    assert "\033[" not in out  # plain when stdout is not a terminal

    first = row(out, "1")
    assert "dr.leroy@cabinet-leroy.apicrypt.org → dr.durand@chu-exemple.fr" in first
    assert "Apicrypt → MIME/mTLS" in first and "x-apicrypt=pass" in first
    assert "delivered" in first
    assert "over mutual TLS from CN=passerelle.example.org" in proofs(out, "1")

    second = row(out, "2")
    assert "dr.durand@chu-exemple.fr → dr.martin@medecin.fr" in second
    assert "MIME/mTLS → S/MIME" in second and "delivered, receipt asked" in second
    assert "decrypted it with her own key" in proofs(out, "2")
    assert "signed by passerelle@medecin.fr" in proofs(out, "2")

    receipt = row(out, "2b")
    assert "dr.martin@medecin.fr → dr.durand@chu-exemple.fr" in receipt
    assert "smime=pass" in receipt and "receipt delivered" in receipt

    third = row(out, "3")
    assert "dr.bernard@medecin.fr → dr.leroy@cabinet-leroy.apicrypt.org" in third
    assert "S/MIME → Apicrypt" in third and "smime=pass" in third and "delivered" in third
    assert "signed by passerelle@passerelle.apicrypt.org" in proofs(out, "3")
    assert ".apz" in proofs(out, "3")

    fourth = row(out, "4")
    assert "dr.petit@medecin.fr → secretariat.cardio@chu-exemple.fr" in fourth
    assert "smime=fail" in fourth and "bounced 5.7.7, DSN delivered" in fourth
    assert "the hospital received nothing" in proofs(out, "4")
    assert "The DSN of step 4" in out

    fifth = row(out, "5")
    assert "refused 550 at SMTP" in fifth and "not reached" in fifth
    assert "550 5.7.1" in proofs(out, "5")

    assert "every step behaved as expected" in out
    assert "gateway audit search" in out and "/metrics" in out and "operator-guide" in out

    # What the receiving sides saved, read again here.
    received = tmp_path / "demo-run"
    hprim = (received / "1-hprim-lab-report.received.eml").read_bytes()
    assert b"****FINFICHIER****" in hprim or b"Content-Transfer-Encoding: base64" in hprim
    letter = (received / "2-discharge-letter.decrypted.eml").read_bytes()
    assert b"IHE_XDM.ZIP" in letter
    assert b"application/pkcs7-mime" in (received / "2-discharge-letter.received.p7m.eml"
                                         ).read_bytes()
    assert b".apz" in (received / "3-smime-letter.received.apicrypt.eml").read_bytes()
    assert b"multipart/report" in (received / "4-tampered-letter.dsn.decrypted.eml").read_bytes()
    assert b"gateway_messages_delivered_total" in (received / "metrics.txt").read_bytes()

    # Nothing left queued, the audit chain intact, the spool key private.
    spool = Spool(tmp_path / "var" / "spool", (tmp_path / "pki" / "spool.key").read_bytes())
    assert list(spool.entries()) == []
    count, broken = audit.verify(tmp_path / "var" / "audit")
    assert broken is None and count > 0
    assert (tmp_path / "pki" / "spool.key").stat().st_mode & 0o077 == 0
    assert len((tmp_path / "pki" / "spool.key").read_bytes()) == 32

    # Twice in a row: the PKI is reused, the ports were freed.
    again = run_demo(config)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "(reused)" in again.stdout


def test_demo_names_the_step_that_misbehaved(tmp_path: Path) -> None:
    config = copy_routing(tmp_path)
    text = config.read_text()
    # Without the medecin -> apicrypt route, step 3 is refused at RCPT time.
    text = text.replace("- {from: medecin, to: [hospital, apicrypt]}",
                        "- {from: medecin, to: [hospital]}")
    config.write_text(text)
    done = run_demo(config)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "step 3 (S/MIME letter to a GP)" in done.stdout
    assert "FAILED" in row(done.stdout, "3")
    assert "step 1 " not in done.stdout.split("did not behave as expected")[1]
