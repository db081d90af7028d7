"""OpenPGP packets at the octet level: framing, v4 keys, v4 signatures (RFC 4880, RFC 9580).

pysequoia covers most of the gateway's OpenPGP work, but three things it cannot do are needed:

- keys that GnuPG 2.2 can use. Sequoia's generated keys advertise SEIPD v2 in their Features
  subpacket (RFC 9580 §5.2.3.32); a GnuPG 2.2 peer then receives, or holds, something it cannot
  read. `build_identity` writes a v4 Ed25519 [certify, sign] primary key with a Cv25519
  [encrypt] subkey, Features = MDC only, the layout `gpg --quick-gen-key` writes.
- signatures with the hash PGP/MIME announces (`micalg=pgp-sha256`, RFC 3156 §5): Sequoia picks
  SHA-512. `detached_signature` makes a v4 binary-document signature with SHA-256.
- the signature packets inside a compressed, signed and encrypted message. pysequoia 0.1.35
  decrypts such a message (GnuPG's default output) but its verifier rejects the layer order
  Encryption > Compression > Signatures ("Unexpected message structure"). `open_inner` recovers
  the decrypted packet sequence (session key, SEIPD v1, decompression) so that the signatures
  can be verified by pysequoia in a second step. It never decides alone: the caller uses it
  only after pysequoia has decrypted the same message and checked its integrity, and compares
  the literal data both produced.
- the AEAD encrypted data packet (tag 20, version 1) that GnuPG writes with OCB (LibrePGP,
  draft-koch-librepgp §5.16; RFC 4880bis-10 §5.16), which pysequoia 0.1.35 does not read.
  `open_aead` decrypts it chunk by chunk and returns nothing until every chunk's tag and the
  final tag over the total length have verified. EAX (AEAD algorithm 1) has no primitive in
  `cryptography` and is refused as unsupported.

What counts as an encrypted message is decided here, on the top-level packets, before any
decryption: `encrypted_message` accepts only session-key packets (PKESK, SKESK), then exactly
one integrity-protected container (SEIPD, tag 18, or AEAD, tag 20), and nothing after it but
padding packets (RFC 9580 §10.3; marker and padding packets may also stand before the
container, and RFC 9580 §5.14 lets padding stand anywhere in a message). A literal,
compressed or signed message, or encrypted data with anything else appended, is not an
encrypted message (EFAIL-style mixing). Padding carries no data and is dropped.

Key material and signatures use `cryptography` (Ed25519, X25519, RSA, AES key wrap, AES-CFB,
AES-OCB3). Armor (RFC 9580 §6) is read by `dearmor` with bytes methods that run in C over the
whole text (a line with blanks in it is read one line at a time); `message_packets` reads it
once for both the choice between decryption and verification and the step chosen.
Key generation draws randomness from the `random` callable it is given and reads no clock.

Untrusted input: every packet handed to `dearmor`, `split_packets`, `encrypted_message`,
`open_inner`, `open_aead` and `read_secret_keys` (messages from peers; secret keys from the
operator's key files). Every loop over it is linear in its size, and the number of session-key
packets and of packets inside the decrypted data is capped.
"""

from __future__ import annotations

import base64
import binascii
import bz2
import functools
import hashlib
import hmac
import itertools
import struct
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime

# OpenPGP's CFB lives in the "decrepit" corner of cryptography (43 and later).
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.decrepit.ciphers.modes import CFB as _CFB
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa, utils, x25519
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import AESOCB3
from cryptography.hazmat.primitives.keywrap import InvalidUnwrap, aes_key_unwrap

__all__ = [
    "EncryptedMessage",
    "InnerMessage",
    "IntegrityFailure",
    "NoIntegrity",
    "NotEncrypted",
    "Packet",
    "PacketError",
    "SecretKey",
    "Unsupported",
    "build_identity",
    "dearmor",
    "detached_signature",
    "encrypted_message",
    "iter_packets",
    "message_packets",
    "open_aead",
    "open_inner",
    "packet",
    "read_secret_keys",
    "split_packets",
    "top_level_tags",
]

# Packet tags (RFC 9580 §5)
TAG_PKESK, TAG_SIGNATURE, TAG_SKESK, TAG_OPS = 1, 2, 3, 4
TAG_SECRET_KEY, TAG_PUBLIC_KEY, TAG_SECRET_SUBKEY, TAG_COMPRESSED = 5, 6, 7, 8
TAG_SED, TAG_MARKER, TAG_LITERAL, TAG_USER_ID, TAG_PUBLIC_SUBKEY = 9, 10, 11, 13, 14
TAG_SEIPD, TAG_AED, TAG_PADDING = 18, 20, 21

ALGO_RSA, ALGO_RSA_SIGN, ALGO_ECDH, ALGO_EDDSA = 1, 3, 18, 22
_RSA_ENCRYPT = (1, 2)
_RSA_SIGN = (1, 3)
HASH_SHA256 = 8

_OID_ED25519 = bytes.fromhex("2b06010401da470f01")
_OID_CV25519 = bytes.fromhex("2b060104019755010501")
_KDF_SHA256_AES128 = bytes([1, HASH_SHA256, 7])  # reserved, KDF hash, key-wrap cipher
_AES_KEY_SIZES = {7: 16, 8: 24, 9: 32}
# A decompression bomb must not exhaust memory: the largest message the gateway accepts is
# far below this, and real mail compresses by a factor well under 64.
_MAX_INFLATED = 256 * 1024 * 1024
_MAX_DEPTH = 4
# A message to a few hundred recipients has a few hundred session-key packets; each one the
# gateway tries costs a private-key operation, so a flood of them is refused, not tried.
_MAX_SESSION_KEY_PACKETS = 256
# Inside the encryption: one-pass signatures, literal data, signatures. A signed message
# carries a handful; thousands are not mail.
_MAX_INNER_PACKETS = 256

_AEAD_EAX, _AEAD_OCB = 1, 2
_AEAD_TAG_SIZE = 16
_OCB_IV_SIZE = 15
_MAX_CHUNK_OCTET = 56  # chunk size 2**(c + 6): LibrePGP §5.16 defines c from 0 to 56

_ARMOR_BEGIN = b"-----BEGIN PGP MESSAGE-----"
_ARMOR_END = b"-----END PGP MESSAGE-----"

_NAMES = {
    TAG_PKESK: "public-key session key packet", TAG_SIGNATURE: "signature packet",
    TAG_SKESK: "symmetric session key packet", TAG_OPS: "one-pass signature packet",
    TAG_COMPRESSED: "compressed data packet", TAG_SED: "unprotected encrypted data packet",
    TAG_LITERAL: "literal (unencrypted) data packet", TAG_SEIPD: "encrypted data packet",
    TAG_AED: "AEAD encrypted data packet", TAG_MARKER: "marker packet",
}


def _name(tag: int) -> str:
    return _NAMES.get(tag, f"packet of type {tag}")


class PacketError(ValueError):
    """The octets are not the OpenPGP structure expected (malformed, unsupported, damaged)."""


class NotEncrypted(PacketError):
    """The top-level packets are not (only) an encrypted message."""


class NoIntegrity(PacketError):
    """Symmetrically encrypted data without integrity protection (tag 9, RFC 9580 §5.7)."""


class IntegrityFailure(PacketError):
    """An authentication tag did not verify: the ciphertext was altered, cut or reordered."""


class Unsupported(PacketError):
    """A well-formed packet using an algorithm or version this code does not implement."""


@dataclass(frozen=True, eq=False)
class Packet:
    """One packet, as offsets into the octets it was read from: its body, or the whole packet,
    is copied out only when asked for (the data packet is most of a message's size)."""

    tag: int
    source: bytes = field(repr=False)
    start: int  # the first octet of the header
    end: int  # just after the body
    pieces: tuple[tuple[int, int], ...]  # the body: one piece, or one per partial length

    @functools.cached_property
    def body(self) -> bytes:
        return self.body_from(0)

    @functools.cached_property
    def raw(self) -> bytes:
        """The packet as it arrived, header included."""
        return self.source[self.start: self.end]

    @property
    def body_length(self) -> int:
        return sum(last - first for first, last in self.pieces)

    def body_from(self, offset: int) -> bytes:
        """The body from octet `offset` on."""
        if len(self.pieces) == 1:
            first, last = self.pieces[0]
            return self.source[min(first + offset, last): last]
        joined = b"".join([self.source[first:last] for first, last in self.pieces])
        return joined[offset:] if offset else joined

    def body_prefix(self, count: int) -> bytes:
        """The first `count` octets of the body (fewer if it is shorter)."""
        prefix: list[bytes] = []
        for first, last in self.pieces:
            prefix.append(self.source[first: min(last, first + count)])
            count -= len(prefix[-1])
            if count <= 0:
                break
        return b"".join(prefix)

    def view(self) -> memoryview:
        """The body, without copying it when it is one piece."""
        if len(self.pieces) == 1:
            first, last = self.pieces[0]
            return memoryview(self.source)[first:last]
        return memoryview(self.body)


# -- framing (RFC 9580 §4.2) ------------------------------------------------------------------

def _new_length(data: bytes, offset: int, stop: int) -> tuple[int, int, bool]:
    """(length, header size, partial) of a new-format length at `offset`."""
    first = data[offset]
    if first < 192:
        return first, 1, False
    if first < 224:
        if offset + 1 >= stop:
            raise PacketError("truncated packet length")
        return ((first - 192) << 8) + data[offset + 1] + 192, 2, False
    if first == 255:
        if offset + 5 > stop:
            raise PacketError("truncated packet length")
        return struct.unpack(">I", data[offset + 1: offset + 5])[0], 5, False
    return 1 << (first & 0x1F), 1, True


def _packet_at(data: bytes, offset: int, stop: int) -> tuple[int, list[tuple[int, int]], int]:
    """(tag, body pieces as (start, end) offsets, end) of the packet whose header is at
    `offset`, within `data[:stop]`: one piece, or one per partial length."""
    ctb = data[offset]
    if not ctb & 0x80:
        raise PacketError("not an OpenPGP packet header")
    offset += 1
    pieces: list[tuple[int, int]] = []
    if ctb & 0x40:
        tag = ctb & 0x3F
        while True:
            if offset >= stop:
                raise PacketError("truncated packet")
            length, size, partial = _new_length(data, offset, stop)
            offset += size
            if offset + length > stop:
                raise PacketError("truncated packet body")
            pieces.append((offset, offset + length))
            offset += length
            if not partial:
                break
        return tag, pieces, offset
    tag = (ctb >> 2) & 0x0F
    kind = ctb & 3
    if kind == 3:  # indeterminate: to the end of the data
        return tag, [(offset, stop)], stop
    size = (1, 2, 4)[kind]
    if offset + size > stop:
        raise PacketError("truncated packet length")
    length = int.from_bytes(data[offset: offset + size], "big")
    offset += size
    if offset + length > stop:
        raise PacketError("truncated packet body")
    return tag, [(offset, offset + length)], offset + length


def iter_packets(data: bytes, start: int = 0, stop: int | None = None) -> Iterator[Packet]:
    """The packets of a binary OpenPGP sequence (`data[start:stop]`), one at a time, bodies
    reassembled from partial lengths. Lazy, so that a caller refusing the structure stops
    reading early."""
    stop = len(data) if stop is None else stop
    offset = start
    while offset < stop:
        tag, pieces, end = _packet_at(data, offset, stop)
        yield Packet(tag, data, offset, end, tuple(pieces))
        offset = end


def _tags(data: bytes) -> Iterator[int]:
    """The tags of the packets of a binary OpenPGP sequence."""
    offset = 0
    while offset < len(data):
        tag, _, offset = _packet_at(data, offset, len(data))
        yield tag


def split_packets(data: bytes) -> list[Packet]:
    """The packets of a binary OpenPGP sequence, bodies reassembled from partial lengths."""
    return list(iter_packets(data))


def dearmor(data: bytes) -> bytes:
    """The binary packets of an armored OpenPGP message (RFC 9580 §6.2), or `data` if binary.

    Text before the BEGIN line and after the END line is ignored (it is never handed on);
    the CRC-24 line is ignored as RFC 9580 §6.1 asks: integrity comes from the encryption.
    Each armor line counts with the whitespace at its ends removed; empty lines are skipped.
    """
    if data[:1] and data[0] & 0x80:
        return data
    begin = data.find(_ARMOR_BEGIN)
    if begin < 0:
        raise PacketError("no armored OpenPGP message")
    end = data.find(_ARMOR_END, begin)
    if end < 0:
        raise PacketError("armored OpenPGP message without its END line")
    if data.find(b"-----BEGIN PGP", end) >= 0:
        raise PacketError("more than one armored block")
    start = begin + len(_ARMOR_BEGIN)
    stop = data.find(b"\n", start, end)
    if stop < 0:
        stop = end
    if data[start:stop].strip():
        raise PacketError("text after the armor header line")
    # Armor headers (`Key: Value`) come first; a base64 line never holds a colon.
    start = stop + 1
    while start < end:
        stop = data.find(b"\n", start, end)
        if stop < 0:
            stop = end
        if data.find(b":", start, stop) < 0:
            break
        start = stop + 1
    try:
        return base64.b64decode(_armor_base64(data[start:end]), validate=True)
    except (binascii.Error, ValueError):
        raise PacketError("armored OpenPGP message is not valid base64") from None


# Whitespace `bytes.strip` removes besides CR and LF: armor lines holding any of it are read
# one by one; lines that hold none (every encoder's output) are read with bytes methods.
_LINE_SPACE = (b" ", b"\t", b"\x0b", b"\x0c")
_CR_TO_LF = bytes.maketrans(b"\r", b"\n")


def _armor_base64(text: bytes) -> bytes:
    """The base64 of the armor lines in `text`: every line up to the checksum line (`=` then
    the CRC-24), after which only empty lines may stand. A line ends at CRLF, LF or a lone CR
    (the line breaks `canonical_crlf` knows); its ends are stripped of whitespace."""
    if any(space in text for space in _LINE_SPACE):
        return _armor_base64_by_line(text)
    # Only line breaks separate the lines here, and base64 holds "=" only as padding at its
    # very end: the first "=" either starts the checksum line or ends the data in its line.
    equals = text.find(b"=")
    if equals < 0:
        return text.translate(None, b"\r\n")
    if equals and text[equals - 1] not in b"\r\n":
        data_end = _line_end(text, equals)
        rest = text[data_end:].lstrip(b"\r\n")
        if rest and not rest.startswith(b"="):
            # A data line after the padding: base64 that `b64decode` would refuse.
            raise PacketError("armored OpenPGP message is not valid base64")
    else:
        data_end, rest = equals, text[equals:]
    if rest[_line_end(rest, 0):].strip(b"\r\n"):
        raise PacketError("armored data after the checksum line")
    return text[:data_end].translate(None, b"\r\n")


def _line_end(text: bytes, start: int) -> int:
    """Where the line holding `text[start]` ends (its CR or LF), or the end of `text`."""
    ends = [at for at in (text.find(b"\n", start), text.find(b"\r", start)) if at >= 0]
    return min(ends, default=len(text))


def _armor_base64_by_line(text: bytes) -> bytes:
    """`_armor_base64` for lines with spaces or tabs in them: one line at a time."""
    payload: list[bytes] = []
    checksum_seen = False
    for line in text.translate(_CR_TO_LF).split(b"\n"):
        line = line.strip()
        if not line:
            continue
        if checksum_seen:
            raise PacketError("armored data after the checksum line")
        if line.startswith(b"="):
            checksum_seen = True
            continue
        payload.append(line)
    return b"".join(payload)


def top_level_tags(data: bytes) -> list[int]:
    """The tags of the top-level packets of an armored or binary message."""
    return list(_tags(dearmor(data)))


_ENCRYPTION_TAGS = frozenset({TAG_PKESK, TAG_SKESK, TAG_SED, TAG_SEIPD, TAG_AED})


def message_packets(data: bytes) -> tuple[bytes, bool]:
    """(binary packets, whether any top-level packet is about encryption) of an armored or
    binary message. A message with such a packet goes to decryption (which refuses anything
    but a pure encrypted message), any other to signature verification: each is handed the
    binary, so the armor is read once.

    Unreadable data goes to decryption as it arrived, which then reports why.
    """
    try:
        binary = dearmor(data)
        return binary, any(tag in _ENCRYPTION_TAGS for tag in _tags(binary))
    except PacketError:
        return data, True


@dataclass(frozen=True)
class EncryptedMessage:
    """A top-level encrypted message: session-key packets, then one integrity-protected
    container (RFC 9580 §10.3 "Encrypted Message"), nothing after it."""

    session_key_packets: tuple[Packet, ...]
    container: Packet  # SEIPD (tag 18) or AEAD (tag 20)
    binary: bytes  # exactly the packets accepted (marker and padding packets dropped)

    @property
    def pkesks(self) -> tuple[Packet, ...]:
        return tuple(p for p in self.session_key_packets if p.tag == TAG_PKESK)


def encrypted_message(binary: bytes) -> EncryptedMessage:
    """The structure of an encrypted message, or an exception saying why it is not one.

    Raises NoIntegrity for a tag-9 container, NotEncrypted for any other sequence (a literal,
    compressed or signed message; encrypted data followed by anything but padding; a container
    with no session-key packet), PacketError when the octets are not packets at all.
    """
    session_keys: list[Packet] = []
    container: Packet | None = None
    dropped = False
    for item in iter_packets(binary):
        if container is not None:
            if item.tag == TAG_PADDING:
                dropped = True
                continue
            if item.tag == TAG_SED:
                raise NoIntegrity("unprotected encrypted data packet after the encrypted data")
            raise NotEncrypted(f"{_name(item.tag)} after the encrypted data")
        if item.tag in (TAG_PKESK, TAG_SKESK):
            session_keys.append(item)
            if len(session_keys) > _MAX_SESSION_KEY_PACKETS:
                raise PacketError(
                    f"more than {_MAX_SESSION_KEY_PACKETS} session key packets"
                )
        elif item.tag in (TAG_MARKER, TAG_PADDING):
            dropped = True
            continue
        elif item.tag == TAG_SED:
            raise NoIntegrity("symmetrically encrypted data packet without MDC")
        elif item.tag in (TAG_SEIPD, TAG_AED):
            container = item
        else:
            raise NotEncrypted(f"{_name(item.tag)} where encrypted data was expected")
    if container is None:
        raise NotEncrypted("no encrypted data packet")
    if not session_keys:
        raise NotEncrypted("encrypted data without any session key packet")
    # Every octet of `binary` belongs to a packet: with none dropped, it is the message.
    accepted = b"".join([p.raw for p in session_keys] + [container.raw]) if dropped else binary
    return EncryptedMessage(tuple(session_keys), container, accepted)


def packet(tag: int, body: bytes) -> bytes:
    """A new-format packet (RFC 9580 §4.2.1)."""
    length = len(body)
    if length < 192:
        header = bytes([length])
    elif length < 8384:
        length -= 192
        header = bytes([(length >> 8) + 192, length & 0xFF])
    else:
        header = b"\xff" + struct.pack(">I", length)
    return bytes([0xC0 | tag]) + header + body


def _mpi(value: bytes) -> bytes:
    value = value.lstrip(b"\x00")
    bits = (len(value) - 1) * 8 + value[0].bit_length() if value else 0
    return struct.pack(">H", bits) + value


class _Reader:
    def __init__(self, data: bytes, offset: int = 0) -> None:
        self.data, self.offset = data, offset

    def take(self, count: int) -> bytes:
        if self.offset + count > len(self.data):
            raise PacketError("truncated packet field")
        out = self.data[self.offset: self.offset + count]
        self.offset += count
        return out

    def byte(self) -> int:
        return self.take(1)[0]

    def mpi(self) -> bytes:
        bits = struct.unpack(">H", self.take(2))[0]
        return self.take((bits + 7) // 8)

    def short(self) -> bytes:
        return self.take(self.byte())


# -- secret keys ------------------------------------------------------------------------------

@dataclass(frozen=True)
class SecretKey:
    """One unprotected v4 secret (sub)key and what the gateway may use it for."""

    fingerprint: str  # upper-case hex
    algorithm: int
    public_body: bytes  # the public key packet body (what fingerprints and signatures hash)
    secret: tuple[bytes, ...]  # algorithm-specific secret values (big-endian as stored)
    public: tuple[bytes, ...]  # algorithm-specific public values

    @property
    def key_id(self) -> bytes:
        return bytes.fromhex(self.fingerprint)[-8:]


def _fingerprint(public_body: bytes) -> str:
    return hashlib.sha1(b"\x99" + struct.pack(">H", len(public_body)) + public_body).hexdigest()


def _read_key(body: bytes) -> SecretKey:
    reader = _Reader(body)
    if reader.byte() != 4:
        raise PacketError("only v4 secret keys are supported")
    reader.take(4)
    algorithm = reader.byte()
    public: tuple[bytes, ...]
    if algorithm in (1, 2, 3):
        public = (reader.mpi(), reader.mpi())
    elif algorithm == ALGO_EDDSA:
        public = (reader.short(), reader.mpi())
    elif algorithm == ALGO_ECDH:
        public = (reader.short(), reader.mpi(), reader.short())
    else:
        raise PacketError(f"public-key algorithm {algorithm} is not supported")
    public_body = body[: reader.offset]
    usage = reader.byte()
    if usage != 0:
        raise PacketError("the secret key is protected by a passphrase; export it unprotected")
    secret: tuple[bytes, ...]
    if algorithm in (1, 2, 3):
        secret = (reader.mpi(), reader.mpi(), reader.mpi(), reader.mpi())
    else:
        secret = (reader.mpi(),)
    return SecretKey(_fingerprint(public_body).upper(), algorithm, public_body, secret, public)


def read_secret_keys(binary_tsk: bytes) -> list[SecretKey]:
    """Every unprotected secret (sub)key of a binary transferable secret key, primary first."""
    keys: list[SecretKey] = []
    for item in split_packets(binary_tsk):
        if item.tag in (TAG_SECRET_KEY, TAG_SECRET_SUBKEY):
            keys.append(_read_key(item.body))
    return keys


# -- signatures (RFC 9580 §5.2.4, v4) ---------------------------------------------------------

def _subpacket(kind: int, value: bytes) -> bytes:
    return bytes([len(value) + 1, kind]) + value


def _sign_digest(key: SecretKey, digest: bytes) -> bytes:
    """The algorithm-specific signature MPIs over a SHA-256 digest."""
    if key.algorithm == ALGO_EDDSA:
        # Legacy EdDSA signs the digest itself (RFC 9580 §5.2.3.3, algorithm 22).
        private = ed25519.Ed25519PrivateKey.from_private_bytes(key.secret[0].rjust(32, b"\0"))
        raw = private.sign(digest)
        return _mpi(raw[:32]) + _mpi(raw[32:])
    if key.algorithm in _RSA_SIGN:
        private_rsa = _rsa_private(key)
        value = private_rsa.sign(digest, padding.PKCS1v15(), utils.Prehashed(hashes.SHA256()))
        return _mpi(value)
    raise PacketError(f"public-key algorithm {key.algorithm} cannot sign here")


def _signature(
    key: SecretKey, kind: int, hashed_prefix: bytes, subpackets: bytes
) -> bytes:
    issuer_fpr = _subpacket(33, b"\x04" + bytes.fromhex(key.fingerprint))
    hashed = subpackets + issuer_fpr
    head = bytes([4, kind, key.algorithm, HASH_SHA256]) + struct.pack(">H", len(hashed)) + hashed
    trailer = b"\x04\xff" + struct.pack(">I", len(head))
    hasher = hashlib.sha256(hashed_prefix)  # fed piece by piece: the data is not copied
    hasher.update(head)
    hasher.update(trailer)
    digest = hasher.digest()
    unhashed = _subpacket(16, key.key_id)
    body = head + struct.pack(">H", len(unhashed)) + unhashed + digest[:2]
    return packet(TAG_SIGNATURE, body + _sign_digest(key, digest))


def detached_signature(key: SecretKey, data: bytes, created: datetime) -> bytes:
    """A binary-document (0x00) v4 SHA-256 signature over `data`, as a binary packet."""
    return _signature(key, 0x00, data, _subpacket(2, struct.pack(">I", int(created.timestamp()))))


def _key_hash(public_body: bytes) -> bytes:
    return b"\x99" + struct.pack(">H", len(public_body)) + public_body


def build_identity(
    user_id: str, created: datetime, random: Callable[[int], bytes]
) -> bytes:
    """A binary v4 transferable secret key GnuPG 2.2 reads: Ed25519 [SC] + Cv25519 [E].

    Features = MDC only (no SEIPD v2 / AEAD), preferences AES-256/AES-128 and SHA-256, no
    expiry, secrets unprotected (the gateway's key file is protected by file permissions).
    """
    when = struct.pack(">I", int(created.timestamp()))
    seed = random(32)
    signing = ed25519.Ed25519PrivateKey.from_private_bytes(seed)
    point = b"\x40" + signing.public_key().public_bytes_raw()
    primary_public = b"\x04" + when + bytes([ALGO_EDDSA, len(_OID_ED25519)]) + _OID_ED25519
    primary_public += _mpi(point)
    primary = SecretKey(
        _fingerprint(primary_public).upper(), ALGO_EDDSA, primary_public, (seed,),
        (_OID_ED25519, point),
    )
    scalar = bytearray(random(32))
    # X25519 clamping (RFC 7748 §5) done here, so the stored scalar is the one used.
    scalar[0] &= 248
    scalar[31] &= 127
    scalar[31] |= 64
    encryption = x25519.X25519PrivateKey.from_private_bytes(bytes(scalar))
    enc_point = b"\x40" + encryption.public_key().public_bytes_raw()
    sub_public = b"\x04" + when + bytes([ALGO_ECDH, len(_OID_CV25519)]) + _OID_CV25519
    sub_public += _mpi(enc_point) + bytes([len(_KDF_SHA256_AES128)]) + _KDF_SHA256_AES128
    # OpenPGP stores the Curve25519 secret as a big-endian MPI of the little-endian scalar.
    sub_secret = bytes(reversed(scalar))

    def secret_body(public_body: bytes, value: bytes) -> bytes:
        encoded = _mpi(value)
        checksum = struct.pack(">H", sum(encoded) & 0xFFFF)
        return public_body + b"\x00" + encoded + checksum

    uid = user_id.encode("utf-8")
    certification = _signature(
        primary, 0x13, _key_hash(primary_public) + b"\xb4" + struct.pack(">I", len(uid)) + uid,
        _subpacket(2, when)
        + _subpacket(27, b"\x03")  # certify + sign
        + _subpacket(11, bytes([9, 7]))  # AES-256, AES-128
        + _subpacket(21, bytes([HASH_SHA256, 10, 9]))  # SHA-256, SHA-512, SHA-384
        + _subpacket(22, bytes([2, 1, 0]))  # ZLIB, ZIP, uncompressed
        + _subpacket(30, b"\x01")  # Features: MDC only; SEIPD v2 deliberately not advertised
        + _subpacket(25, b"\x01"),  # primary user ID
    )
    binding = _signature(
        primary, 0x18, _key_hash(primary_public) + _key_hash(sub_public),
        _subpacket(2, when) + _subpacket(27, b"\x0c"),  # encrypt communications + storage
    )
    return (
        packet(TAG_SECRET_KEY, secret_body(primary_public, seed))
        + packet(TAG_USER_ID, uid)
        + certification
        + packet(TAG_SECRET_SUBKEY, secret_body(sub_public, sub_secret))
        + binding
    )


# -- session keys and SEIPD v1 (RFC 9580 §5.1, §5.13; RFC 6637 §8 for ECDH) ------------------

def _rsa_private(key: SecretKey) -> rsa.RSAPrivateKey:
    n, e = (int.from_bytes(v, "big") for v in key.public)
    d, p, q, _u = (int.from_bytes(v, "big") for v in key.secret)
    numbers = rsa.RSAPrivateNumbers(
        p, q, d, rsa.rsa_crt_dmp1(d, p), rsa.rsa_crt_dmq1(d, q), rsa.rsa_crt_iqmp(p, q),
        rsa.RSAPublicNumbers(e, n),
    )
    return numbers.private_key()


def _session_key_payload(key: SecretKey, reader: _Reader) -> bytes | None:
    """The decrypted `algorithm || key || checksum` of a v3 PKESK for `key`, or None."""
    if key.algorithm in _RSA_ENCRYPT:
        value = reader.mpi()
        try:
            return _rsa_private(key).decrypt(value, padding.PKCS1v15())
        except ValueError:
            return None
    if key.algorithm == ALGO_ECDH:
        oid, _point, kdf = key.public
        if oid != _OID_CV25519 or len(kdf) != 3:
            return None
        ephemeral = reader.mpi()
        wrapped = reader.short()
        if len(ephemeral) != 33 or ephemeral[0] != 0x40:
            return None
        scalar = bytes(reversed(key.secret[0].rjust(32, b"\0")))
        try:
            shared = x25519.X25519PrivateKey.from_private_bytes(scalar).exchange(
                x25519.X25519PublicKey.from_public_bytes(ephemeral[1:])
            )
        except ValueError:  # a low-order point from the sender: no shared secret
            return None
        hash_id, kek_algo = kdf[1], kdf[2]
        params = (
            bytes([len(oid)]) + oid + bytes([ALGO_ECDH, len(kdf)]) + kdf
            + b"Anonymous Sender    " + bytes.fromhex(key.fingerprint)
        )
        hasher = {8: hashlib.sha256, 9: hashlib.sha384, 10: hashlib.sha512}.get(hash_id)
        size = _AES_KEY_SIZES.get(kek_algo)
        if hasher is None or size is None:
            return None
        kek = hasher(b"\x00\x00\x00\x01" + shared + params).digest()[:size]
        try:
            unwrapped = aes_key_unwrap(kek, wrapped)
        except InvalidUnwrap:
            return None
        pad = unwrapped[-1]
        if not 1 <= pad <= 8 or unwrapped[-pad:] != bytes([pad]) * pad:
            return None
        return unwrapped[:-pad]
    return None


def _session_keys(
    pkesks: Iterable[Packet], keys: list[SecretKey]
) -> list[tuple[int, bytes, str]]:
    """(symmetric algorithm, session key, fingerprint of the key that decrypted it)."""
    found: list[tuple[int, bytes, str]] = []
    for item in pkesks:
        reader = _Reader(item.body)
        if reader.byte() != 3:
            continue
        key_id = reader.take(8)
        algorithm = reader.byte()
        for key in keys:
            if key.algorithm != algorithm and not (
                algorithm in _RSA_ENCRYPT and key.algorithm in _RSA_ENCRYPT
            ):
                continue
            if key_id not in (key.key_id, bytes(8)):
                continue
            payload = _session_key_payload(key, _Reader(item.body, reader.offset))
            if payload is None or len(payload) < 4:
                continue
            symmetric, session, checksum = payload[0], payload[1:-2], payload[-2:]
            if struct.pack(">H", sum(session) & 0xFFFF) == checksum:
                found.append((symmetric, session, key.fingerprint))
    return found


def _open_seipd(container: Packet, symmetric: int, session: bytes) -> bytes | None:
    """The decrypted data of a v1 SEIPD packet (random prefix and its quick check, the
    message's packets, the MDC packet), or None unless the MDC over all of it verified."""
    body = container.view()
    if not body or body[0] != 1 or _AES_KEY_SIZES.get(symmetric) != len(session):
        return None
    decryptor = Cipher(algorithms.AES(session), _CFB(bytes(16))).decryptor()
    plain = decryptor.update(body[1:]) + decryptor.finalize()
    if len(plain) < 16 + 2 + 22 or plain[14:16] != plain[16:18]:
        return None
    mdc = hashlib.sha1(memoryview(plain)[:-20]).digest()
    if plain[-22:-20] != b"\xd3\x14" or not hmac.compare_digest(mdc, plain[-20:]):
        return None
    return plain


def _inflate(algorithm: int, data: memoryview) -> bytes:
    if algorithm == 0:
        return bytes(data)
    if algorithm in (1, 2):
        inflater = zlib.decompressobj(-15 if algorithm == 1 else 15)
        out = inflater.decompress(data, _MAX_INFLATED)
        if inflater.unconsumed_tail:
            raise PacketError("compressed data expands beyond the gateway's limit")
        return out
    if algorithm == 3:
        bunzip = bz2.BZ2Decompressor()
        out = bunzip.decompress(data, _MAX_INFLATED)
        if not bunzip.needs_input and not bunzip.eof:
            raise PacketError("compressed data expands beyond the gateway's limit")
        return out
    raise PacketError(f"compression algorithm {algorithm} is not supported")


@dataclass(frozen=True)
class InnerMessage:
    """The packets of a decrypted message, decompressed: what the signatures cover.

    Built only by `_inner_message`, which checks the grammar inside the encryption: exactly
    one literal data packet, otherwise only one-pass signatures and signatures.
    """

    packets: tuple[Packet, ...]

    @property
    def literal(self) -> bytes:
        for item in self.packets:
            if item.tag == TAG_LITERAL:
                # format, file name length, file name, date, then the data (RFC 9580 §5.9)
                head = item.body_prefix(2)
                if len(head) < 2 or item.body_length < 2 + head[1] + 4:
                    raise PacketError("truncated literal data packet")
                return item.body_from(2 + head[1] + 4)
        raise PacketError("no literal data packet")

    @property
    def signatures(self) -> tuple[Packet, ...]:
        return tuple(p for p in self.packets if p.tag == TAG_SIGNATURE)

    @property
    def signed_message(self) -> bytes:
        """One-pass signatures, literal data and signatures as one uncompressed message:
        the octets they were read from when they stand there side by side."""
        first, last = self.packets[0], self.packets[-1]
        if all(one.source is other.source and one.end == other.start
               for one, other in itertools.pairwise(self.packets)):
            return first.source[first.start: last.end]
        return b"".join(p.raw for p in self.packets)


def _flatten(
    data: bytes, out: list[Packet], depth: int = 0, start: int = 0, stop: int | None = None
) -> None:
    if depth > _MAX_DEPTH:
        raise PacketError("too many nested compression layers")
    for item in iter_packets(data, start, stop):
        if item.tag == TAG_COMPRESSED:
            body = item.view()
            if not body:
                raise PacketError("empty compressed data packet")
            _flatten(_inflate(body[0], body[1:]), out, depth + 1)
        elif item.tag in (TAG_MARKER, TAG_PADDING):
            continue
        else:
            out.append(item)
            if len(out) > _MAX_INNER_PACKETS:
                raise PacketError(f"more than {_MAX_INNER_PACKETS} packets in the encrypted data")


def _inner_message(plain: bytes, start: int = 0, stop: int | None = None) -> InnerMessage:
    """The decrypted packets in `plain[start:stop]`, checked against the message grammar
    (RFC 9580 §10.3)."""
    packets: list[Packet] = []
    _flatten(plain, packets, 0, start, stop)
    literals = sum(1 for p in packets if p.tag == TAG_LITERAL)
    if literals != 1:
        raise PacketError(f"the encrypted data holds {literals} literal data packets, not one")
    for item in packets:
        if item.tag not in (TAG_LITERAL, TAG_OPS, TAG_SIGNATURE):
            raise PacketError(f"{_name(item.tag)} inside the encrypted data")
    return InnerMessage(tuple(packets))


def open_inner(structure: EncryptedMessage, keys: list[SecretKey]) -> InnerMessage | None:
    """The decrypted packets of a PKESK + SEIPD v1 message, or None if this code cannot open it.

    None covers formats left to pysequoia alone (SEIPD v2, ciphers other than AES, key types
    other than RSA and Cv25519): the caller then does not learn the signatures. Raises
    PacketError when the message opens but what it holds is not one literal message.
    """
    if structure.container.tag != TAG_SEIPD:
        return None
    for symmetric, session, _fingerprint in _session_keys(structure.pkesks, keys):
        plain = _open_seipd(structure.container, symmetric, session)
        if plain is not None:
            # Between the random prefix with its quick check and the MDC packet.
            return _inner_message(plain, 18, len(plain) - 22)
    return None


# -- AEAD encrypted data, tag 20 (LibrePGP §5.16, draft-koch-librepgp) ------------------------

def _ocb_nonce(iv: bytes, index: int) -> bytes:
    # The chunk index, big-endian, is xored into the low-order octets of the 15-octet IV.
    low = int.from_bytes(iv[-8:], "big") ^ index
    return iv[:-8] + low.to_bytes(8, "big")


def _open_aead_body(body: bytes, symmetric: int, session: bytes) -> bytes:
    """The plaintext of a v1 AEAD packet body, released only once every tag has verified."""
    if len(body) < 4:
        raise IntegrityFailure("truncated AEAD encrypted data packet")
    version, cipher, mode, chunk_octet = body[0], body[1], body[2], body[3]
    if version != 1:
        raise Unsupported(f"AEAD encrypted data packet version {version}")
    if mode == _AEAD_EAX:
        raise Unsupported("AEAD algorithm EAX is not supported by this gateway (OCB is)")
    if mode != _AEAD_OCB:
        raise Unsupported(f"AEAD algorithm {mode} is not supported")
    if cipher not in _AES_KEY_SIZES:
        raise Unsupported(f"symmetric algorithm {cipher} is not supported with AEAD")
    if chunk_octet > _MAX_CHUNK_OCTET:
        raise PacketError(f"AEAD chunk size octet {chunk_octet} is out of range")
    if cipher != symmetric or len(session) != _AES_KEY_SIZES[cipher]:
        raise IntegrityFailure("session key does not match the AEAD packet's cipher")
    chunk_size = 1 << (chunk_octet + 6)
    iv = body[4: 4 + _OCB_IV_SIZE]
    data = body[4 + _OCB_IV_SIZE:]
    if len(iv) != _OCB_IV_SIZE or len(data) < _AEAD_TAG_SIZE:
        raise IntegrityFailure("truncated AEAD encrypted data packet")
    chunks, final_tag = data[:-_AEAD_TAG_SIZE], data[-_AEAD_TAG_SIZE:]
    prefix = bytes([0xC0 | TAG_AED, version, cipher, mode, chunk_octet])
    aead = AESOCB3(session)
    step = chunk_size + _AEAD_TAG_SIZE
    plain: list[bytes] = []
    total = index = offset = 0
    while offset < len(chunks):
        piece = chunks[offset: offset + step]
        offset += len(piece)
        if len(piece) < _AEAD_TAG_SIZE:
            raise IntegrityFailure(f"AEAD chunk {index} is truncated")
        try:
            opened = aead.decrypt(_ocb_nonce(iv, index), piece, prefix + struct.pack(">Q", index))
        except InvalidTag:
            raise IntegrityFailure(f"AEAD chunk {index} failed its authentication") from None
        plain.append(opened)
        total += len(opened)
        index += 1
    # The final tag authenticates the chunk count and the total length: it detects a cut
    # after a chunk boundary, or chunks dropped from the end.
    try:
        aead.decrypt(_ocb_nonce(iv, index), final_tag,
                     prefix + struct.pack(">QQ", index, total))
    except InvalidTag:
        raise IntegrityFailure("AEAD final authentication tag failed") from None
    return b"".join(plain)


def open_aead(
    structure: EncryptedMessage, keys: list[SecretKey]
) -> tuple[InnerMessage, str] | None:
    """(decrypted packets, fingerprint of the key used) of a PKESK + AEAD (tag 20) message, or
    None if no session key packet is for one of `keys`.

    Raises IntegrityFailure when a chunk tag or the final tag fails (for every session key
    found), Unsupported for EAX or a cipher other than AES, PacketError when the decrypted
    data is not one literal message. No plaintext is returned unless all tags verified.
    """
    if structure.container.tag != TAG_AED:
        raise PacketError("not an AEAD encrypted data packet")
    failure: IntegrityFailure | None = None
    for symmetric, session, fingerprint in _session_keys(structure.pkesks, keys):
        try:
            plain = _open_aead_body(structure.container.body, symmetric, session)
        except IntegrityFailure as error:
            # A wrong key can pass the PKESK's 16-bit checksum: try the other candidates.
            failure = failure or error
            continue
        return _inner_message(plain), fingerprint
    if failure is not None:
        raise failure
    return None
