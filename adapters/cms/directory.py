"""The directory's X.509 certificates, indexed once per loaded configuration.

A message names its signer by issuer and serial number or by subject key identifier
(RFC 5652 §5.3), and each recipient of an outgoing message is looked up by mail address
(rfc822Name or emailAddress, RFC 8550 §3). Scanning every directory certificate for each of
these costs as much as the directory is large, per message; the indexes here are built the
first time they are needed and kept in `Directory.memo`, which lives as long as the Directory
(a reload builds a new one). Every index keeps the directory's order, so "the first
certificate that matches" means what it meant for a scan.

Untrusted input: none parsed here beyond the directory's own certificates (the operator's
files, which may hold what correspondents sent).
"""

from __future__ import annotations

from cryptography import x509

from adapters.base import Directory, certificate_addresses
from adapters.cms.identifiers import subject_key_identifier

__all__ = ["DirectoryIndex", "directory_index"]

_MEMO_KEY = "smime.directory"


class DirectoryIndex:
    """Look-ups over a tuple of certificates, each index built on first use."""

    def __init__(self, certificates: tuple[x509.Certificate, ...]) -> None:
        self.certificates = certificates
        self._by_serial: dict[int, tuple[x509.Certificate, ...]] | None = None
        self._by_key_identifier: dict[bytes, x509.Certificate] | None = None
        self._by_address: dict[str, tuple[x509.Certificate, ...]] | None = None

    def with_serial(self, serial: int) -> tuple[x509.Certificate, ...]:
        if self._by_serial is None:
            found: dict[int, list[x509.Certificate]] = {}
            for certificate in self.certificates:
                found.setdefault(certificate.serial_number, []).append(certificate)
            self._by_serial = {key: tuple(value) for key, value in found.items()}
        return self._by_serial.get(serial, ())

    def with_key_identifier(self, wanted: bytes) -> x509.Certificate | None:
        """The first certificate whose SubjectKeyIdentifier is `wanted`."""
        if self._by_key_identifier is None:
            index: dict[bytes, x509.Certificate] = {}
            for certificate in self.certificates:
                identifier = subject_key_identifier(certificate)
                if identifier is not None:
                    index.setdefault(identifier, certificate)
            self._by_key_identifier = index
        return self._by_key_identifier.get(wanted)

    def for_address(self, address: str) -> tuple[x509.Certificate, ...]:
        """`Directory.x509_for`: the certificates issued to `address`, in directory order."""
        if self._by_address is None:
            found: dict[str, list[x509.Certificate]] = {}
            for certificate in self.certificates:
                for named in certificate_addresses(certificate):
                    found.setdefault(named, []).append(certificate)
            self._by_address = {key: tuple(value) for key, value in found.items()}
        return self._by_address.get(address.lower(), ())


def directory_index(directory: Directory) -> DirectoryIndex:
    """The index of `directory`'s X.509 certificates, made once per Directory object."""
    index = directory.memo.get(_MEMO_KEY)
    if isinstance(index, DirectoryIndex) and index.certificates is directory.x509:
        return index
    index = DirectoryIndex(directory.x509)
    directory.memo[_MEMO_KEY] = index
    return index
