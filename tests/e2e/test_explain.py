"""`gateway explain` tells the operator what would happen, using the relay's own code."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.cli import main
from tests.support.crypto_world import DOCTOR, GP, build_crypto_world


def explain(config: Path, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    code = main(["explain", "-c", str(config), *args])
    return code, capsys.readouterr().out


def test_explain_routes_keys_and_missing_certificate(
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    built = build_crypto_world(tmp_path)
    try:
        world = built.world
        hospital_pem = tmp_path / "hospital.pem"
        hospital_pem.write_bytes(world.hospital_client.cert_pem)
        code, out = explain(
            world.config, capsys, "--from", "dr.martin@chu-test.fr", "--to", DOCTOR,
            "--to", GP, "--to", "nobody@medecin-test.fr", "--to", "x@labo-test.fr",
            "--peer-certificate", str(hospital_pem),
        )
        assert code == 0
        assert "source        hospital (adapter mime); peer authenticated" in out
        assert "hospital -> medecin: allowed" in out
        assert "signs with    medecin-smime" in out
        blocks = out.split("\n\n")
        doctor = next(b for b in blocks if f"<{DOCTOR}>" in b)
        assert "encrypts to" in doctor and "MISSING" not in doctor
        gp = next(b for b in blocks if f"<{GP}>" in b)
        assert "encrypts to" in gp and "MISSING" not in gp
        nobody = next(b for b in blocks if "<nobody@medecin-test.fr>" in b)
        assert "MISSING" in nobody
        lab = next(b for b in blocks if "<x@labo-test.fr>" in b)
        assert "NOT allowed" in lab
        assert "not revocation-checked" in out  # no CRL is configured in this world

        code, out = explain(world.config, capsys, "--from", "dr.martin@chu-test.fr",
                            "--to", DOCTOR)  # no certificate: not the hospital's peer
        assert "REFUSED at MAIL FROM: 550 5.7.1" in out
    finally:
        built.gpg.close()
