"""`gateway keys`: generated keys work with the independent tools; list and import."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from cryptography import x509

from gateway.cli import main
from tests.support.crypto_world import GP, build_crypto_world
from tests.support.gpg import Gpg


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def test_generate_x509_self_signed_and_csr(tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    code, out = run(capsys, "keys", "generate", "x509", "--out", str(tmp_path / "medecin"),
                    "--subject", "CN=Passerelle,O=CHU TEST,C=FR", "--email", "gw@medecin.fr")
    assert code == 0, out
    certificate = x509.load_pem_x509_certificate((tmp_path / "medecin.pem").read_bytes())
    assert certificate.subject.rfc4514_string() == "CN=Passerelle,O=CHU TEST,C=FR"
    assert (tmp_path / "medecin.key").stat().st_mode & 0o077 == 0
    check = subprocess.run(["openssl", "x509", "-in", str(tmp_path / "medecin.pem"), "-noout",
                            "-ext", "subjectAltName"], capture_output=True, text=True)
    assert "gw@medecin.fr" in check.stdout
    code, out = run(capsys, "keys", "generate", "x509", "--out", str(tmp_path / "mx"),
                    "--subject", "CN=mx.chu.fr,OU=1750000001,O=CHU,ST=Paris (75),C=FR",
                    "--dns", "mx.chu.fr", "--csr")
    assert code == 0, out
    verify = subprocess.run(["openssl", "req", "-in", str(tmp_path / "mx.csr"), "-noout",
                             "-verify"], capture_output=True, text=True)
    assert verify.returncode == 0 and "verify OK" in (verify.stdout + verify.stderr)
    code, out = run(capsys, "keys", "generate", "x509", "--out", str(tmp_path / "mx"),
                    "--subject", "CN=x", "--csr")
    assert code == 1 and "exists" in out  # never overwrites a key


def test_generate_openpgp_key_gnupg_can_use(tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    code, out = run(capsys, "keys", "generate", "openpgp", "--out", str(tmp_path / "apicrypt"),
                    "--uid", "Passerelle <gw@apicrypt.org>")
    assert code == 0, out
    gpg = Gpg(tmp_path / "gpg")
    try:
        gpg.import_key((tmp_path / "apicrypt.pub.asc").read_bytes())
        sealed = gpg.run("--armor", "--encrypt", "-r", "gw@apicrypt.org", input=b"x",
                         check=True)
        assert sealed.output.startswith(b"-----BEGIN PGP MESSAGE-----")
    finally:
        gpg.close()


def test_list_and_import(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    built = build_crypto_world(tmp_path / "site")
    try:
        config = str(built.world.config)
        code, out = run(capsys, "keys", "list", "-c", config)
        assert code == 0, out
        assert "medecin-smime: X.509  CN=Passerelle medecin-test.fr" in out
        assert "apicrypt-pgp: OpenPGP" in out and GP in out
        newcomer = built.world.pki.organisations.issue(
            built.world.pki.root.certificate.subject, emails=["dr.new@medecin-test.fr"])
        source = tmp_path / "new.pem"
        source.write_bytes(newcomer.cert_pem)
        code, out = run(capsys, "keys", "import", str(source), "-c", config)
        assert code == 0, out
        assert (built.world.root / "pki" / "directory" / "new.pem").exists()
        code, out = run(capsys, "keys", "import", str(built.world.config), "-c", config)
        assert code == 1 and "neither a certificate nor an OpenPGP key" in out
    finally:
        built.gpg.close()
