"""Certificate path validation and CRL checking shared by every certificate the gateway judges:
S/MIME signers and recipients (adapters/cms/trust.py) and TLS peers (gateway/peers.py).

Followed: RFC 5280 §6 (path validation, done by cryptography's x509.verification) and §6.3
(CRL checking, done here for every link of the chain: the leaf and each intermediate);
DESIGN.md §10 "Revocation": a configured CRL that is stale (past nextUpdate, or without one) or
not signed by the CA it names refuses the certificate; a CA with no configured CRL is not
revocation-checked (`gateway check` warns about it). Refusing for a stale or badly signed CRL
means deferring (4.7.5, `revocation_unknown`): both are the operator's to fix by installing a
fresh CRL from the CA, the sender can do nothing about them, and a bounce would lose mail
over a cron job that did not run. A badly signed CRL is most likely a wrong or corrupted
download or a CA key rollover not yet in trust.anchors; forging one takes write access to
the operator's files, and deferring never lets the certificate pass either.

When a configured anchor is an intermediate CA (IGC-Santé operators often list the
"ORGANISATIONS" CA beside the root), path building stops at it; the chain is then continued
through the other anchors up to the root, so that the root's CRL still covers the intermediate.

Kept between messages, per loaded configuration (`PathCache`, `RevocationIndex`; a reload or
a new CRL builds new ones): what depends only on certificates and CRLs that do not change.
Path building depends on the time only through the validity periods of the certificates it
may use, so a result is reused only for an instant that no notBefore or notAfter of those
certificates separates from the one it was computed for. A CRL's signature is checked once per
issuing certificate, and the serial numbers it lists are read once, but whether it is stale
is judged against `now` at every check, like the validity of the certificates themselves.

Untrusted input: the end-entity certificate and the intermediates a peer or a message carries;
the anchors and CRLs are the operator's.
"""

from __future__ import annotations

import bisect
import datetime as dt
import itertools
import threading
from collections import OrderedDict
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.x509 import verification

from gateway.errors import Reason, TemporaryFailure

__all__ = [
    "CertificateProblem",
    "PathCache",
    "RevocationIndex",
    "build_path",
    "check_revocation",
    "complete_chain",
    "revocation_unknown",
    "signed_by",
    "validity_problem",
]


class CertificateProblem(Exception):
    """Why a certificate is not acceptable: a closed-list reason and a short phrase."""

    def __init__(self, reason: Reason, phrase: str) -> None:
        super().__init__(phrase)
        self.reason = reason
        self.phrase = phrase


def revocation_unknown(detail: str) -> TemporaryFailure:
    """The deferral for a certificate whose revocation status the configured CRLs cannot tell
    (stale or badly signed CRL). The operator fixes it by refreshing the CRL; the message
    waits in the queue meanwhile and is bounced only at the retry give-up time."""
    return TemporaryFailure(
        "The revocation status of a certificate this message depends on cannot be checked "
        "now; the gateway will try again later",
        smtp_code=451, enhanced="4.7.5", reason=Reason.REVOCATION_UNKNOWN, detail=detail,
    )


def validity_problem(certificate: x509.Certificate, at: dt.datetime, label: str) -> str | None:
    if at < certificate.not_valid_before_utc:
        return f"certificate not yet valid at {label}"
    if at > certificate.not_valid_after_utc:
        return f"certificate expired at {label}"
    return None


def signed_by(subject: x509.Certificate | x509.CertificateRevocationList,
              issuer: x509.Certificate) -> bool:
    """Whether `issuer`'s key verifies the signature on `subject` (a certificate or a CRL)."""
    try:
        if isinstance(subject, x509.CertificateRevocationList):
            return subject.is_signature_valid(issuer.public_key())  # type: ignore[arg-type]
        subject.verify_directly_issued_by(issuer)
        return True
    except (TypeError, ValueError, InvalidSignature):
        return False
    except Exception:  # an unsupported key type and the like: not signed, as far as we know
        return False


def build_path(
    certificate: x509.Certificate,
    *,
    anchors: Sequence[x509.Certificate],
    intermediates: Iterable[x509.Certificate],
    at: dt.datetime,
    label: str,
    ca_policy: verification.ExtensionPolicy,
    ee_policy: verification.ExtensionPolicy,
) -> list[x509.Certificate]:
    """The chain from `certificate` to an anchor (leaf first), or CertificateProblem."""
    if not anchors:
        raise CertificateProblem(Reason.UNTRUSTED_SIGNER, "no trust anchors configured")
    pool = [c for c in intermediates if c != certificate]
    verifier = (
        verification.PolicyBuilder()
        .store(verification.Store(list(anchors)))
        .time(at)
        .max_chain_depth(8)
        .extension_policies(ca_policy=ca_policy, ee_policy=ee_policy)
        .build_client_verifier()  # the client verifier checks no host name; callers do
    )
    try:
        return list(verifier.verify(certificate, pool).chain)
    except verification.VerificationError as error:
        text = str(error)
        if "expired" in text or "not yet valid" in text or "validity" in text:
            raise CertificateProblem(Reason.EXPIRED, f"CA certificate not valid at {label}") \
                from None
        raise CertificateProblem(
            Reason.UNTRUSTED_SIGNER, "certificate not issued by a trusted CA"
        ) from None
    except Exception:  # unsupported name types and the like: never a pass
        raise CertificateProblem(
            Reason.UNTRUSTED_SIGNER, "certificate chain not verifiable"
        ) from None


def complete_chain(
    chain: Sequence[x509.Certificate], anchors: Sequence[x509.Certificate]
) -> list[x509.Certificate]:
    """`chain` continued through the anchors up to a self-signed root when it stopped at an
    anchor that is an intermediate CA, so that the CRL of the CA above still applies."""
    out = list(chain)
    while out and len(out) < 16:
        top = out[-1]
        if top.issuer == top.subject and signed_by(top, top):
            break
        parent = next(
            (a for a in anchors if a.subject == top.issuer and a not in out and signed_by(top, a)),
            None,
        )
        if parent is None:
            break
        out.append(parent)
    return out


_Value = TypeVar("_Value")


class _Recent(Generic[_Value]):
    """A bounded map that forgets the least recently used entry (safe across threads)."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._entries: OrderedDict[Hashable, _Value] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Hashable) -> _Value | None:
        with self._lock:
            value = self._entries.get(key)
            if value is not None:
                self._entries.move_to_end(key)
            return value

    def put(self, key: Hashable, value: _Value) -> None:
        with self._lock:
            self._entries[key] = value
            self._entries.move_to_end(key)
            while len(self._entries) > self._size:
                self._entries.popitem(last=False)


class _Boundaries:
    """The instants at which some certificate of a set becomes or stops being valid."""

    def __init__(self, certificates: Iterable[x509.Certificate]) -> None:
        instants: set[dt.datetime] = set()
        for certificate in certificates:
            instants.add(certificate.not_valid_before_utc)
            instants.add(certificate.not_valid_after_utc)
        self._sorted = sorted(instants)

    def position(self, at: dt.datetime) -> tuple[int, ...]:
        """Which boundaries lie before `at` and which equal it, at full precision and at the
        whole second (the precision cryptography's verifier works at): every certificate's
        validity is the same at two instants with the same position."""
        whole = at.astimezone(dt.UTC).replace(microsecond=0)
        return (
            bisect.bisect_left(self._sorted, at), bisect.bisect_right(self._sorted, at),
            bisect.bisect_left(self._sorted, whole), bisect.bisect_right(self._sorted, whole),
        )


@dataclass(frozen=True)
class _Refusal:
    """A remembered CertificateProblem: its reason and phrase only (an exception would keep
    its traceback, and with it the frames and the message they held)."""

    reason: Reason
    phrase: str


class PathCache:
    """`build_path` and `complete_chain` for one set of anchors and fixed intermediates (a
    loaded configuration's), remembered for the certificates messages bring.

    An entry is keyed by the leaf, the intermediates the message carries, the label and the
    position of the instant among the validity boundaries of every certificate path building
    may use: the anchors, the fixed intermediates, the carried ones and the leaf. Within one
    position every certificate is valid or not alike, and path building (deterministic, and
    given the same certificates and policies) gives the same chain or the same refusal; a
    certificate that expires between two messages moves the instant to a new position.
    Refusals are remembered too, and raised anew each time. A message carrying more
    certificates than any client sends is not remembered (it would hold them all).
    """

    MAX_CARRIED = 8

    def __init__(
        self,
        anchors: Sequence[x509.Certificate],
        intermediates: Sequence[x509.Certificate],
        *,
        ca_policy: verification.ExtensionPolicy,
        ee_policy: verification.ExtensionPolicy,
        size: int = 2048,
    ) -> None:
        self.anchors = tuple(anchors)
        self.intermediates = tuple(intermediates)
        self._policies = (ca_policy, ee_policy)
        self._boundaries = _Boundaries([*self.anchors, *self.intermediates])
        self._paths: _Recent[tuple[x509.Certificate, ...] | _Refusal] = _Recent(size)
        self._completed: _Recent[tuple[x509.Certificate, ...]] = _Recent(size)

    def _build(
        self, certificate: x509.Certificate, carried: tuple[x509.Certificate, ...],
        at: dt.datetime, label: str,
    ) -> tuple[x509.Certificate, ...] | _Refusal:
        try:
            return tuple(build_path(
                certificate, anchors=self.anchors,
                intermediates=[*carried, *self.intermediates], at=at, label=label,
                ca_policy=self._policies[0], ee_policy=self._policies[1],
            ))
        except CertificateProblem as problem:
            return _Refusal(problem.reason, problem.phrase)

    def build_path(
        self,
        certificate: x509.Certificate,
        *,
        carried: Sequence[x509.Certificate],
        at: dt.datetime,
        label: str,
    ) -> list[x509.Certificate]:
        """`build_path` over the carried intermediates followed by the fixed ones."""
        carried = tuple(carried)
        if len(carried) > self.MAX_CARRIED:
            found = self._build(certificate, carried, at, label)
        else:
            key = (
                certificate, carried, label, self._boundaries.position(at),
                _Boundaries([certificate, *carried]).position(at),
            )
            cached = self._paths.get(key)
            if cached is None:
                cached = self._build(certificate, carried, at, label)
                self._paths.put(key, cached)
            found = cached
        if isinstance(found, _Refusal):
            raise CertificateProblem(found.reason, found.phrase)
        return list(found)

    def complete_chain(self, chain: Sequence[x509.Certificate]) -> list[x509.Certificate]:
        key = tuple(chain)
        found = self._completed.get(key)
        if found is None:
            found = tuple(complete_chain(chain, self.anchors))
            self._completed.put(key, found)
        return list(found)


class RevocationIndex:
    """The configured CRLs, read once: grouped by issuer name, each one's signature checked
    once per issuing certificate, the serial numbers it lists gathered on its second use.

    Nothing here depends on the time: whether a CRL is stale is `check_revocation`'s question,
    asked at every check.
    """

    def __init__(self, crls: Sequence[x509.CertificateRevocationList]) -> None:
        self.crls = tuple(crls)
        self._by_issuer: dict[x509.Name, list[int]] = {}
        for index, crl in enumerate(self.crls):
            self._by_issuer.setdefault(crl.issuer, []).append(index)
        self._signed: dict[tuple[int, x509.Certificate], bool] = {}
        self._serials: dict[int, frozenset[int]] = {}
        self._looked_up: set[int] = set()

    def of_issuer(self, issuer: x509.Name) -> list[int]:
        """The CRLs issued under `issuer`, in configuration order."""
        return self._by_issuer.get(issuer, [])

    def signed_by(self, index: int, issuer: x509.Certificate) -> bool:
        key = (index, issuer)
        known = self._signed.get(key)
        if known is None:
            known = signed_by(self.crls[index], issuer)
            if len(self._signed) > 4096:  # issuers are CAs: only a hostile load gets here
                self._signed.clear()
            self._signed[key] = known
        return known

    def entry(self, index: int, serial: int) -> x509.RevokedCertificate | None:
        """The CRL's entry for `serial`, looked up only when the CRL lists that serial."""
        crl = self.crls[index]
        serials = self._serials.get(index)
        if serials is None:
            if index not in self._looked_up:
                # One look-up does not pay for reading the whole list (a throw-away index).
                self._looked_up.add(index)
                return crl.get_revoked_certificate_by_serial_number(serial)
            serials = frozenset(revoked.serial_number for revoked in crl)
            self._serials[index] = serials
        if serial not in serials:
            return None
        return crl.get_revoked_certificate_by_serial_number(serial)


def _on_hold(entry: x509.RevokedCertificate) -> bool:
    try:
        reason = entry.extensions.get_extension_for_class(x509.CRLReason).value.reason
    except x509.ExtensionNotFound:
        return False
    return reason is x509.ReasonFlags.certificate_hold


def _may_sign_crls(issuer: x509.Certificate) -> bool:
    """RFC 5280 §4.2.1.3: a CA whose key usage does not include cRLSign cannot sign CRLs."""
    try:
        usage = issuer.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        return True
    return bool(usage.crl_sign)


def _is_ca(certificate: x509.Certificate) -> bool:
    try:
        return bool(certificate.extensions.get_extension_for_class(
            x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def _covers(crl: x509.CertificateRevocationList, child: x509.Certificate) -> bool:
    """Whether `crl` is a complete list for `child` (RFC 5280 §5.2.4, §5.2.5, §6.3.3).

    A delta CRL lists only changes since a base, a CRL with a partial scope (only some
    reasons, an indirect CRL, one distribution point of a partitioned CA, only user or only CA
    certificates) speaks only of part of the CA's certificates: neither can say on its own that
    `child` is not revoked. Their entries still count when they list `child`.
    """
    try:
        crl.extensions.get_extension_for_class(x509.DeltaCRLIndicator)
        return False
    except x509.ExtensionNotFound:
        pass
    try:
        scope = crl.extensions.get_extension_for_class(x509.IssuingDistributionPoint).value
    except x509.ExtensionNotFound:
        return True
    if scope.only_some_reasons or scope.indirect_crl or scope.only_contains_attribute_certs:
        return False
    if scope.only_contains_user_certs and _is_ca(child):
        return False
    if scope.only_contains_ca_certs and not _is_ca(child):
        return False
    if scope.full_name is None and scope.relative_name is None:
        return True
    # A partitioned CRL covers the certificates that name its distribution point.
    try:
        points = child.extensions.get_extension_for_class(x509.CRLDistributionPoints).value
    except x509.ExtensionNotFound:
        return False
    wanted = set(scope.full_name or ())
    return any(point.full_name and wanted & set(point.full_name) for point in points)


def check_revocation(
    chain: Sequence[x509.Certificate],
    crls: Sequence[x509.CertificateRevocationList],
    now: dt.datetime,
    index: RevocationIndex | None = None,
) -> None:
    """Every link of `chain` (leaf first) against the configured CRLs of its issuer.

    REVOKED when a CRL signed by the issuer lists the certificate, stale or not (a revocation
    is not undone by the list ageing). Otherwise, for each issuer that has configured CRLs, at
    least one of them must be signed by it (with cRLSign), current (before its nextUpdate) and
    complete for the certificate (not a delta, not of a narrower scope): else REVOCATION_UNKNOWN.
    A stale list beside a current one of the same CA (an old file left in `trust.crls`) does not
    hold mail back. The unknown case is the operator's to fix (fetch a fresh CRL): callers treat
    it as temporary, never as a pass and never as a final verdict on the certificate. The whole
    chain is looked at before answering, so a revoked CA above a stale CRL is still reported as
    revoked. `index`, built once for `crls`, saves reading them again (see `RevocationIndex`);
    the answer is the same.
    """
    if index is None or index.crls != tuple(crls):
        index = RevocationIndex(crls)
    unknown: str | None = None
    for child, parent in itertools.pairwise(chain):
        numbers = index.of_issuer(child.issuer)
        if not numbers:
            continue  # DESIGN.md §10: a CA with no configured CRL is not revocation-checked.
        why_not: str | None = None
        answered = False
        for number in numbers:
            crl = index.crls[number]
            if not _may_sign_crls(parent) or not index.signed_by(number, parent):
                why_not = why_not or "CRL not signed by the issuer"
                continue
            next_update = crl.next_update_utc
            stale = next_update is None or next_update < now
            entry = index.entry(number, child.serial_number)
            # A hold (RFC 5280 §5.3.1 certificateHold) may have been released since a stale
            # list was issued: only then is a listed certificate "unknown" rather than revoked.
            if entry is not None and not (stale and _on_hold(entry)):
                which = "certificate" if child is chain[0] else "issuing CA certificate"
                raise CertificateProblem(Reason.REVOKED, f"{which} revoked")
            if stale:
                why_not = why_not or "CRL is stale (past nextUpdate)"
            elif not _covers(crl, child):
                why_not = why_not or "CRL is a delta or of a narrower scope, no complete CRL"
            else:
                answered = True
        if not answered:
            unknown = unknown or why_not
    if unknown is not None:
        raise CertificateProblem(Reason.REVOCATION_UNKNOWN, unknown)
