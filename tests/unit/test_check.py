"""`gateway check` and the key ring: every file routing.yaml names, checked at its line."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from gateway import pki
from gateway.check import run_check
from gateway.config import load
from tests.support import testpki
from tests.support.routing_site import BROKEN, Site, build_site

NOW = testpki.NOW


@pytest.fixture
def site(tmp_path: Path) -> Site:
    return build_site(tmp_path)


def problems_at(site: Site, needle: str) -> list[str]:
    report = run_check(site.config, NOW)
    line = site.line_of(needle)
    return [f"{p.severity}: {p.message}" for p in report.problems if p.line == line]


def test_clean_site_checks_clean_and_summarizes(site: Site) -> None:
    report = run_check(site.config, NOW)
    assert report.problems == ()
    assert report.ok
    assert report.config is not None
    summary = report.summary()
    assert "OK" in summary
    assert "3 network(s), 3 route(s), 1 listener(s), 2 identity(ies)" in summary
    assert "hospital  mime     2 domains, relay 127.0.0.1:2601 tls required" in summary
    assert "apicrypt  apicrypt 1 domain" in summary
    assert "hospital -> medecin, apicrypt" in summary
    assert "127.0.0.1:2525  starttls, client certificate optional" in summary
    expires = site.medecin.certificate.not_valid_after_utc.strftime("%Y-%m-%d")
    assert f"expires {expires}" in summary
    assert "apicrypt-pgp   OpenPGP secret key" in summary


def test_keyring_holds_the_loaded_material(site: Site) -> None:
    config = load(site.config)
    keyring = pki.load_keyring(config, NOW)
    medecin = keyring.identities["medecin-smime"]
    assert medecin.certificate == site.medecin.certificate
    assert medecin.chain == (site.pki.organisations.certificate,)
    assert medecin.private_key is not None
    assert medecin.private_key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ) == site.medecin.key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    assert keyring.identities["apicrypt-pgp"].openpgp_secret == site.apicrypt_secret
    assert keyring.trust.anchors == (site.pki.root.certificate, site.pki.organisations.certificate)
    assert len(keyring.trust.crls) == 2
    assert keyring.directory.x509 == (site.correspondent.certificate,)
    assert keyring.directory.x509_for("DR.EXEMPLE@medecin.fr") == (site.correspondent.certificate,)
    assert keyring.directory.openpgp == (site.correspondent_pgp,)
    assert keyring.tls_certificate == site.root / "pki" / "gateway.pem"
    assert keyring.tls_key == site.root / "pki" / "gateway.key"
    assert keyring.spool_key == bytes(range(32))
    assert keyring.expiry["medecin-smime"] == site.medecin.certificate.not_valid_after_utc


def test_broken_file_reports_config_and_file_mistakes_in_one_run(site: Site) -> None:
    site.write(BROKEN)
    report = run_check(site.config, NOW)
    assert not report.ok
    assert report.config is None

    def line(needle: str) -> int:
        return site.line_of(needle, BROKEN)

    found = {(p.line, p.message) for p in report.errors}
    expected = [
        (line("missing.pem"), "trust.anchors: pki/missing.pem does not exist"),
        (line("medecin-smime: {"), "the key pki/gateway.key does not match the certificate"),
        (line("max_message_size"), "is not a size"),
        (line("give_up_after"), "is not a duration"),
        (line("medcin"), "unknown network 'medcin'"),
        (line("Medecin.fr."), "already claimed by network 'medecin'"),
        (line("medecin-smim "), "identity 'medecin-smim' is not defined under keys:"),
        (line("smtp"), "unknown adapter 'smtp'"),
        (line("signatur:"), "option 'signatur' is not known to the smime adapter"),
    ]
    for number, words in expected:
        assert any(n == number and words in m for n, m in found), (number, words, found)
    assert [p.line for p in report.problems] == sorted(p.line for p in report.problems)


def test_yaml_syntax_error_stops_before_files(site: Site) -> None:
    site.write("version: 1\ngateway: {hostname: x\n")
    report = run_check(site.config, NOW)
    assert not report.ok and report.config is None and report.keyring is None
    assert len(report.problems) == 1 and report.problems[0].line == 3
    assert "error(s)" in report.summary()


@pytest.mark.parametrize(("delta", "words"), [
    (dt.timedelta(days=10), "expires on"),
    (dt.timedelta(hours=-1), "expired on"),
])
def test_identity_expiry_is_a_warning(tmp_path: Path, delta: dt.timedelta, words: str) -> None:
    not_after = NOW + delta
    site = build_site(tmp_path, medecin_not_after=not_after)
    report = run_check(site.config, NOW)
    assert report.ok
    [problem] = report.problems
    assert problem.severity == "warning"
    assert problem.line == site.line_of("medecin-smime: {")
    assert words in problem.message and "identity 'medecin-smime'" in problem.message
    assert str(problem).startswith(f"{site.config}:{problem.line}: warning: ")


def test_identity_valid_for_more_than_30_days_is_quiet(tmp_path: Path) -> None:
    site = build_site(tmp_path, medecin_not_after=NOW + dt.timedelta(days=31))
    assert run_check(site.config, NOW).problems == ()


def test_anchors_without_crl_are_not_revocation_checked(site: Site) -> None:
    site.write(site.config.read_text().replace(
        "crls: [pki/ca.crl, pki/organisations.crl]", "crls: [pki/ca.crl]"))
    report = run_check(site.config, NOW)
    assert report.ok
    [warning] = report.problems
    assert warning.severity == "warning" and warning.line == site.line_of("anchors:")
    assert "TEST AC IGC-SANTE ELEMENTAIRE ORGANISATIONS" in warning.message
    assert "not revocation-checked" in warning.message


def test_stale_crl_is_an_error(site: Site) -> None:
    stale = site.pki.organisations.crl(last_update=NOW - dt.timedelta(days=8),
                                       next_update=NOW - dt.timedelta(days=1))
    (site.root / "pki" / "organisations.crl").write_bytes(testpki.crl_pem(stale))
    assert problems_at(site, "crls:") == [
        f"error: trust.crls: pki/organisations.crl is stale (its nextUpdate was "
        f"{(NOW - dt.timedelta(days=1)).strftime('%Y-%m-%d %H:%M')} UTC); download a fresh CRL "
        "from the CA: the gateway refuses to rely on a stale one"]


def test_badly_signed_crl_is_an_error(site: Site) -> None:
    forged = site.pki.organisations.crl(signer=testpki.root())
    (site.root / "pki" / "organisations.crl").write_bytes(testpki.crl_pem(forged))
    [problem] = problems_at(site, "crls:")
    assert problem.startswith("error: trust.crls: the signature of pki/organisations.crl does "
                              "not verify with the certificate of ")
    assert "CN=TEST AC IGC-SANTE ELEMENTAIRE ORGANISATIONS" in problem


def test_crl_of_an_unknown_ca_is_an_error(site: Site) -> None:
    other = testpki.root(testpki.name(CN="AUTRE AC", C="FR"))
    (site.root / "pki" / "organisations.crl").write_bytes(testpki.crl_pem(other.crl()))
    problems = problems_at(site, "crls:")
    assert any("is issued by CN=AUTRE AC,C=FR, which is not among the trust anchors" in p
               for p in problems)
    # ... and the CA whose CRL was replaced is now unchecked.
    assert any("not revocation-checked" in p for p in problems_at(site, "anchors:"))


def test_der_crl_is_accepted(site: Site) -> None:
    crl = site.pki.organisations.crl()
    from cryptography.hazmat.primitives.serialization import Encoding

    (site.root / "pki" / "organisations.crl").write_bytes(crl.public_bytes(Encoding.DER))
    assert run_check(site.config, NOW).problems == ()


def test_tls_key_must_match_its_certificate(site: Site) -> None:
    (site.root / "pki" / "gateway.key").write_bytes(site.medecin.key_pem)
    assert problems_at(site, "tls: {certificate") == [
        "error: gateway.tls: the key pki/gateway.key does not match the certificate; give the "
        "key the certificate was issued for"]


def test_group_readable_key_is_a_warning(site: Site) -> None:
    (site.root / "pki" / "medecin.key").chmod(0o640)
    report = run_check(site.config, NOW)
    assert report.ok
    assert [str(p) for p in report.problems] == [
        f"{site.config}:{site.line_of('medecin-smime: {')}: warning: keys.medecin-smime.key: "
        "pki/medecin.key is accessible to group or other users (mode 0640); run chmod 600 "
        "pki/medecin.key"]


def test_spool_key_must_be_32_bytes(site: Site) -> None:
    (site.root / "pki" / "spool.key").write_bytes(b"short")
    [problem] = problems_at(site, "spool:")
    assert "holds 5 bytes, not exactly 32" in problem and problem.startswith("error:")


def test_public_key_given_as_secret_key(site: Site) -> None:
    (site.root / "pki" / "apicrypt.asc").write_bytes(site.correspondent_pgp)
    [problem] = problems_at(site, "apicrypt-pgp:")
    assert "holds a public key; export the secret key" in problem


def test_encrypted_private_key_is_refused(site: Site) -> None:
    encrypted = site.medecin.key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret"))
    (site.root / "pki" / "medecin.key").write_bytes(encrypted)
    [problem] = problems_at(site, "medecin-smime: {")
    assert "protected by a passphrase" in problem


def test_not_a_certificate(site: Site) -> None:
    (site.root / "pki" / "medecin.pem").write_bytes(b"hello")
    [problem] = problems_at(site, "medecin-smime: {")
    assert "does not hold an X.509 certificate" in problem


def test_missing_directory_and_bad_directory_entry(site: Site) -> None:
    (site.root / "pki" / "directory" / "broken.crt").write_bytes(b"not a certificate")
    [problem] = problems_at(site, "directory:")
    assert "pki/directory/broken.crt does not hold an X.509 certificate" in problem
    site.write(site.config.read_text().replace("[pki/directory/]", "[pki/nowhere/]"))
    [problem] = problems_at(site, "directory:")
    assert "pki/nowhere does not exist" in problem


def test_unreadable_whitelist_is_an_error(site: Site) -> None:
    (site.root / "data" / "listeblanchemssante.xml").write_bytes(b"<nope")
    [problem] = problems_at(site, "mssante_whitelist:")
    assert problem.startswith("error: trust.mssante_whitelist:")


def test_load_keyring_refuses_broken_material(site: Site) -> None:
    config = load(site.config)
    (site.root / "pki" / "spool.key").write_bytes(b"short")
    with pytest.raises(pki.KeyMaterialError) as raised:
        pki.load_keyring(config, NOW)
    assert [p.line for p in raised.value.problems] == [site.line_of("spool:")]


def test_naive_now_is_taken_as_utc(site: Site) -> None:
    assert run_check(site.config, NOW.replace(tzinfo=None)).ok
