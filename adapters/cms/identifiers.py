"""How CMS names a certificate, read once per certificate, and how two names are compared.

Followed: RFC 5652 §10.2.4 (IssuerAndSerialNumber: the issuer Name and serial number of the
certificate), §5.3 / §6.2 (a signer or recipient named by issuer and serial number or by
subject key identifier), RFC 5280 §4.2.1.2 (SubjectKeyIdentifier) and §7.1 (names compared
after RFC 4518 string preparation).

A name in a received SignerIdentifier or RecipientIdentifier is compared with a certificate's
issuer by its DER octets first: equal octets are the same name under any rule, and that is
what every mainstream client sends (it copies the certificate's own encoding). Only when the
octets differ is the RFC 5280 comparison run, with RFC 4518 preparation of every value, which
costs a Python loop per character: once per distinct name, not per comparison.

What is read from a certificate depends on nothing but its octets, so it is kept in bounded
caches keyed by the certificate itself (cryptography hashes and compares certificates by
their DER): the same certificate met again, in the directory, the identity or a message,
costs a dictionary look-up.

Untrusted input: the certificates a message carries and the names in its identifiers.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from asn1crypto import x509 as asn1_x509
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from adapters.cms.der import integer, joined, sequence

__all__ = [
    "CertificateIds",
    "comparison_form",
    "ids",
    "same_name",
    "subject_key_identifier",
]

# Enough for a large directory and the identities; older entries are read again if needed.
_CACHED = 4096


@dataclass(frozen=True)
class CertificateIds:
    der: bytes
    issuer: bytes  # the issuer Name's DER exactly as in the certificate
    serial: int
    issuer_and_serial: bytes  # RFC 5652 §10.2.4 IssuerAndSerialNumber, DER


@functools.lru_cache(maxsize=_CACHED)
def ids(certificate: x509.Certificate) -> CertificateIds:
    der = certificate.public_bytes(Encoding.DER)
    issuer = bytes(asn1_x509.Certificate.load(der)["tbs_certificate"]["issuer"].dump())
    serial = certificate.serial_number
    return CertificateIds(der, issuer, serial, joined(sequence([issuer], integer(serial))))


@functools.lru_cache(maxsize=_CACHED)
def subject_key_identifier(certificate: x509.Certificate) -> bytes | None:
    try:
        return certificate.extensions.get_extension_for_class(
            x509.SubjectKeyIdentifier
        ).value.digest
    except x509.ExtensionNotFound:
        return None


@functools.lru_cache(maxsize=_CACHED)
def comparison_form(name_der: bytes) -> str:
    """asn1crypto's RFC 5280 §7.1 comparison string of a DER Name (`Name.hashable`)."""
    return str(asn1_x509.Name.load(name_der).hashable)


def same_name(received: asn1_x509.Name, certificate_name: bytes) -> bool:
    """Whether a received Name is the certificate's (its DER) under RFC 5280 §7.1 (asn1crypto's
    `Name.__eq__`): equal octets answer at once, other encodings are prepared and compared."""
    if bytes(received.dump()) == certificate_name:
        return True
    return bool(received == asn1_x509.Name.load(certificate_name))
