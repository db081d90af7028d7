"""Peer → network mapping and the MSSanté checks on TLS certificates, without sockets:
whitelist DNs per MAIL FROM domain, CRLs (leaf and intermediate, stale, badly signed, absent),
validity, chain, key usage, and the next hop check of `relay.whitelist: mssante`."""

from __future__ import annotations

import datetime as dt
import ipaddress
import re
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from gateway.config import Config, load
from gateway.dn import dn_from_name
from gateway.envelope import Recipient
from gateway.errors import GatewayError, PermanentFailure, Reason, TemporaryFailure
from gateway.peers import PeerIdentity, PeerTrust, check_next_hop, resolve_source
from gateway.whitelist import MssanteWhitelist, load_whitelist
from tests.support import testpki
from tests.support.world import MssanteWorld, build_mssante_world

LOCAL = ipaddress.ip_address("127.0.0.1")
ELSEWHERE = ipaddress.ip_address("192.0.2.7")  # not the clinic's address: certificate only
NOW = testpki.NOW


@dataclass
class Space:
    world: MssanteWorld
    config: Config
    whitelist: MssanteWhitelist
    trust: PeerTrust

    def resolve(self, role: str | testpki.Issued, sender: str | None,
                trust: PeerTrust | None = None, address: object = ELSEWHERE) -> str:
        issued = self.world.operators[role] if isinstance(role, str) else role
        peer = PeerIdentity(address, issued.certificate)  # type: ignore[arg-type]
        domain = None if sender is None else sender.rpartition("@")[2]
        return resolve_source(self.config, peer, domain, self.whitelist,
                              trust=trust or self.trust).name

    def refusal(self, role: str | testpki.Issued, sender: str | None,
                trust: PeerTrust | None = None) -> GatewayError:
        with pytest.raises(GatewayError) as caught:
            self.resolve(role, sender, trust)
        return caught.value


@pytest.fixture
def space(tmp_path: Path) -> Space:
    world = build_mssante_world(tmp_path)
    pki = world.pki
    trust = PeerTrust(
        (pki.root.certificate, pki.organisations.certificate),
        (pki.root.crl(), pki.organisations.crl()),
        NOW,
    )
    return Space(world, load(world.config), load_whitelist(world.whitelist), trust)


# -- inbound ----------------------------------------------------------------------------------


STRUCTURE = re.compile(r"1\d{9}|3\d{14}")  # 1 + FINESS (9 digits) or 3 + SIRET (14 digits)
DEPARTMENT = re.compile(r"\S.* \((\d{2}|2A|2B|\d{3})\)")


def test_the_test_pki_is_shaped_like_igc_sante(space: Space) -> None:
    pki = space.world.pki
    root, organisations = pki.root.certificate, pki.organisations.certificate
    assert root.subject == root.issuer and "IGC-SANTE" in root.subject.rfc4514_string()
    assert organisations.issuer == root.subject
    assert "ORGANISATIONS" in organisations.subject.rfc4514_string()
    for issued in (root, organisations):
        assert issued.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    for role, issued in space.world.operators.items():
        if role in ("reordered", "untrusted"):
            continue
        subject = dn_from_name(issued.certificate.subject)
        # CN=<fqdn>, OU=<structure id>, O=<name>, ST=<Département (NN)>, C=FR, in that order.
        assert [a.oid for rdn in subject.rdns for a in rdn] == [
            "2.5.4.3", "2.5.4.11", "2.5.4.10", "2.5.4.8", "2.5.4.6"], role
        assert STRUCTURE.fullmatch(subject.get("OU")[0]), role
        assert DEPARTMENT.fullmatch(subject.get("ST")[0]), role
        assert subject.get("C") == ("FR",)
        assert issued.certificate.issuer == organisations.subject
    # A revoked one, listed in the ORGANISATIONS CA's CRL, and an expired one.
    crl = pki.organisations.crl()
    revoked = space.world.operators["revoked"].certificate
    assert crl.get_revoked_certificate_by_serial_number(revoked.serial_number) is not None
    assert crl.is_signature_valid(organisations.public_key())  # type: ignore[arg-type]
    assert space.world.operators["expired"].certificate.not_valid_after_utc < NOW


def test_listed_operator_is_the_mssante_network(space: Space) -> None:
    assert space.resolve("listed", "dr@a.mssante-test.fr") == "mssante"
    assert space.resolve("listed", "dr@C.MSSANTE-TEST.FR.") == "mssante"
    assert space.resolve("listed", "dr@d.autre-mssante-test.fr") == "autre"


def test_certificate_without_subject_alt_name_is_accepted(space: Space) -> None:
    assert space.resolve("nosan", "x@b.mssante-test.fr") == "mssante"


def test_listed_for_another_domain_only_is_refused_with_details_for_the_audit(
    space: Space,
) -> None:
    error = space.refusal("nosan", "x@a.mssante-test.fr")
    assert isinstance(error, PermanentFailure)
    assert error.smtp_reply.startswith("550 5.7.1 ")
    assert "CN=" not in error.smtp_reply  # the peer learns nothing about the list
    assert space.world.dn("nosan") in error.detail
    assert "the whitelist expects" in error.detail


@pytest.mark.parametrize("role", ["unlisted", "cn_twin", "reordered"])
def test_dn_must_match_in_full_and_in_order(space: Space, role: str) -> None:
    error = space.refusal(role, "dr@a.mssante-test.fr")
    assert error.smtp_reply.startswith("550 5.7.1")
    assert error.reason is Reason.PEER_NOT_AUTHENTICATED


def test_revoked_leaf_is_refused(space: Space) -> None:
    error = space.refusal("revoked", "dr@a.mssante-test.fr")
    assert error.smtp_reply.startswith("550 5.7.1")
    assert error.reason is Reason.REVOKED
    assert "certificate revoked" in error.detail


def test_revoked_intermediate_is_refused_through_the_root_crl(space: Space) -> None:
    pki = space.world.pki
    pki.root.revoke(pki.organisations)
    trust = replace(space.trust, crls=(pki.root.crl(), pki.organisations.crl()))
    error = space.refusal("listed", "dr@a.mssante-test.fr", trust)
    assert error.reason is Reason.REVOKED
    assert "issuing CA certificate revoked" in error.detail


def test_stale_crl_refuses_for_now(space: Space) -> None:
    later = replace(space.trust, now=NOW + dt.timedelta(days=8))  # CRLs say next in 7 days
    error = space.refusal("listed", "dr@a.mssante-test.fr", later)
    assert isinstance(error, TemporaryFailure)
    assert error.smtp_reply.startswith("451 4.7.5")
    assert error.reason is Reason.REVOCATION_UNKNOWN and "stale" in error.detail


def test_badly_signed_crl_refuses(space: Space) -> None:
    pki = space.world.pki
    forged = pki.organisations.crl(signer=pki.root)  # right issuer name, wrong key
    trust = replace(space.trust, crls=(pki.root.crl(), forged))
    error = space.refusal("listed", "dr@a.mssante-test.fr", trust)
    # The gateway's own CRL is at fault, not the peer: the peer is told to retry later.
    assert isinstance(error, TemporaryFailure)
    assert error.smtp_reply.startswith("451 4.7.5")
    assert error.reason is Reason.REVOCATION_UNKNOWN and "not signed" in error.detail


def test_ca_without_configured_crl_is_not_revocation_checked(space: Space) -> None:
    trust = replace(space.trust, crls=(space.world.pki.root.crl(),))
    assert space.resolve("revoked", "dr@a.mssante-test.fr", trust) == "mssante"


@pytest.mark.parametrize(("role", "reason"), [
    ("expired", Reason.EXPIRED), ("untrusted", Reason.PEER_NOT_AUTHENTICATED),
])
def test_expired_or_untrusted_certificates_are_refused(
    space: Space, role: str, reason: Reason,
) -> None:
    error = space.refusal(role, "dr@a.mssante-test.fr")
    assert error.smtp_reply.startswith("550 5.7.1")
    assert error.reason is reason


def test_certificate_not_for_tls_clients_is_refused(space: Space) -> None:
    only_mail = space.world.pki.organisations.issue(
        space.world.operators["listed"].certificate.subject,
        eku=[ExtendedKeyUsageOID.EMAIL_PROTECTION])
    error = space.refusal(only_mail, "dr@a.mssante-test.fr")
    assert error.reason is Reason.PEER_NOT_AUTHENTICATED
    assert "not issued by a trusted CA" in error.detail or "usage" in error.detail


def test_null_sender_needs_a_listing_for_some_domain_of_the_network(space: Space) -> None:
    assert space.resolve("listed", None) in ("mssante", "autre")
    assert space.resolve("nosan", None) == "mssante"
    error = space.refusal("unlisted", None)
    assert "null sender" in error.detail


def test_a_bad_certificate_leaves_address_rules_alone(space: Space) -> None:
    # The clinic trusts 127.0.0.1 by address: a revoked certificate authenticates nothing,
    # but does not take away what the address grants.
    assert space.resolve("revoked", "x@clinique-test.fr", address=LOCAL) == "clinic"
    with pytest.raises(GatewayError) as caught:
        space.resolve("revoked", "x@a.mssante-test.fr", address=LOCAL)
    assert caught.value.reason is Reason.REVOKED


def test_sender_of_another_network_is_refused(space: Space) -> None:
    error = space.refusal("listed", "x@clinique-test.fr")
    assert error.reason is Reason.SENDER_NOT_ALLOWED


def test_unicode_sender_domain_is_compared_in_its_idna_form(space: Space, tmp_path: Path) -> None:
    world = space.world
    world.write_whitelist([*world.listed, ("hôpital.mssante-test.fr", world.dn("unlisted"))])
    space.whitelist = load_whitelist(world.whitelist)
    assert space.resolve("unlisted", "x@HÔPITAL.mssante-test.fr") == "mssante"
    assert space.resolve("unlisted", "x@xn--hpital-ixa.mssante-test.fr") == "mssante"


def test_no_whitelist_loaded_refuses_whitelist_peers(space: Space) -> None:
    peer = PeerIdentity(ELSEWHERE, space.world.operators["listed"].certificate)
    with pytest.raises(PermanentFailure):
        resolve_source(space.config, peer, "a.mssante-test.fr", None, trust=space.trust)


# -- outbound ---------------------------------------------------------------------------------


def next_hop(space: Space, name: str) -> x509.Certificate:
    return x509.load_pem_x509_certificate(
        (space.world.root / "pki" / f"sink-{name}.pem").read_bytes())


def recipients(*addresses: str) -> list[Recipient]:
    return [Recipient(a, "mssante") for a in addresses]


def test_next_hop_listed_for_every_recipient_domain_passes(space: Space) -> None:
    network = space.config.networks["mssante"]
    check_next_hop(network, recipients("a@a.mssante-test.fr", "b@B.mssante-test.fr"),
                   next_hop(space, "mssante"), whitelist=space.whitelist, trust=space.trust)


def test_next_hop_not_listed_for_one_domain_defers(space: Space) -> None:
    network = space.config.networks["mssante"]
    with pytest.raises(TemporaryFailure) as caught:
        check_next_hop(network, recipients("a@a.mssante-test.fr", "c@c.mssante-test.fr"),
                       next_hop(space, "mssante"), whitelist=space.whitelist, trust=space.trust)
    error = caught.value
    assert error.smtp_reply.startswith("451 4.7.1") and "c.mssante-test.fr" in error.advice
    assert "CN=mx.mssante.test" in error.detail and "the whitelist expects" in error.detail


def test_next_hop_revoked_or_absent_defers(space: Space) -> None:
    network = space.config.networks["autre"]
    with pytest.raises(TemporaryFailure, match="revoked"):
        check_next_hop(network, recipients("d@d.autre-mssante-test.fr"),
                       next_hop(space, "revokedhop"), whitelist=space.whitelist,
                       trust=space.trust)
    with pytest.raises(TemporaryFailure, match="no certificate"):
        check_next_hop(network, recipients("d@d.autre-mssante-test.fr"), None,
                       whitelist=space.whitelist, trust=space.trust)


def test_relay_without_whitelist_is_not_checked_here(space: Space) -> None:
    check_next_hop(space.config.networks["clinic"], recipients("x@clinique-test.fr"), None,
                   whitelist=None, trust=space.trust)


# -- which network owns the sender's domain ------------------------------------------------------


def with_exact_network(space: Space, peers: str) -> Config:
    """The world's configuration plus a network `sud` that owns sud.mssante-test.fr by its
    exact name, listed after `mssante` whose `*.mssante-test.fr` also covers that name."""
    text = space.world.config.read_text()
    text = text.replace("  clinic:\n", f"""  sud:
    adapter: mime
    domains: [sud.mssante-test.fr]
    peers: {peers}
    relay: {{host: 127.0.0.1, port: 2599, tls: none}}
  clinic:
""", 1).replace("routes:\n", "routes:\n  - {from: sud, to: [clinic]}\n", 1)
    space.world.config.write_text(text)
    return load(space.world.config)


def test_sender_domain_belongs_to_the_network_that_names_it_exactly(space: Space) -> None:
    # sud.mssante-test.fr is sud's (an exact name wins over a wildcard, as for routing): a
    # peer that sud authenticates by its subject sends for it, whatever mssante's list says.
    space.config = with_exact_network(space, f'{{subjects: ["{space.world.dn("unlisted")}"]}}')
    assert space.resolve("unlisted", "x@sud.mssante-test.fr") == "sud"
    assert space.resolve("listed", "x@a.mssante-test.fr") == "mssante"


def test_a_listed_operator_sends_as_the_network_that_owns_the_domain(space: Space) -> None:
    world = space.world
    world.write_whitelist([*world.listed, ("sud.mssante-test.fr", world.dn("unlisted"))])
    space.whitelist = load_whitelist(world.whitelist)
    space.config = with_exact_network(space, "{whitelist: mssante}")
    assert space.resolve("unlisted", "x@sud.mssante-test.fr") == "sud"
    # For the null sender, the domains the DN is listed for count for the network that owns
    # them: here sud only, never mssante through its wildcard.
    assert space.resolve("unlisted", None) == "sud"
    error = space.refusal("unlisted", "x@a.mssante-test.fr")
    assert error.smtp_reply.startswith("550 5.7.1")
