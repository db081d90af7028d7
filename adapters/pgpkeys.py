"""OpenPGP keys, decryption, verification and verdicts, on pysequoia (RFC 4880, RFC 9580).

pysequoia is untyped; every call into it is made here, behind typed functions, so `Any`
stays in this module. What the gateway relies on:

- the network identity (a transferable secret key) decrypts: each encryption-capable secret
  (sub)key is tried in turn, so a wildcard key ID (RFC 9580 §5.1.1, "hidden recipient") finds
  the right one;
- a signature counts only if it verifies against a certificate from the directory, whose
  non-revoked user ID carries the From address, the certificate neither revoked nor expired
  at the pipeline's `now`. Keys that arrive with the message (Autocrypt headers, attachments,
  gossip) are never consulted: the verification store only answers from the directory;
- pysequoia 0.1.35 cannot verify GnuPG's default signed+encrypted output (compressed), see
  `adapters.pgppackets`: decryption and integrity come from pysequoia, the signatures are then
  verified by pysequoia over the decrypted packets in a second step. So a message is
  decrypted twice, by two implementations that must agree on the literal data: pysequoia
  (plaintext and integrity) and the packet reader (the packets the signatures cover, its own
  MDC check). pysequoia hands out neither its session key nor those packets, so neither
  decryption can stand in for the other. The issuers of the signatures come from their
  packets; only a message the packet reader cannot open (SEIPD v2, a cipher other than AES,
  a key other than RSA or Cv25519) costs pysequoia a second decryption, to learn whether it
  is signed at all;
- a message counts as encrypted only when its top-level packets are session-key packets and
  one integrity-protected container, nothing else (`adapters.pgppackets.encrypted_message`):
  pysequoia would also "decrypt" a plain literal, compressed or signed message, or return the
  plaintext of encrypted data with unencrypted packets appended;
- pysequoia 0.1.35 does not read the AEAD packet (tag 20) GnuPG writes with OCB: the session
  key and the chunked OCB decryption come from `adapters.pgppackets.open_aead`, and the
  signatures inside go through the same second step.

What is parsed once and kept: the directory's certificates, indexed by key handle, address
and fingerprint (`key_index`, in `Directory.memo`), and each network identity with its
decryptors and signer (`network_key`, by the key's octets).

Where pysequoia draws its own randomness and time: session keys and ECDH ephemerals in
`encrypt` come from Sequoia's RNG (the library offers no hook), and its policy checks
(signature and key validity) use the system clock; the gateway's own checks use `now`.

Untrusted input: messages and signatures from peers; certificates in the directory.
"""

from __future__ import annotations

import email.utils
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import pysequoia as _ps

from adapters.base import Directory, Identity, Verdict
from adapters.pgppackets import (
    TAG_AED,
    EncryptedMessage,
    InnerMessage,
    IntegrityFailure,
    NoIntegrity,
    NotEncrypted,
    PacketError,
    SecretKey,
    Unsupported,
    build_identity,
    dearmor,
    detached_signature,
    encrypted_message,
    open_aead,
    open_inner,
    read_secret_keys,
)
from gateway.errors import PermanentFailure, Reason

__all__ = [
    "MAX_ENCRYPTED_BLOCKS",
    "CertInfo",
    "Decryption",
    "KeyIndex",
    "NetworkKey",
    "SignatureCheck",
    "check_block_count",
    "decrypt",
    "encrypt",
    "encrypt_signed",
    "generate_identity",
    "key_index",
    "network_key",
    "sign_detached",
    "signature_verdict",
    "verify_detached",
    "verify_inline",
]

ps: Any = _ps  # pysequoia ships no usable types for mypy --strict: keep Any in this module
_MEMO_KEY = "openpgp.certs"


def generate_identity(
    user_id: str, *, created: datetime | None = None,
    random: Callable[[int], bytes] = os.urandom,
) -> bytes:
    """An armored transferable secret key for the gateway that GnuPG 2.2 peers can use.

    Ed25519 primary key (certify, sign) and Cv25519 encryption subkey, v4, Features = MDC
    only: never the SEIPD v2 flag Sequoia's own generator sets, which GnuPG 2.2 cannot handle.
    """
    binary = build_identity(user_id, created or datetime.now(UTC), random)
    return str(ps.armor(binary, ps.ArmorKind.SecretKey)).encode("ascii")


def _armor_message(binary: bytes) -> bytes:
    return str(ps.armor(binary, ps.ArmorKind.Message)).encode("ascii")


def _armor_signature(binary: bytes) -> bytes:
    return str(ps.armor(binary, ps.ArmorKind.Signature)).encode("ascii")


def _email(user_id: str) -> str | None:
    _, address = email.utils.parseaddr(user_id)
    return address.lower() if "@" in address else None


# -- the directory ----------------------------------------------------------------------------

@dataclass(frozen=True)
class CertInfo:
    cert: Any
    fingerprint: str  # primary key, upper-case hex
    key_handles: frozenset[str]  # lower-case fingerprints and key IDs of every (sub)key
    user_ids: tuple[str, ...]  # non-revoked user IDs
    emails: frozenset[str]
    revoked: bool
    expiration: datetime | None
    encryption_capable: bool
    created: datetime

    def expired(self, now: datetime) -> bool:
        return self.expiration is not None and self.expiration <= now


@dataclass(frozen=True)
class KeyIndex:
    """The directory's certificates in directory order, found by key handle, mail address or
    fingerprint through tables built once (a directory may hold thousands)."""

    certs: tuple[CertInfo, ...]
    problems: tuple[str, ...] = ()
    by_handle: dict[str, tuple[int, ...]] = field(default_factory=dict, init=False,
                                                  repr=False, compare=False)
    by_address: dict[str, tuple[int, ...]] = field(default_factory=dict, init=False,
                                                   repr=False, compare=False)
    by_fingerprint: dict[str, tuple[int, ...]] = field(default_factory=dict, init=False,
                                                       repr=False, compare=False)

    def __post_init__(self) -> None:
        for position, cert in enumerate(self.certs):
            for table, names in ((self.by_handle, cert.key_handles),
                                 (self.by_address, cert.emails),
                                 (self.by_fingerprint, (cert.fingerprint,))):
                for name in names:
                    table[name] = (*table.get(name, ()), position)

    def _found(self, table: dict[str, tuple[int, ...]], names: Sequence[str]) -> list[CertInfo]:
        positions = sorted({p for name in names for p in table.get(name, ())})
        return [self.certs[p] for p in positions]

    def lookup(self, handles: Sequence[str]) -> list[CertInfo]:
        return self._found(self.by_handle, [h.lower() for h in handles])

    def for_address(self, address: str) -> list[CertInfo]:
        return self._found(self.by_address, [address.lower()])

    def with_fingerprint(self, fingerprint: str) -> list[CertInfo]:
        return self._found(self.by_fingerprint, [fingerprint.upper()])


def _cert_info(cert: Any) -> CertInfo:
    handles: set[str] = set()
    encryption = False
    created = datetime.fromtimestamp(0, UTC)
    for position, item in enumerate(ps.packet.PacketPile.from_bytes(bytes(cert))):
        if position == 0 and item.key_created is not None:
            created = item.key_created
            if created.tzinfo is None:
                created = created.replace(tzinfo=UTC)
        fpr = item.fingerprint
        if fpr:
            handles.add(str(fpr).lower())
            handles.add(str(fpr).lower()[-16:])
        flags = item.key_flags
        if flags is not None and (flags.transport_encryption or flags.storage_encryption):
            encryption = True
    user_ids = tuple(str(u) for u in cert.user_ids)
    emails = frozenset(e for e in (_email(u) for u in user_ids) if e)
    expiration = cert.expiration
    if expiration is not None and expiration.tzinfo is None:
        expiration = expiration.replace(tzinfo=UTC)
    return CertInfo(
        cert=cert, fingerprint=str(cert.fingerprint).upper(), key_handles=frozenset(handles),
        user_ids=user_ids, emails=emails, revoked=bool(cert.is_revoked),
        expiration=expiration, encryption_capable=encryption, created=created,
    )


def key_index(directory: Directory) -> KeyIndex:
    """The directory's OpenPGP certificates, parsed once per Directory object."""
    cached = directory.memo.get(_MEMO_KEY)
    if isinstance(cached, KeyIndex):
        return cached
    certs: list[CertInfo] = []
    problems: list[str] = []
    for number, entry in enumerate(directory.openpgp):
        try:
            for cert in ps.Cert.split_bytes(entry):
                certs.append(_cert_info(cert))
        except Exception as error:  # one bad file must not hide the others
            problems.append(f"directory OpenPGP entry {number}: {error}")
    index = KeyIndex(tuple(certs), tuple(problems))
    directory.memo[_MEMO_KEY] = index
    return index


# -- the network identity ---------------------------------------------------------------------

@dataclass(frozen=True)
class NetworkKey:
    fingerprint: str
    secret_keys: tuple[SecretKey, ...]
    decryptors: tuple[tuple[str, Any], ...]  # (key fingerprint, pysequoia decryptor)
    signing: SecretKey | None
    signer: Any = None  # pysequoia signer of the whole key, for messages Sequoia signs
    memo: dict[str, object] = field(default_factory=dict, compare=False)


_IDENTITIES: dict[bytes, NetworkKey] = {}


def _flags(packets: list[Any]) -> tuple[bool, bool]:
    """(sign, encrypt) according to the self-signatures among `packets`."""
    sign = encrypt = False
    for item in packets:
        flags = item.key_flags
        if flags is not None:
            sign = sign or bool(flags.signing)
            encrypt = encrypt or bool(flags.transport_encryption or flags.storage_encryption)
    return sign, encrypt


def network_key(identity: Identity | None) -> NetworkKey:
    """The parsed secret key of a network identity (cached by its octets)."""
    if identity is None or not identity.openpgp_secret:
        raise PermanentFailure(
            "The gateway holds no OpenPGP key for this network",
            enhanced="5.7.5", reason=Reason.NO_DECRYPTION_KEY,
            detail="network identity has no openpgp_secret",
        )
    cached = _IDENTITIES.get(identity.openpgp_secret)
    if cached is not None:
        return cached
    try:
        tsk = ps.Tsk.from_bytes(identity.openpgp_secret)
        binary = bytes(tsk)
        secrets = {k.fingerprint: k for k in read_secret_keys(binary)}
        packets = list(ps.packet.PacketPile.from_bytes(binary))
    except (PacketError, Exception) as error:
        raise PermanentFailure(
            "The gateway's OpenPGP key for this network cannot be used",
            enhanced="5.7.5", reason=Reason.NO_DECRYPTION_KEY,
            detail=f"identity {identity.name}: {error}",
        ) from None
    # Group: primary key block, then one block per subkey (key packet + its signatures).
    groups: list[list[Any]] = [[]]
    for item in packets:
        if item.tag == ps.packet.Tag.SecretSubkey:
            groups.append([])
        groups[-1].append(item)
    head = groups[0]
    primary_fpr = str(head[0].fingerprint).upper()
    decryptors: list[tuple[str, Any]] = []
    signing: SecretKey | None = None
    primary_sign, primary_encrypt = _flags(head)
    if primary_sign:
        signing = secrets.get(primary_fpr)
    if primary_encrypt:
        decryptors.append((primary_fpr, tsk.decryptor()))
    for group in groups[1:]:
        fpr = str(group[0].fingerprint).upper()
        sign, encrypt = _flags(group[1:])
        if sign and signing is None:
            signing = secrets.get(fpr)
        if encrypt:
            try:
                decryptors.append((fpr, ps.Tsk.from_packets(head + group).decryptor()))
            except Exception:  # a subkey Sequoia's policy refuses is skipped, not fatal
                continue
    try:
        signer = tsk.signer()
    except Exception:  # no signing-capable key: `encrypt_signed` says so when asked
        signer = None
    loaded = NetworkKey(primary_fpr, tuple(secrets.values()), tuple(decryptors), signing,
                        signer)
    if len(_IDENTITIES) >= 32:  # reloads replace identities: keep the cache bounded
        _IDENTITIES.clear()
    _IDENTITIES[identity.openpgp_secret] = loaded
    return loaded


# -- signatures -------------------------------------------------------------------------------

@dataclass(frozen=True)
class SignatureCheck:
    """What pysequoia found about the signatures over some data."""

    issuers: tuple[str, ...]  # key handles the signatures name (asked of the store)
    valid: tuple[tuple[str, str], ...]  # (certificate fingerprint, signing key fingerprint)
    algorithm: str | None = None
    unreadable: bool = False  # a signature was there but could not be parsed

    @property
    def signed(self) -> bool:
        return bool(self.issuers or self.valid or self.unreadable)


class _Store:
    """The pysequoia certificate lookup: only the directory answers."""

    def __init__(self, index: KeyIndex) -> None:
        self.index = index
        self.asked: list[str] = []

    def __call__(self, handles: list[str]) -> list[Any]:
        self.asked.extend(str(h) for h in handles)
        return [c.cert for c in self.index.lookup([str(h) for h in handles])]


def _valid(result: Any) -> tuple[tuple[str, str], ...]:
    return tuple(
        (str(v.certificate).upper(), str(v.signing_key).upper()) for v in result.valid_sigs
    )


def _describe(sig: Any) -> tuple[str | None, str | None]:
    """(issuer a parsed signature names, its "key/digest" algorithm), None where unreadable."""
    try:
        issuer = sig.issuer_fingerprint or sig.issuer_key_id
    except Exception:
        issuer = None
    try:
        key = str(sig.key_algorithm).rsplit(".", 1)[-1]
        digest = str(sig.hash_algorithm).rsplit(".", 1)[-1]
        algorithm: str | None = f"{key}/{digest}"
    except Exception:
        algorithm = None
    return (str(issuer) if issuer else None), algorithm


def _named(signature_packets: Sequence[bytes]) -> tuple[tuple[str, ...], str | None]:
    """(issuers named, algorithm of the first readable one) of binary signature packets."""
    issuers: list[str] = []
    algorithm: str | None = None
    for raw in signature_packets:
        try:
            issuer, described = _describe(ps.Sig.from_bytes(raw))
        except Exception:
            continue
        if issuer:
            issuers.append(issuer)
        algorithm = algorithm or described
    return tuple(issuers), algorithm


def verify_detached(data: bytes, signature: bytes, index: KeyIndex) -> SignatureCheck:
    """Check a detached signature (armored or binary) over exactly `data`."""
    try:
        sig = ps.Sig.from_bytes(signature)
    except Exception:
        return SignatureCheck((), (), unreadable=True)
    issuer, algorithm = _describe(sig)
    store = _Store(index)
    try:
        result = ps.verify(bytes=data, signature=sig, store=store)
        valid = _valid(result)
    except Exception:
        valid = ()
    issuers = tuple(store.asked) or ((issuer,) if issuer else ())
    return SignatureCheck(issuers, valid, algorithm)


def verify_inline(message: bytes, index: KeyIndex) -> tuple[bytes | None, SignatureCheck]:
    """(signed content, check) of an inline-signed message (armored or binary: binary spares
    pysequoia's slower armor reader) or a cleartext-signed one.

    The content is None when pysequoia found no valid signature: it then never hands the
    data out, and the caller keeps the message as it arrived.
    """
    store = _Store(index)
    try:
        result = ps.verify(bytes=message, store=store)
    except Exception:
        return None, SignatureCheck(tuple(store.asked), (), unreadable=not store.asked)
    content = result.bytes
    return (bytes(content) if content is not None else None), SignatureCheck(
        tuple(store.asked), _valid(result)
    )


def signature_verdict(
    check: SignatureCheck, index: KeyIndex, from_address: str | None, now: datetime,
    method: str,
) -> Verdict:
    """The gateway's verdict about one signed layer."""
    if not check.signed:
        return Verdict.unsigned(method)
    algorithm = check.algorithm

    def fail(phrase: str, reason: Reason, cert: CertInfo | None) -> Verdict:
        return Verdict(
            method, "fail", phrase, failure=reason,
            signer=(from_address if cert and from_address in cert.emails
                    else (min(cert.emails) if cert and cert.emails else None)),
            signer_subject=cert.user_ids[0] if cert and cert.user_ids else None,
            fingerprints=(cert.fingerprint,) if cert else (),
            algorithm=algorithm,
        )

    if check.unreadable and not check.valid:
        return fail("damaged signature", Reason.SIGNATURE_INVALID, None)
    first_problem: Verdict | None = None
    for cert_fpr, _key in check.valid:
        found = index.with_fingerprint(cert_fpr)
        if not found:
            continue
        cert = found[0]
        if cert.revoked:
            problem = fail("signer key revoked", Reason.REVOKED, cert)
        elif cert.expired(now):
            problem = fail("signer key expired", Reason.EXPIRED, cert)
        elif from_address is None or from_address not in cert.emails:
            problem = fail("signer does not match From", Reason.SIGNER_MISMATCH, cert)
        else:
            uid = next((u for u in cert.user_ids if _email(u) == from_address), None)
            return Verdict(
                method, "pass", "signature verified", signer=from_address,
                signer_subject=uid, fingerprints=(cert.fingerprint,), algorithm=algorithm,
            )
        first_problem = first_problem or problem
    if first_problem is not None:
        return first_problem
    known = index.lookup(check.issuers)
    if not known:
        return fail("signer key unknown", Reason.UNTRUSTED_SIGNER, None)
    cert = known[0]
    if cert.revoked:
        return fail("signer key revoked", Reason.REVOKED, cert)
    if cert.expired(now):
        return fail("signer key expired", Reason.EXPIRED, cert)
    return fail("bad signature", Reason.SIGNATURE_INVALID, cert)


# -- decryption -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Decryption:
    plaintext: bytes  # the literal data, decrypted and integrity-checked by pysequoia
    key: str  # fingerprint of the (sub)key that decrypted
    check: SignatureCheck  # signatures inside the encryption
    inner: InnerMessage | None


def _failure(phrase: str, reason: Reason, enhanced: str, detail: str) -> PermanentFailure:
    return PermanentFailure(phrase, enhanced=enhanced, reason=reason, detail=detail)


# Each encrypted block of a message (an Apicrypt text block or `.apz` attachment, a PGP/MIME
# layer) costs private-key operations: a message is refused, before any is tried, when it
# holds more than a letter with a generous bundle of attachments ever does.
MAX_ENCRYPTED_BLOCKS = 256


def check_block_count(count: int) -> None:
    """Refuse (5.6.0) a message that holds more than `MAX_ENCRYPTED_BLOCKS` encrypted blocks."""
    if count > MAX_ENCRYPTED_BLOCKS:
        raise _failure(
            f"The message holds {count} encrypted parts and the gateway decrypts at most "
            f"{MAX_ENCRYPTED_BLOCKS} in one message; send the attachments in several messages",
            Reason.MALFORMED, "5.6.0",
            f"openpgp: {count} encrypted blocks, more than {MAX_ENCRYPTED_BLOCKS}",
        )


def _structure(message: bytes) -> EncryptedMessage:
    """The encrypted message in `message` (armored or binary), or the failure to report."""
    try:
        return encrypted_message(dearmor(message))
    except NoIntegrity as error:  # SED: no integrity protection at all (EFAIL, RFC 9580 §5.7)
        raise _failure(
            "The message is encrypted without integrity protection; ask the sender to use a "
            "current OpenPGP program", Reason.DECRYPTION_FAILED, "5.7.7", f"openpgp: {error}",
        ) from None
    except NotEncrypted as error:
        raise _failure(
            "The message is presented as encrypted but its OpenPGP data is not, or not all of "
            "it, encrypted to the gateway; the sender must encrypt the whole message to the "
            "gateway's key and send it again", Reason.ENCRYPTION_MISSING, "5.7.1",
            f"openpgp: not an encrypted message: {error}",
        ) from None
    except PacketError as error:
        raise _failure(
            "The encrypted part of the message is damaged", Reason.DECRYPTION_FAILED,
            "5.7.5", f"openpgp: unreadable message: {error}",
        ) from None


def _integrity_failure(detail: str) -> PermanentFailure:
    return _failure(
        "The encrypted message was altered in transit (integrity check failed)",
        Reason.DECRYPTION_FAILED, "5.7.7", f"openpgp: {detail}",
    )


def _signatures(inner: InnerMessage, index: KeyIndex) -> SignatureCheck:
    """Second step: the signatures inside the decrypted packets, verified by pysequoia over
    exactly those packets. The issuers the packets name stand in for the ones pysequoia asks
    about when it stops before asking (a signature it cannot use)."""
    if not inner.signatures:
        return SignatureCheck((), ())
    store = _Store(index)
    try:
        valid = _valid(ps.verify(bytes=inner.signed_message, store=store))
    except Exception:
        valid = ()
    named, algorithm = _named([p.raw for p in inner.signatures])
    issuers = tuple(store.asked) or named
    return SignatureCheck(issuers, valid, algorithm, unreadable=not issuers and not valid)


def _decrypt_aead(structure: EncryptedMessage, key: NetworkKey, index: KeyIndex) -> Decryption:
    try:
        opened = open_aead(structure, list(key.secret_keys))
        plaintext = opened[0].literal if opened is not None else None
    except IntegrityFailure as error:
        raise _integrity_failure(str(error)) from None
    except Unsupported as error:
        raise _failure(
            "The message uses an encryption algorithm the gateway does not support; ask the "
            "sender to encrypt with AES and OCB, or without AEAD", Reason.UNSUPPORTED_ALGORITHM,
            "5.7.6", f"openpgp: {error}",
        ) from None
    except PacketError as error:
        raise _failure(
            "The encrypted part of the message is damaged", Reason.DECRYPTION_FAILED,
            "5.7.5", f"openpgp: decrypted AEAD data unreadable: {error}",
        ) from None
    if opened is None or plaintext is None:
        raise _failure(
            "The message could not be decrypted with the gateway's key for this network",
            Reason.DECRYPTION_FAILED, "5.7.5", "openpgp: no session key for the AEAD packet",
        )
    inner, used = opened
    return Decryption(plaintext, used, _signatures(inner, index), inner)


def decrypt(message: bytes, key: NetworkKey, index: KeyIndex) -> Decryption:
    """Decrypt an OpenPGP message and check the signatures inside it.

    Raises PermanentFailure: 5.7.1 when the message is not (only) an encrypted message,
    5.7.5 when the gateway's key is not a recipient or decryption fails, 5.7.6 for an
    unsupported algorithm, 5.7.7 when the message has no integrity protection or fails its
    integrity check. No plaintext leaves this function in any of these cases.
    """
    structure = _structure(message)
    recipients = {p.body[1:9] for p in structure.pkesks if len(p.body) > 9}
    ours = {bytes.fromhex(k.fingerprint)[-8:] for k in key.secret_keys}
    if not recipients or (not (recipients & ours) and bytes(8) not in recipients):
        raise _failure(
            "The message is not encrypted to the gateway's key for this network; ask the "
            "sender to encrypt to the gateway's published key", Reason.NO_DECRYPTION_KEY,
            "5.7.5", "openpgp: no PKESK for the network identity",
        )
    if structure.container.tag == TAG_AED:
        return _decrypt_aead(structure, key, index)
    binary = structure.binary
    plaintext: bytes | None = None
    used = ""
    errors: list[str] = []
    for fingerprint, decryptor in key.decryptors:
        try:
            result = ps.decrypt(binary, decryptor)
        except Exception as error:
            errors.append(str(error).splitlines()[0] if str(error) else type(error).__name__)
            continue
        plaintext, used = bytes(result.bytes or b""), fingerprint
        break
    if plaintext is None:
        text = "; ".join(errors).lower()
        # A flipped ciphertext byte surfaces as an MDC mismatch or, inside compressed data,
        # as a broken deflate stream before the MDC is reached: both are integrity failures.
        integrity = any(w in text for w in ("manipulat", "mdc", "inflate", "deflate",
                                             "checksum", "decompress", "authentication"))
        if integrity and "no key to decrypt" not in text:
            raise _integrity_failure("; ".join(errors))
        raise _failure(
            "The message could not be decrypted with the gateway's key for this network",
            Reason.DECRYPTION_FAILED, "5.7.5", f"openpgp: {'; '.join(errors)}",
        )
    try:
        inner = open_inner(structure, list(key.secret_keys))
        literal = inner.literal if inner is not None else None
    except PacketError as error:
        # This code opened the container (session key and MDC verified) and found something
        # other than one literal message: refuse rather than pick a part.
        raise _failure(
            "The encrypted part of the message is damaged", Reason.DECRYPTION_FAILED,
            "5.7.5", f"openpgp: decrypted data unreadable: {error}",
        ) from None
    if inner is not None and literal != plaintext:
        # Two decryptions of one message disagree: believe neither about signatures.
        raise _failure(
            "The encrypted part of the message is damaged", Reason.DECRYPTION_FAILED,
            "5.7.5", "openpgp: pysequoia and the packet reader decrypted different data",
        )
    if inner is not None:
        return Decryption(plaintext, used, _signatures(inner, index), inner)
    # A format only pysequoia opens: its packets stay out of reach. A store that only records
    # the issuers tells whether any signature is there at all, whatever the layering; none
    # is let through as verified.
    recorder = _Store(KeyIndex(()))
    try:
        ps.decrypt(binary, dict(key.decryptors)[used], store=recorder)
    except Exception:
        pass  # expected: with no certificates no signature is valid
    return Decryption(plaintext, used, SignatureCheck(tuple(recorder.asked), ()), None)


# -- wrapping ---------------------------------------------------------------------------------

def sign_detached(key: NetworkKey, data: bytes, now: datetime) -> bytes:
    """An armored SHA-256 detached signature over `data` by the network identity."""
    if key.signing is None:
        raise PermanentFailure(
            "The gateway's OpenPGP key for this network cannot sign", enhanced="5.7.5",
            reason=Reason.WRAP_FAILED, detail="identity has no signing-capable secret key",
        )
    return _armor_signature(detached_signature(key.signing, data, now))


def encrypt(data: bytes, certs: Sequence[CertInfo]) -> bytes:
    """An armored OpenPGP message of `data` for every certificate (session key by Sequoia)."""
    result = ps.encrypt(data, [c.cert for c in certs], armor=True)
    return result if isinstance(result, bytes) else str(result).encode("ascii")


def encrypt_signed(
    data: bytes, key: NetworkKey, certs: Sequence[CertInfo], *, armor: bool
) -> bytes:
    """An OpenPGP message of `data` signed by the network identity and encrypted to every
    certificate, in one pass by Sequoia (armored, or binary for an attachment)."""
    if key.signer is None:
        raise PermanentFailure(
            "The gateway's OpenPGP key for this network cannot sign", enhanced="5.7.5",
            reason=Reason.WRAP_FAILED, detail="identity has no signing-capable secret key",
        )
    result = ps.encrypt(data, [c.cert for c in certs], signer=key.signer, armor=armor)
    return result if isinstance(result, bytes) else str(result).encode("ascii")
