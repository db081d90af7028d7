"""The Adapter protocol: how an envelope codec plugs into the gateway's pipeline.

An adapter is sans-I/O, in the manner of h11's protocol core: bytes and key material go in,
bytes and a verdict come out. It opens no socket, reads no file, reads no clock and draws no
randomness that it was not handed (`now` and `random` are in the contexts). That keeps every
adapter testable with vectors and measurable without a network.

    unwrap(raw, UnwrapContext) -> Unwrapped     message from the adapter's network, as received
    wrap(Unwrapped, WrapContext) -> Wrapped     message for the adapter's network, ready to send

Failures are raised as `gateway.errors.PermanentFailure` / `TemporaryFailure` carrying the
enhanced status code and one of the closed `Reason`s. The pipeline, not the adapter, decides
what a verdict means for delivery (the network's `require:`): an adapter reports what it found
and never refuses a message merely because it is unsigned.

Untrusted input: `raw` (everything the peer sent) in `unwrap`; `Unwrapped.content` in `wrap`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal, Protocol

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.x509 import Certificate, CertificateRevocationList

from gateway.errors import GatewayError, Reason

__all__ = [
    "Adapter",
    "Directory",
    "Identity",
    "TrustStore",
    "UnwrapContext",
    "Unwrapped",
    "Verdict",
    "WrapContext",
    "Wrapped",
]

VerdictResult = Literal["pass", "fail", "none", "neutral"]


@dataclass(frozen=True)
class Verdict:
    """What the gateway verified about the original signature (RFC 8601 / RFC 7281 terms)."""

    method: str  # "smime", "x-openpgp", "x-apicrypt"; "none" when the format carries none
    result: VerdictResult
    reason: str = ""  # short phrase for Authentication-Results and the audit trail
    failure: Reason | None = None  # the closed-list reason when result is "fail"
    signer: str | None = None  # the signer's mail address, when known
    signer_subject: str | None = None  # X.509 subject (RFC 4514) or OpenPGP user ID
    signer_issuer: str | None = None
    signer_serial: str | None = None
    fingerprints: tuple[str, ...] = ()  # signer certificate/key fingerprints, for the audit
    algorithm: str | None = None  # e.g. "sha256WithRSAEncryption", "EdDSA/SHA256"

    @staticmethod
    def unsigned(method: str = "none") -> Verdict:
        return Verdict(method=method, result="none", reason="not signed")


@dataclass(frozen=True)
class Unwrapped:
    """The sender's message with its network's envelope removed.

    `content` is the inner RFC 5322 message (headers and every MIME part) exactly as the sender
    wrote it. When the source format signs, `signed_entity` keeps the original signed entity
    so that a destination speaking the same format can pass the author's signature on.
    """

    content: bytes
    signature: Verdict
    source_format: str  # the adapter name that produced it
    encrypted: bool = False  # True only if the content was decrypted here, integrity-protected
    decryption_keys: tuple[str, ...] = ()  # fingerprints of the keys that decrypted it
    signed_entity: bytes | None = None
    notes: tuple[str, ...] = ()  # extra facts for the audit (never content)


@dataclass(frozen=True)
class Wrapped:
    """The message as it goes to the destination network, plus who could not get it."""

    content: bytes
    # recipient address -> why it cannot receive this message now: a PermanentFailure (no
    # certificate) bounces that recipient, a TemporaryFailure (the revocation status of its
    # certificate cannot be checked) defers it; the rest are delivered.
    refused: Mapping[str, GatewayError] = field(default_factory=dict)
    # recipient address -> fingerprint of the certificate or key it was encrypted to
    recipient_keys: Mapping[str, str] = field(default_factory=dict)
    signer_key: str | None = None  # fingerprint of the gateway identity that signed


@dataclass(frozen=True)
class Identity:
    """One of the gateway's own identities (routing.yaml `keys:`)."""

    name: str
    certificate: Certificate | None = None
    private_key: PrivateKeyTypes | None = None
    chain: tuple[Certificate, ...] = ()  # intermediates to include when signing
    openpgp_secret: bytes | None = None  # transferable secret key, armored or binary


@dataclass(frozen=True)
class TrustStore:
    """Trust anchors and revocation lists (routing.yaml `trust:`)."""

    anchors: tuple[Certificate, ...] = ()
    crls: tuple[CertificateRevocationList, ...] = ()


@dataclass(frozen=True, eq=False)
class Directory:
    """Correspondents' certificates and OpenPGP keys (routing.yaml `directory:`).

    Intermediate CA certificates may stand beside end-entity certificates. `memo` lets an
    adapter keep what it parsed from the directory for the lifetime of this object (a reload
    builds a new Directory), so parsing is paid once, not per message.
    """

    x509: tuple[Certificate, ...] = ()
    openpgp: tuple[bytes, ...] = ()  # one transferable public key per entry
    memo: dict[str, object] = field(default_factory=dict, compare=False, repr=False)

    def x509_for(self, address: str) -> tuple[Certificate, ...]:
        """End-entity certificates naming `address` (rfc822Name SAN or subject emailAddress)."""
        wanted = address.lower()
        found = []
        for certificate in self.x509:
            if wanted in certificate_addresses(certificate):
                found.append(certificate)
        return tuple(found)


def certificate_addresses(certificate: Certificate) -> frozenset[str]:
    """Mail addresses a certificate is issued to, lower-cased."""
    addresses: set[str] = set()
    try:
        san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        addresses.update(a.lower() for a in san.value.get_values_for_type(x509.RFC822Name))
    except x509.ExtensionNotFound:
        pass
    for attribute in certificate.subject.get_attributes_for_oid(x509.NameOID.EMAIL_ADDRESS):
        value = attribute.value
        if isinstance(value, str):
            addresses.add(value.lower())
    return frozenset(addresses)


@dataclass(frozen=True)
class UnwrapContext:
    network: str
    identity: Identity | None  # decrypts incoming mail; None for networks without one
    trust: TrustStore
    directory: Directory
    now: datetime
    options: Mapping[str, object] = field(default_factory=dict)  # the network's own settings


@dataclass(frozen=True)
class WrapContext:
    network: str
    identity: Identity | None  # signs outgoing mail
    trust: TrustStore
    directory: Directory
    now: datetime
    sender: str  # envelope sender ("" for the null sender)
    recipients: tuple[str, ...]  # envelope recipients in this network
    options: Mapping[str, object] = field(default_factory=dict)
    random: Callable[[int], bytes] = os.urandom


class Adapter(Protocol):
    """An envelope codec for one kind of network."""

    name: str  # the routing.yaml `adapter:` value
    method: str  # the Authentication-Results method it reports

    def option_problems(self, options: Mapping[str, object]) -> list[str]:
        """Sentences describing what is wrong with a network's adapter options (for `check`)."""
        ...

    def unwrap(self, raw: bytes, context: UnwrapContext) -> Unwrapped: ...

    def wrap(self, message: Unwrapped, context: WrapContext) -> Wrapped: ...
