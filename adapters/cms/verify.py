"""CMS SignedData signature verification (cryptography offers none, so it is written here).

Followed: RFC 5652 §5 (SignedData, SignerInfo; §5.4 the signature covers the DER of the
signed attributes re-tagged as SET OF; §11.1/§11.2 exactly one content-type and one
message-digest attribute, content-type equal to eContentType), RFC 5754 (SHA-2 in CMS),
RFC 4056 (RSASSA-PSS in CMS), RFC 5753 §7.1.3 / RFC 5758 (ECDSA), RFC 8419 (Ed25519),
RFC 8551 §2.1 (SHA-1 and MD5 are not accepted for new signatures: refused by policy).

This module answers only "does this signature verify over these octets, and by which
certificate"; whether the certificate is trusted is `trust.py`'s question.

Untrusted input: the SignedData structure, the certificates it carries, the signed octets.
The work is linear in their size: the content is hashed once per digest algorithm, each
SignerInfo's certificate is found through an index (the directory's is built once per loaded
configuration, see directory.py), names are compared by their octets before any RFC 5280
preparation (identifiers.py), and at most `MAX_SIGNERS` SignerInfos are verified.
"""

from __future__ import annotations

import datetime as dt
import hmac
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa

from adapters.cms.directory import DirectoryIndex
from adapters.cms.identifiers import comparison_form, ids, subject_key_identifier
from adapters.cms.parse import certificate_der, octets, set_der
from gateway.errors import Reason

__all__ = ["MAX_SIGNERS", "SignatureCheck", "SignedContent", "read_signed_data"]

_DIGESTS: dict[str, type[hashes.HashAlgorithm]] = {
    "sha1": hashes.SHA1,
    "sha224": hashes.SHA224,
    "sha256": hashes.SHA256,
    "sha384": hashes.SHA384,
    "sha512": hashes.SHA512,
}
_WEAK = {"sha1", "md5", "md2"}
# Each SignerInfo costs a public-key operation with a key the sender chose; real mail has one
# or two. More is refused as malformed rather than verified one by one.
MAX_SIGNERS = 16


@dataclass(frozen=True)
class SignatureCheck:
    """The outcome for one SignerInfo."""

    valid: bool
    reason: Reason | None  # when not valid
    phrase: str  # "signature verified", "message-digest mismatch"...
    certificate: x509.Certificate | None
    digest: str  # "sha256"
    algorithm: str  # "sha256WithRSAEncryption", "ecdsa-with-SHA256", "RSASSA-PSS/sha256"
    signing_time: dt.datetime | None


@dataclass(frozen=True)
class SignedContent:
    content: bytes  # the octets that were signed (eContent, or the detached octets)
    content_type: str  # eContentType, e.g. "data"
    certificates: tuple[x509.Certificate, ...]  # as carried in the SignedData
    signers: tuple[SignatureCheck, ...]


def _fail(reason: Reason, phrase: str, **known: Any) -> SignatureCheck:
    values: dict[str, Any] = {
        "certificate": None, "digest": "", "algorithm": "", "signing_time": None,
    }
    values.update(known)
    return SignatureCheck(valid=False, reason=reason, phrase=phrase, **values)


class _Signers:
    """The candidate signer certificates: those the message carries, then the directory's.

    Finding the certificate of each SignerInfo costs the same however many SignerInfos and
    certificates a message carries, rather than their product: the carried certificates are
    indexed once per message, each certificate's issuer is read at most once, each distinct
    name is prepared for comparison at most once, and the directory is indexed once per
    loaded configuration. The first match in that order wins, as carried certificates come
    before the directory's.
    """

    def __init__(self, carried: Sequence[x509.Certificate], directory: DirectoryIndex) -> None:
        self._carried = carried
        self._directory = directory
        self._carried_by_serial: dict[int, list[x509.Certificate]] | None = None
        self._carried_by_ski: dict[bytes, x509.Certificate] | None = None
        self._with_serial: dict[int, list[tuple[x509.Certificate, bytes]]] = {}
        self._forms: dict[bytes, str] = {}

    def _form(self, name_der: bytes) -> str:
        if name_der not in self._forms:
            self._forms[name_der] = comparison_form(name_der)
        return self._forms[name_der]

    def by_issuer_and_serial(self, issuer: Any, serial: int) -> x509.Certificate | None:
        if self._carried_by_serial is None:
            self._carried_by_serial = {}
            for certificate in self._carried:
                self._carried_by_serial.setdefault(certificate.serial_number, []).append(
                    certificate
                )
        if serial not in self._with_serial:
            candidates = [*self._carried_by_serial.get(serial, ()),
                          *self._directory.with_serial(serial)]
            self._with_serial[serial] = [(c, ids(c).issuer) for c in candidates]
        wanted = bytes(issuer.dump())
        wanted_form: str | None = None
        for certificate, theirs in self._with_serial[serial]:
            if theirs == wanted:  # the same octets: the same name under any rule
                return certificate
            # Another encoding may still be the same name: asn1crypto's `hashable` is the
            # RFC 5280 §7.1 comparison form of a name.
            if wanted_form is None:
                wanted_form = str(issuer.hashable)
            if self._form(theirs) == wanted_form:
                return certificate
        return None

    def by_subject_key_identifier(self, wanted: bytes) -> x509.Certificate | None:
        if self._carried_by_ski is None:
            self._carried_by_ski = {}
            for certificate in self._carried:
                identifier = subject_key_identifier(certificate)
                if identifier is not None:
                    self._carried_by_ski.setdefault(identifier, certificate)
        found = self._carried_by_ski.get(wanted)
        return found if found is not None else self._directory.with_key_identifier(wanted)


def _find_signer(sid: Any, candidates: _Signers) -> x509.Certificate | None:
    """RFC 5652 §5.3 SignerIdentifier: issuer and serial number, or subject key identifier."""
    if sid.name == "issuer_and_serial_number":
        return candidates.by_issuer_and_serial(
            sid.chosen["issuer"], sid.chosen["serial_number"].native
        )
    return candidates.by_subject_key_identifier(bytes(sid.chosen.native))


_READ_ATTRIBUTES = frozenset({"message_digest", "content_type", "signing_time"})


class _Attributes:
    """The signed attributes by type, read in one pass; values are decoded only for the
    types asked for, when asked (no other attribute's values are read, see parse.py)."""

    def __init__(self, attributes: Any) -> None:
        self._by_type: dict[str, list[Any]] = {}
        for attribute in attributes:
            name = attribute["type"].native
            if name in _READ_ATTRIBUTES:
                self._by_type.setdefault(name, []).append(attribute)

    def values(self, name: str) -> list[Any]:
        """Per attribute of type `name`, the list of its values."""
        return [[value.native for value in attribute["values"]]
                for attribute in self._by_type.get(name, ())]


def _signature_ok(
    public_key: Any, algorithm: Any, digest_name: str, signature: bytes, data: bytes
) -> tuple[bool, str]:
    """(verified, algorithm name) for the signature over `data` (hashed here)."""
    signature_name = algorithm["algorithm"].native
    if signature_name == "rsassa_pss":
        params = algorithm["parameters"]
        hash_name = params["hash_algorithm"]["algorithm"].native
        mgf = params["mask_gen_algorithm"]
        if mgf["algorithm"].native != "mgf1":
            raise _Unsupported(f"PSS mask generation {mgf['algorithm'].native}")
        mgf_hash = mgf["parameters"]["algorithm"].native
        if hash_name not in _DIGESTS or mgf_hash not in _DIGESTS:
            raise _Unsupported(f"PSS hash {hash_name}/{mgf_hash}")
        if params["trailer_field"].native not in ("trailer_field_bc", 1):
            raise _Unsupported("PSS trailer field")
        if not isinstance(public_key, rsa.RSAPublicKey):
            return False, "RSASSA-PSS"
        pss = padding.PSS(mgf=padding.MGF1(_DIGESTS[mgf_hash]()),
                          salt_length=params["salt_length"].native)
        try:
            public_key.verify(signature, data, pss, _DIGESTS[hash_name]())
            return True, f"RSASSA-PSS/{hash_name}"
        except InvalidSignature:
            return False, f"RSASSA-PSS/{hash_name}"
    if signature_name == "ed25519":
        if not isinstance(public_key, ed25519.Ed25519PublicKey):
            return False, "Ed25519"
        try:
            public_key.verify(signature, data)
            return True, "Ed25519"
        except InvalidSignature:
            return False, "Ed25519"
    kind = algorithm.signature_algo  # "rsassa_pkcs1v15", "ecdsa", ...
    try:
        hash_name = algorithm.hash_algo  # e.g. sha256_rsa names its own hash
    except ValueError:
        hash_name = digest_name  # plain rsaEncryption / ecdsa: the SignerInfo's digest
    if hash_name not in _DIGESTS:
        raise _Unsupported(f"signature hash {hash_name}")
    chosen = _DIGESTS[hash_name]()
    if kind == "rsassa_pkcs1v15":
        label = f"{hash_name}WithRSAEncryption"
        if not isinstance(public_key, rsa.RSAPublicKey):
            return False, label
        try:
            public_key.verify(signature, data, padding.PKCS1v15(), chosen)
            return True, label
        except InvalidSignature:
            return False, label
    if kind == "ecdsa":
        label = f"ecdsa-with-{hash_name.upper()}"
        if not isinstance(public_key, ec.EllipticCurvePublicKey):
            return False, label
        try:
            public_key.verify(signature, data, ec.ECDSA(chosen))
            return True, label
        except InvalidSignature:
            return False, label
    raise _Unsupported(f"signature algorithm {signature_name}")


class _Unsupported(Exception):
    pass


class _Digests:
    """The content's digest per algorithm, computed once however many SignerInfos ask."""

    def __init__(self, content: bytes) -> None:
        self.content = content
        self._done: dict[str, bytes] = {}

    def of(self, name: str) -> bytes:
        if name not in self._done:
            digest = hashes.Hash(_DIGESTS[name]())
            digest.update(self.content)
            self._done[name] = digest.finalize()
        return self._done[name]


def _check_signer(
    signer_info: Any, content: _Digests, content_type: str, candidates: _Signers
) -> SignatureCheck:
    digest_name = signer_info["digest_algorithm"]["algorithm"].native
    certificate = _find_signer(signer_info["sid"], candidates)
    if certificate is None:
        return _fail(Reason.UNTRUSTED_SIGNER, "signer certificate not found", digest=digest_name)
    known: dict[str, Any] = {"certificate": certificate, "digest": digest_name}
    if digest_name not in _DIGESTS:
        reason = Reason.WEAK_ALGORITHM if digest_name in _WEAK else Reason.UNSUPPORTED_ALGORITHM
        return _fail(reason, f"digest {digest_name} not accepted", **known)
    computed = content.of(digest_name)
    signature = bytes(signer_info["signature"].native)
    attributes = signer_info["signed_attrs"]
    signing_time: dt.datetime | None = None
    if attributes.contents:
        read = _Attributes(attributes)
        digests = read.values("message_digest")
        types = read.values("content_type")
        if len(digests) != 1 or len(digests[0]) != 1 or len(types) != 1 or len(types[0]) != 1:
            return _fail(Reason.SIGNATURE_INVALID, "signed attributes incomplete", **known)
        if types[0][0] != content_type:
            return _fail(Reason.SIGNATURE_INVALID, "content-type attribute mismatch", **known)
        times = read.values("signing_time")
        if len(times) > 1 or (times and len(times[0]) != 1):
            return _fail(Reason.SIGNATURE_INVALID, "several signing times", **known)
        if times and isinstance(times[0][0], dt.datetime):
            signing_time = times[0][0]
        known["signing_time"] = signing_time
        signed = set_der(attributes)
        digest_matches = hmac.compare_digest(bytes(digests[0][0]), computed)
    else:
        signed = content.content
        digest_matches = True
    try:
        verified, label = _signature_ok(
            certificate.public_key(), signer_info["signature_algorithm"], digest_name,
            signature, signed,
        )
    except _Unsupported as error:
        return _fail(Reason.UNSUPPORTED_ALGORITHM, f"{error} not supported", **known)
    known["algorithm"] = label
    if not verified:
        return _fail(Reason.SIGNATURE_INVALID, "signature does not verify", **known)
    if not digest_matches:
        # The signed attributes are authentic but describe other content: the content
        # was altered after signing (or the wrong part was presented as the signed one).
        return _fail(Reason.SIGNATURE_INVALID, "message-digest mismatch", **known)
    if digest_name in _WEAK:
        shown = {"sha1": "SHA-1"}.get(digest_name, digest_name.upper())
        return _fail(Reason.WEAK_ALGORITHM, f"weak digest {shown}", **known)
    return SignatureCheck(valid=True, reason=None, phrase="signature verified", **known)


def read_signed_data(
    signed_data: Any, detached: bytes | None, directory: DirectoryIndex | None = None,
) -> SignedContent:
    """Verify every SignerInfo over the eContent, or over `detached` when given; signers are
    looked for among the carried certificates, then the `directory`'s.

    With `detached` (multipart/signed), an eContent the SignedData may also carry is
    ignored: what the reader sees is the first MIME part, so that is what must verify.
    """
    encapsulated = signed_data["encap_content_info"]
    content_type = encapsulated["content_type"].native
    if detached is not None:
        content = detached
    else:
        if encapsulated["content"].native is None:
            raise ValueError("opaque signed-data without content")
        content = octets(encapsulated["content"])
    carried: list[x509.Certificate] = []
    for choice in signed_data["certificates"] or ():
        certificate = certificate_der(choice)
        if certificate is not None:
            carried.append(certificate)
    signer_infos = signed_data["signer_infos"]
    if len(signer_infos) > MAX_SIGNERS:
        raise ValueError(f"SignedData with {len(signer_infos)} SignerInfos")
    candidates = _Signers(carried, directory or DirectoryIndex(()))
    digests = _Digests(content)
    checks = tuple(
        _check_signer(signer_info, digests, content_type, candidates)
        for signer_info in signer_infos
    )
    if not checks:
        raise ValueError("SignedData without SignerInfo")
    return SignedContent(
        content=content, content_type=content_type, certificates=tuple(carried), signers=checks
    )
