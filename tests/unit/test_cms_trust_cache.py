"""adapters/cms/trust.py TrustCache: what is kept between messages never changes an answer.

Paths, CRL signatures and CRL serial numbers are remembered per TrustStore and directory;
the certificates' validity and the CRLs' staleness still count at every check. The main
property: over instants on and around every validity boundary, checked in a shuffled order
with one shared cache, every answer (the chain, or the reason and phrase of the refusal) is
the one a fresh cache gives.
"""

from __future__ import annotations

import datetime as dt
import random

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from adapters.base import Directory, TrustStore
from adapters.cms.directory import directory_index
from adapters.cms.trust import TrustCache, TrustProblem, check_certificate, trust_cache
from gateway.errors import Reason
from gateway.revocation import RevocationIndex, check_revocation
from tests.support.testpki import NOW, Issued, name, new_key, root

DAY = dt.timedelta(days=1)


class World:
    """Root → two intermediates with one key and one name, valid one after the other (a CA
    certificate renewed), → a leaf; a CRL of the root that goes stale at NOW + 4 days and
    lists the renewed intermediate."""

    def __init__(self) -> None:
        self.root = root(name(CN="TEST RACINE", O="TEST", C="FR"))
        key = new_key()
        subject = name(CN="TEST AC PERSONNES", O="TEST", C="FR")
        self.old = self.root.issue(subject, ca=True, key=key, not_before=NOW - 10 * DAY,
                                   not_after=NOW + 5 * DAY)
        self.new = self.root.issue(subject, ca=True, key=key, not_before=NOW + 3 * DAY,
                                   not_after=NOW + 60 * DAY)
        self.leaf = self.old.issue(
            name(CN="alice", O="TEST", C="FR"), key_kind="ec", emails=["alice@medecin.fr"],
            eku=[ExtendedKeyUsageOID.EMAIL_PROTECTION], not_before=NOW - DAY,
            not_after=NOW + 90 * DAY,
        )
        self.root.revoke(self.new)
        self.crl = self.root.crl(next_update=NOW + 4 * DAY)
        self.directory = Directory(x509=(self.old.certificate, self.new.certificate,
                                         self.leaf.certificate))

    def trust(self, *, crls: bool) -> TrustStore:
        return TrustStore(anchors=(self.root.certificate,), crls=(self.crl,) if crls else ())

    def instants(self) -> list[dt.datetime]:
        found = {NOW}
        certificates = [self.root, self.old, self.new, self.leaf]
        edges = [c.certificate.not_valid_before_utc for c in certificates]
        edges += [c.certificate.not_valid_after_utc for c in certificates]
        edges += [self.crl.next_update_utc]  # type: ignore[list-item]
        for edge in edges:
            for seconds in (-86400, -1, -0.5, 0, 0.5, 1, 86400):
                found.add(edge + dt.timedelta(seconds=seconds))
        return sorted(found)


@pytest.fixture(scope="module")
def world() -> World:
    return World()


def outcome(certificate: x509.Certificate, cache: TrustCache, at: dt.datetime,
            signing_time: dt.datetime | None = None) -> object:
    try:
        chain = check_certificate(certificate, purpose="sign", cache=cache, now=at,
                                  signing_time=signing_time)
    except TrustProblem as problem:
        return (problem.reason, problem.phrase)
    return tuple(c.serial_number for c in chain)


@pytest.mark.parametrize("crls", [False, True])
def test_a_shared_cache_answers_as_a_fresh_one_at_every_instant(world: World, crls: bool) -> None:
    trust = world.trust(crls=crls)
    instants = world.instants()
    expected = {
        at: outcome(world.leaf.certificate, TrustCache(trust, world.directory.x509), at)
        for at in instants
    }
    # The world is what it claims: both intermediates serve, at different times (and with
    # the CRL, the renewed one is revoked, the list goes stale).
    chains = {value[1] for value in expected.values() if isinstance(value[0], int)}
    refusals = {value[0] for value in expected.values() if not isinstance(value[0], int)}
    assert world.old.certificate.serial_number in chains
    if crls:
        assert {Reason.REVOKED, Reason.REVOCATION_UNKNOWN, Reason.EXPIRED} <= refusals
    else:
        assert world.new.certificate.serial_number in chains
    shared = TrustCache(trust, world.directory.x509)
    order = instants * 2
    random.Random(5).shuffle(order)
    for at in order:
        assert outcome(world.leaf.certificate, shared, at) == expected[at], at


def test_a_shared_cache_answers_as_a_fresh_one_for_signing_times(world: World) -> None:
    trust = world.trust(crls=True)
    shared = TrustCache(trust, world.directory.x509)
    pairs = [(NOW + offset * DAY, NOW + signed * DAY)
             for offset in (0, 2, 3.5, 4.5, 6) for signed in (-11, -2, 0, 3.5, 6)]
    random.Random(9).shuffle(pairs)
    for at, signed in pairs * 2:
        fresh = TrustCache(trust, world.directory.x509)
        assert (outcome(world.leaf.certificate, shared, at, signed)
                == outcome(world.leaf.certificate, fresh, at, signed)), (at, signed)


def test_a_chain_found_before_an_intermediate_expires_is_not_reused_after(world: World) -> None:
    directory = Directory(x509=(world.old.certificate, world.leaf.certificate))
    cache = TrustCache(world.trust(crls=False), directory.x509)
    assert outcome(world.leaf.certificate, cache, NOW) == (
        world.leaf.certificate.serial_number, world.old.certificate.serial_number,
        world.root.certificate.serial_number,
    )
    later = NOW + 6 * DAY
    refused = outcome(world.leaf.certificate, cache, later)
    assert refused == (Reason.UNTRUSTED_SIGNER, "certificate not issued by a trusted CA")
    assert refused == outcome(world.leaf.certificate, TrustCache(cache.trust, directory.x509),
                              later)


def test_the_leafs_own_validity_counts_at_every_check(world: World) -> None:
    cache = TrustCache(world.trust(crls=False), world.directory.x509)
    assert isinstance(outcome(world.leaf.certificate, cache, NOW + DAY), tuple)
    after = world.leaf.certificate.not_valid_after_utc + dt.timedelta(seconds=1)
    assert outcome(world.leaf.certificate, cache, after) == (
        Reason.EXPIRED, "certificate expired at now"
    )


def test_crl_staleness_is_judged_at_every_check(world: World) -> None:
    cache = TrustCache(world.trust(crls=True), world.directory.x509)
    assert isinstance(outcome(world.leaf.certificate, cache, NOW + 2 * DAY)[0], int)
    # Past the CRL's nextUpdate, with the chain through the old intermediate still valid.
    assert outcome(world.leaf.certificate, cache, NOW + 4.2 * DAY) == (
        Reason.REVOCATION_UNKNOWN, "CRL is stale (past nextUpdate)"
    )


def test_a_new_crl_is_a_new_trust_store_with_its_own_cache(world: World) -> None:
    directory = Directory(x509=world.directory.x509)
    first = world.trust(crls=False)
    assert trust_cache(first, directory) is trust_cache(first, directory)
    at = NOW + 6 * DAY  # only the renewed intermediate is valid: the CRL lists it
    assert isinstance(outcome(world.leaf.certificate, trust_cache(first, directory), at)[0],
                      int)
    revoking = TrustStore(anchors=first.anchors, crls=(world.root.crl(),))
    assert trust_cache(revoking, directory) is not trust_cache(first, directory)
    assert outcome(world.leaf.certificate, trust_cache(revoking, directory), at) == (
        Reason.REVOKED, "issuing CA certificate revoked"
    )


def test_a_listed_serial_is_found_once_the_list_is_indexed(world: World) -> None:
    index = RevocationIndex((world.root.crl(),))
    chain = [world.leaf.certificate, world.new.certificate, world.root.certificate]
    for _ in range(3):  # a direct look-up first, then through the serial numbers read once
        with pytest.raises(TrustProblem) as caught:
            check_revocation(chain, index.crls, NOW, index)
        assert caught.value.reason is Reason.REVOKED
        check_revocation([world.leaf.certificate, world.old.certificate,
                          world.root.certificate], index.crls, NOW, index)


def test_directory_index_finds_what_a_scan_finds() -> None:
    ca = root()
    people: list[Issued] = []
    for number in range(6):
        emails = [f"p{number}@medecin.fr", f"shared{number % 2}@medecin.fr"]
        people.append(ca.issue(name(CN=f"p{number}"), emails=emails,
                               eku=[ExtendedKeyUsageOID.EMAIL_PROTECTION]))
    directory = Directory(x509=(ca.certificate, *(p.certificate for p in people)))
    index = directory_index(directory)
    assert directory_index(directory) is index
    for address in ["P1@medecin.fr", "shared0@medecin.fr", "shared1@MEDECIN.fr",
                    "nobody@medecin.fr"]:
        assert index.for_address(address) == directory.x509_for(address)
    for certificate in directory.x509:
        assert certificate in index.with_serial(certificate.serial_number)
