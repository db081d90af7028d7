"""Which configured CRL may answer for a certificate (gateway/revocation.py, RFC 5280 §6.3).

A revocation listed by a CRL the issuer signed is final; otherwise the issuer must have at least
one CRL that is signed by it with cRLSign, current, and complete for the certificate (not a
delta, not of a narrower scope), or the status is unknown: the message waits (never a pass).
"""

from __future__ import annotations

import datetime as dt

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from gateway.errors import Reason
from gateway.pkigen import NOW, Issued, name, root
from gateway.revocation import CertificateProblem, check_revocation


@pytest.fixture
def ca() -> Issued:
    return root(name(CN="TEST AC REVOCATION", O="TEST", C="FR"))


@pytest.fixture
def leaf(ca: Issued) -> Issued:
    return ca.issue(name(CN="mx.chu-test.fr", O="CHU TEST", C="FR"))


def verdict(leaf: Issued, ca: Issued, *crls: x509.CertificateRevocationList) -> str:
    try:
        check_revocation([leaf.certificate, ca.certificate], crls, NOW)
    except CertificateProblem as problem:
        return problem.reason.value
    return "good"


def stale(ca: Issued) -> x509.CertificateRevocationList:
    return ca.crl(last_update=NOW - dt.timedelta(days=10), next_update=NOW - dt.timedelta(days=3))


def test_a_stale_list_beside_a_current_one_of_the_same_ca_does_not_hold_mail_back(
    ca: Issued, leaf: Issued,
) -> None:
    assert verdict(leaf, ca, stale(ca)) == "revocation_unknown"
    assert verdict(leaf, ca, stale(ca), ca.crl()) == "good"
    assert verdict(leaf, ca, ca.crl(), stale(ca)) == "good"


def test_a_revocation_in_any_list_the_issuer_signed_is_final(ca: Issued, leaf: Issued) -> None:
    current = ca.crl()
    ca.revoke(leaf)
    old_listing_it = stale(ca)
    assert verdict(leaf, ca, current, old_listing_it) == "revoked"


def test_a_badly_signed_list_beside_a_good_current_one_is_ignored(ca: Issued, leaf: Issued) -> None:
    forged = ca.crl(signer=root())
    assert verdict(leaf, ca, forged) == "revocation_unknown"
    assert verdict(leaf, ca, forged, ca.crl()) == "good"


def test_a_delta_crl_alone_cannot_say_a_certificate_is_good(ca: Issued, leaf: Issued) -> None:
    delta = ((x509.DeltaCRLIndicator(1), True),)
    assert verdict(leaf, ca, ca.crl(extensions=delta)) == "revocation_unknown"
    assert verdict(leaf, ca, ca.crl(extensions=delta), ca.crl()) == "good"
    ca.revoke(leaf)
    assert verdict(leaf, ca, ca.crl(extensions=delta)) == "revoked"


def scope(**fields: object) -> tuple[tuple[x509.ExtensionType, bool], ...]:
    values: dict[str, object] = {
        "full_name": None, "relative_name": None, "only_contains_user_certs": False,
        "only_contains_ca_certs": False, "only_some_reasons": None, "indirect_crl": False,
        "only_contains_attribute_certs": False,
    }
    values.update(fields)
    return ((x509.IssuingDistributionPoint(**values), True),)  # type: ignore[arg-type]


def test_a_crl_of_a_narrower_scope_is_not_complete_for_the_certificate(
    ca: Issued, leaf: Issued,
) -> None:
    assert verdict(leaf, ca, ca.crl(extensions=scope(only_contains_user_certs=True))) == "good"
    assert verdict(leaf, ca, ca.crl(extensions=scope(only_contains_ca_certs=True))) == (
        "revocation_unknown")
    some = frozenset({x509.ReasonFlags.key_compromise})
    assert verdict(leaf, ca, ca.crl(extensions=scope(only_some_reasons=some))) == (
        "revocation_unknown")
    assert verdict(leaf, ca, ca.crl(extensions=scope(indirect_crl=True))) == "revocation_unknown"


def test_a_partitioned_crl_covers_only_the_certificates_naming_its_distribution_point(
    ca: Issued,
) -> None:
    point = x509.UniformResourceIdentifier("http://crl.test/part-1.crl")
    partitioned = ca.crl(extensions=scope(full_name=[point]))
    plain = ca.issue(name(CN="sans-point", O="TEST", C="FR"))
    assert verdict(plain, ca, partitioned) == "revocation_unknown"
    named = (
        x509.CertificateBuilder()
        .subject_name(name(CN="avec-point", O="TEST", C="FR"))
        .issuer_name(ca.certificate.subject)
        .public_key(plain.key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - dt.timedelta(days=1))
        .not_valid_after(NOW + dt.timedelta(days=30))
        .add_extension(x509.CRLDistributionPoints([
            x509.DistributionPoint([point], None, None, None)]), critical=False)
        .sign(ca.key, hashes.SHA256())  # type: ignore[arg-type]
    )
    check_revocation([named, ca.certificate], [partitioned], NOW)  # covered: good


def test_an_issuer_without_crl_sign_cannot_vouch_for_a_list(ca: Issued, leaf: Issued) -> None:
    # The same CA name and key, but a certificate whose key usage leaves out cRLSign.
    no_crl_sign = (
        x509.CertificateBuilder()
        .subject_name(ca.certificate.subject)
        .issuer_name(ca.certificate.subject)
        .public_key(ca.key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - dt.timedelta(days=1))
        .not_valid_after(NOW + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=False, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=False,
            encipher_only=False, decipher_only=False), critical=True)
        .sign(ca.key, hashes.SHA256())  # type: ignore[arg-type]
    )
    with pytest.raises(CertificateProblem) as refused:
        check_revocation([leaf.certificate, no_crl_sign], [ca.crl()], NOW)
    assert refused.value.reason is Reason.REVOCATION_UNKNOWN
