"""Which network a connected peer speaks for (routing.yaml `peers:`, DESIGN.md §10 "Peers"), and
whether a next hop may receive a network's mail (`relay.whitelist: mssante`).

Untrusted input: the peer's IP address and the certificate it presented (already verified
against the trust anchors by the TLS handshake, which checks neither revocation nor the
whitelist), the MAIL FROM domain, and the next hop's certificate after STARTTLS.

A peer is authenticated for a network when every criterion the network states holds: its
certificate subject is one of `subjects:` (RFC 4514/4518 comparison, never the CN alone), its
address is within `addresses:`, and for `whitelist: mssante` its certificate's subject DN is
listed in the MSSanté whitelist for the MAIL FROM domain (for the null sender: for any domain of
that network). A network that states no criterion accepts nobody: the default is deny. A peer
that matches several networks is resolved by the MAIL FROM domain: the sender's domain belongs
to the network routing would send it to (an exact name wins over a wildcard), and the peer
must be authenticated for that network.

A certificate only authenticates a peer after the gateway has checked it again at MAIL time,
the way RFC 5280 asks and the handshake does not: path to the anchors, validity, CRLs of the
leaf and of every CA above it (gateway.revocation: a stale or badly signed configured CRL
refuses, a CA without a configured CRL is not checked). A subjectAltName is not required: the
MSSanté list matches on the subject DN, and IGC-Santé client certificates may carry none.

What the peer is told is one sentence (550 5.7.1, or 451 4.7.5 when the gateway's own CRL is
unusable, so that mail waits for a fresh CRL instead of bouncing); which DN it presented and
which DNs the list expects go to `detail`, that is the logs and the audit trail.
"""

from __future__ import annotations

import datetime as dt
import functools
import ipaddress
import threading
from collections import OrderedDict
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from cryptography import x509
from cryptography.x509 import verification
from cryptography.x509.oid import ExtendedKeyUsageOID

from gateway.config import Config, NetworkSettings
from gateway.dn import DistinguishedName, dn_from_name, parse_dn
from gateway.envelope import Recipient
from gateway.errors import GatewayError, PermanentFailure, Reason, TemporaryFailure
from gateway.revocation import (
    CertificateProblem,
    PathCache,
    RevocationIndex,
    check_revocation,
    validity_problem,
)
from gateway.whitelist import normalise_domain

__all__ = [
    "PeerIdentity",
    "PeerTrust",
    "Whitelist",
    "check_next_hop",
    "resolve_source",
    "verify_certificate",
]

_AGNOSTIC = verification.Criticality.AGNOSTIC
# How many listed DNs a log line shows before counting the rest.
_SHOWN = 5


class Whitelist(Protocol):
    """Domain → operator certificate DNs allowed to send for it (the MSSanté list)."""

    def operators(self, domain: str) -> Collection[DistinguishedName]: ...

    def domains_for(self, operator: DistinguishedName) -> Collection[str]: ...


@dataclass(frozen=True)
class PeerTrust:
    """What a peer certificate is checked against: the anchors (which may include
    intermediate CAs, also used to build paths) and CRLs of `trust:`, at `now`."""

    anchors: tuple[x509.Certificate, ...]
    crls: tuple[x509.CertificateRevocationList, ...] = ()
    now: dt.datetime = field(default_factory=lambda: dt.datetime.now(dt.UTC))


@dataclass(frozen=True)
class PeerIdentity:
    address: ipaddress.IPv4Address | ipaddress.IPv6Address
    certificate: x509.Certificate | None = None  # verified client certificate, if any

    @property
    def subject(self) -> DistinguishedName | None:
        if self.certificate is None:
            return None
        return dn_from_name(self.certificate.subject)

    @property
    def subject_text(self) -> str | None:
        subject = self.subject
        return str(subject) if subject is not None else None


# -- certificates ---------------------------------------------------------------------------


_PURPOSES = {"client": ExtendedKeyUsageOID.CLIENT_AUTH, "server": ExtendedKeyUsageOID.SERVER_AUTH}


def _eku_allows(role: str) -> Callable[
        [verification.Policy, x509.Certificate, x509.ExtendedKeyUsage | None], None]:
    purpose = _PURPOSES[role]

    def validate(policy: verification.Policy, certificate: x509.Certificate,
                 value: x509.ExtendedKeyUsage | None) -> None:
        # No EKU means any purpose (RFC 5280 §4.2.1.12); one that is there must allow ours.
        if value is not None and not (
            purpose in value or ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE in value
        ):
            raise ValueError(f"extended key usage does not allow TLS {role} authentication")
    return validate


def _ca_key_usage(policy: verification.Policy, certificate: x509.Certificate,
                  value: x509.KeyUsage | None) -> None:
    if value is not None and not value.key_cert_sign:
        raise ValueError("CA key usage does not allow certificate signing")


@functools.lru_cache(maxsize=8)
def _paths(anchors: tuple[x509.Certificate, ...], role: str) -> PathCache:
    """Path building for one configuration's anchors, remembered between handshakes (see
    `PathCache`: validity is still judged at every check). A reload brings new anchors, hence
    a new cache; the few kept are the latest configurations'."""
    ca_policy = (
        verification.ExtensionPolicy.permit_all()
        .require_present(x509.BasicConstraints, _AGNOSTIC, None)
        .may_be_present(x509.KeyUsage, _AGNOSTIC, _ca_key_usage)
    )
    ee_policy = verification.ExtensionPolicy.permit_all().may_be_present(
        x509.ExtendedKeyUsage, _AGNOSTIC, _eku_allows(role)
    )
    # Python's ssl module does not hand over the intermediates the peer sent, so paths are
    # built through the anchors, which hold IGC-Santé's intermediate CAs.
    return PathCache(anchors, anchors, ca_policy=ca_policy, ee_policy=ee_policy)


_INDEXES: OrderedDict[tuple[int, ...], RevocationIndex] = OrderedDict()
_INDEXES_LOCK = threading.Lock()


def _revocations(crls: tuple[x509.CertificateRevocationList, ...]) -> RevocationIndex:
    """The configured CRLs read once (an IGC-Santé CRL lists tens of thousands of serials),
    for the latest few configurations. CRL objects are not hashable: they are told apart by
    identity, which stays unique while the index holds them."""
    key = tuple(id(crl) for crl in crls)
    with _INDEXES_LOCK:
        index = _INDEXES.get(key)
        if index is None:
            index = _INDEXES[key] = RevocationIndex(crls)
            while len(_INDEXES) > 8:
                _INDEXES.popitem(last=False)
        _INDEXES.move_to_end(key)
        return index


def verify_certificate(
    certificate: x509.Certificate, trust: PeerTrust, *, role: str = "client"
) -> list[x509.Certificate]:
    """The chain of a TLS peer's certificate (leaf first, up to the root when the anchors
    have it), or CertificateProblem. `role` is "client" (a peer sending to us) or "server"
    (a next hop); the extended key usage, when present, must allow that role."""
    problem = validity_problem(certificate, trust.now, "now")
    if problem:
        raise CertificateProblem(Reason.EXPIRED, problem)
    paths = _paths(tuple(trust.anchors), role)
    chain = paths.build_path(certificate, carried=(), at=trust.now, label="now")
    chain = paths.complete_chain(chain)
    crls = tuple(trust.crls)
    check_revocation(chain, crls, trust.now, _revocations(crls))
    return chain


def _describe(certificate: x509.Certificate) -> str:
    return (f"{dn_from_name(certificate.subject)} (serial {certificate.serial_number:x}, "
            f"issuer {dn_from_name(certificate.issuer)})")


def _certificate_refused(peer: PeerIdentity, problem: CertificateProblem) -> GatewayError:
    assert peer.certificate is not None
    detail = f"peer {peer.address} certificate {_describe(peer.certificate)}: {problem.phrase}"
    if problem.reason is Reason.REVOCATION_UNKNOWN:
        return TemporaryFailure(
            "The revocation status of this peer's certificate cannot be established now; "
            "try again later", smtp_code=451, enhanced="4.7.5", reason=problem.reason,
            detail=detail,
        )
    reason = problem.reason if problem.reason in (Reason.REVOKED, Reason.EXPIRED) \
        else Reason.PEER_NOT_AUTHENTICATED
    return PermanentFailure(
        "This peer is not authorized to send mail through this gateway",
        smtp_code=550, enhanced="5.7.1", reason=reason, detail=detail,
    )


def _expected(dns: Collection[DistinguishedName]) -> str:
    if not dns:
        return "the whitelist lists no certificate for it"
    shown = sorted(str(dn) for dn in dns)
    more = f" and {len(shown) - _SHOWN} more" if len(shown) > _SHOWN else ""
    return "the whitelist expects " + "; ".join(shown[:_SHOWN]) + more


# -- inbound --------------------------------------------------------------------------------


def _not_authorized(detail: str) -> PermanentFailure:
    return PermanentFailure(
        "This peer is not authorized to send mail through this gateway",
        smtp_code=550, enhanced="5.7.1", reason=Reason.PEER_NOT_AUTHENTICATED, detail=detail,
    )


@functools.lru_cache(maxsize=256)
def _subjects(texts: tuple[str, ...]) -> frozenset[DistinguishedName]:
    return frozenset(parse_dn(text) for text in texts)


def _uses_certificate(network: NetworkSettings) -> bool:
    return bool(network.peers.subjects or network.peers.whitelist)


def _matches_static(network: NetworkSettings, peer: PeerIdentity) -> bool:
    """The part of the peer rule that does not depend on the sender's domain."""
    rule = network.peers
    if not (rule.subjects or rule.addresses or rule.whitelist):
        return False
    if rule.subjects:
        subject = peer.subject
        if subject is None or subject not in _subjects(tuple(rule.subjects)):
            return False
    if rule.addresses and not any(peer.address in net for net in rule.addresses):
        return False
    if rule.whitelist and peer.certificate is None:
        return False
    return True


def candidates(config: Config, peer: PeerIdentity) -> list[NetworkSettings]:
    """Networks this peer may speak for, before the sender's domain is known and before its
    certificate is checked again."""
    return [n for n in config.networks.values() if _matches_static(n, peer)]


def _listed_for_domain(network: NetworkSettings, subject: DistinguishedName, domain: str,
                       whitelist: Whitelist | None) -> bool:
    if not network.peers.whitelist:
        return True
    return whitelist is not None and subject in whitelist.operators(domain)


def _owner(config: Config, domain: str) -> str | None:
    """The name of the network a (normalised) domain belongs to: an exact name wins over a
    wildcard, as for routing."""
    network = config.network_for_domain(domain)
    return network.name if network is not None else None


def _listed_for_network(config: Config, network: NetworkSettings, subject: DistinguishedName,
                        whitelist: Whitelist | None) -> bool:
    """For the null sender: the DN is listed for some domain that belongs to the network
    (not one that its wildcard covers but another network names exactly)."""
    if not network.peers.whitelist:
        return True
    if whitelist is None:
        return False
    return any(_owner(config, domain) == network.name
               for domain in whitelist.domains_for(subject))


def resolve_source(
    config: Config, peer: PeerIdentity, sender_domain: str | None,
    whitelist: Whitelist | None = None, *, trust: PeerTrust,
) -> NetworkSettings:
    """The source network for a transaction from `peer` with this MAIL FROM domain.

    `sender_domain` is None for the null sender, which an authenticated peer may use for
    bounces and receipts of its network. Raises a GatewayError whose reply is for the peer and
    whose `detail` says why, for the audit trail.
    """
    found = candidates(config, peer)
    if not found:
        raise _not_authorized(
            f"peer {peer.address} subject {peer.subject_text!r} matches no network's peers:"
        )
    refused: GatewayError | None = None
    if peer.certificate is not None and any(_uses_certificate(n) for n in found):
        try:
            verify_certificate(peer.certificate, trust, role="client")
        except CertificateProblem as problem:
            # The certificate authenticates nothing; networks that trust the peer by address
            # alone still may.
            refused = _certificate_refused(peer, problem)
            found = [n for n in found if not _uses_certificate(n)]
    domain = None if sender_domain is None else normalise_domain(sender_domain)
    if sender_domain is not None and domain is None:
        raise PermanentFailure(
            f"Sender domain {sender_domain} is not a valid domain name",
            smtp_code=550, enhanced="5.7.1", reason=Reason.SENDER_NOT_ALLOWED,
            detail=f"peer {peer.address}: MAIL FROM domain {sender_domain!r} is not IDNA-valid",
        )
    # The sender's domain belongs to one network, the one routing would send it to (an
    # exact name wins over a wildcard): the peer must be authenticated for that one, so that
    # a wildcard network listed first never takes another network's domain.
    owner = None if domain is None else _owner(config, domain)
    network = next((n for n in found if n.name == owner), None)
    if refused is not None and (not found or (domain is not None and network is None)):
        raise refused
    if not found:
        raise _not_authorized(f"peer {peer.address} matches no network's peers:")
    subject = peer.subject
    if domain is None:
        for candidate in found:
            if not candidate.peers.whitelist or (
                subject is not None
                and _listed_for_network(config, candidate, subject, whitelist)
            ):
                return candidate
        raise _not_authorized(
            f"peer {peer.address} subject {peer.subject_text!r} is not listed in the whitelist "
            f"for any domain of {', '.join(n.name for n in found)} (null sender)"
        )
    if network is not None:
        if network.peers.whitelist and (
            subject is None or not _listed_for_domain(network, subject, domain, whitelist)
        ):
            expected = whitelist.operators(domain) if whitelist is not None else ()
            raise _not_authorized(
                f"peer {peer.address} presented {peer.subject_text!r}, which is not listed "
                f"in the MSSanté whitelist for {domain}; {_expected(expected)}"
            )
        return network
    raise PermanentFailure(
        f"Sender domain {sender_domain} does not belong to the network this peer sends for",
        smtp_code=550, enhanced="5.7.1", reason=Reason.SENDER_NOT_ALLOWED,
        detail=f"peer {peer.address} may send for {', '.join(n.name for n in found)}, but "
        f"{domain} belongs to {owner or 'no network'}",
    )


# -- outbound -------------------------------------------------------------------------------


def check_next_hop(
    network: NetworkSettings,
    recipients: Sequence[Recipient],
    certificate: x509.Certificate | None,
    *,
    whitelist: Whitelist | None,
    trust: PeerTrust,
) -> None:
    """For a relay with `whitelist: mssante`: the next hop's certificate (already verified by
    the handshake against the anchors and the host name) must also pass the CRLs and be listed
    for every recipient's domain. Raises TemporaryFailure (nothing is sent; the queue retries
    until the give-up time, then bounces)."""
    relay = network.relay
    if relay is None or relay.whitelist != "mssante":
        return
    where = f"{relay.host}:{relay.port}"
    if certificate is None:
        raise TemporaryFailure(
            f"The next hop {where} presented no certificate, and the {network.name} network "
            "requires one listed in the MSSanté whitelist; nothing was sent.",
            enhanced="4.7.5", reason=Reason.NEXT_HOP_UNTRUSTED,
        )
    try:
        verify_certificate(certificate, trust, role="server")
    except CertificateProblem as problem:
        raise TemporaryFailure(
            f"The certificate of the next hop {where} is not acceptable ({problem.phrase}); "
            "nothing was sent.",
            enhanced="4.7.5", reason=Reason.NEXT_HOP_UNTRUSTED,
            detail=f"next hop {where} certificate {_describe(certificate)}: {problem.phrase}",
        ) from None
    subject = dn_from_name(certificate.subject)
    unlisted: list[str] = []
    expected: list[str] = []
    for recipient in recipients:
        domain = normalise_domain(recipient.address.rpartition("@")[2]) or recipient.address
        if domain in unlisted:
            continue
        operators = whitelist.operators(domain) if whitelist is not None else ()
        if subject not in operators:
            unlisted.append(domain)
            expected.append(f"{domain}: {_expected(operators)}")
    if unlisted:
        raise TemporaryFailure(
            f"The next hop {where} is not listed in the MSSanté whitelist for "
            f"{', '.join(unlisted)}; nothing was sent.",
            enhanced="4.7.1", reason=Reason.NEXT_HOP_UNTRUSTED,
            detail=f"next hop {where} presented {subject}; " + "; ".join(expected),
        )
