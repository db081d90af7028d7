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

Key material and signatures use `cryptography` (Ed25519, X25519, RSA, AES key wrap, AES-CFB).
Key generation draws randomness from the `random` callable it is given and reads no clock.

Untrusted input: every packet handed to `split_packets`, `open_inner` and `read_secret_keys`
(messages from peers; secret keys from the operator's key files).
"""

from __future__ import annotations

import bz2
import hashlib
import hmac
import struct
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime

# OpenPGP's CFB lives in the "decrepit" corner of cryptography (43 and later).
from cryptography.hazmat.decrepit.ciphers.modes import CFB as _CFB
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa, utils, x25519
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.keywrap import InvalidUnwrap, aes_key_unwrap

__all__ = [
    "InnerMessage",
    "Packet",
    "PacketError",
    "SecretKey",
    "build_identity",
    "detached_signature",
    "open_inner",
    "read_secret_keys",
    "split_packets",
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


class PacketError(ValueError):
    """The octets are not the OpenPGP structure expected (malformed, unsupported, damaged)."""


@dataclass(frozen=True)
class Packet:
    tag: int
    body: bytes
    raw: bytes  # the packet as it arrived, header included


# -- framing (RFC 9580 §4.2) ------------------------------------------------------------------

def _new_length(data: bytes, offset: int) -> tuple[int, int, bool]:
    """(length, header size, partial) of a new-format length at `offset`."""
    first = data[offset]
    if first < 192:
        return first, 1, False
    if first < 224:
        if offset + 1 >= len(data):
            raise PacketError("truncated packet length")
        return ((first - 192) << 8) + data[offset + 1] + 192, 2, False
    if first == 255:
        if offset + 5 > len(data):
            raise PacketError("truncated packet length")
        return struct.unpack(">I", data[offset + 1: offset + 5])[0], 5, False
    return 1 << (first & 0x1F), 1, True


def split_packets(data: bytes) -> list[Packet]:
    """The packets of a binary OpenPGP sequence, bodies reassembled from partial lengths."""
    packets: list[Packet] = []
    offset = 0
    while offset < len(data):
        start = offset
        ctb = data[offset]
        if not ctb & 0x80:
            raise PacketError("not an OpenPGP packet header")
        offset += 1
        if ctb & 0x40:
            tag = ctb & 0x3F
            chunks: list[bytes] = []
            while True:
                if offset >= len(data):
                    raise PacketError("truncated packet")
                length, size, partial = _new_length(data, offset)
                offset += size
                if offset + length > len(data):
                    raise PacketError("truncated packet body")
                chunks.append(data[offset: offset + length])
                offset += length
                if not partial:
                    break
            body = b"".join(chunks)
        else:
            tag = (ctb >> 2) & 0x0F
            kind = ctb & 3
            if kind == 3:  # indeterminate: to the end of the data
                body, offset = data[offset:], len(data)
            else:
                size = (1, 2, 4)[kind]
                if offset + size > len(data):
                    raise PacketError("truncated packet length")
                length = int.from_bytes(data[offset: offset + size], "big")
                offset += size
                if offset + length > len(data):
                    raise PacketError("truncated packet body")
                body = data[offset: offset + length]
                offset += length
        packets.append(Packet(tag, body, data[start:offset]))
    return packets


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
    digest = hashlib.sha256(hashed_prefix + head + trailer).digest()
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
        shared = x25519.X25519PrivateKey.from_private_bytes(scalar).exchange(
            x25519.X25519PublicKey.from_public_bytes(ephemeral[1:])
        )
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


def _session_keys(pkesks: Iterable[Packet], keys: list[SecretKey]) -> list[tuple[int, bytes]]:
    found: list[tuple[int, bytes]] = []
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
                found.append((symmetric, session))
    return found


def _open_seipd(body: bytes, symmetric: int, session: bytes) -> bytes | None:
    if not body or body[0] != 1 or _AES_KEY_SIZES.get(symmetric) != len(session):
        return None
    decryptor = Cipher(algorithms.AES(session), _CFB(bytes(16))).decryptor()
    plain = decryptor.update(body[1:]) + decryptor.finalize()
    if len(plain) < 16 + 2 + 22 or plain[14:16] != plain[16:18]:
        return None
    mdc = hashlib.sha1(plain[:-20]).digest()
    if plain[-22:-20] != b"\xd3\x14" or not hmac.compare_digest(mdc, plain[-20:]):
        return None
    return plain[18:-22]


def _inflate(algorithm: int, data: bytes) -> bytes:
    if algorithm == 0:
        return data
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
    """The packets of a decrypted message, decompressed: what the signatures cover."""

    packets: tuple[Packet, ...]

    @property
    def literal(self) -> bytes:
        for item in self.packets:
            if item.tag == TAG_LITERAL:
                body = item.body
                name_length = body[1]
                return body[2 + name_length + 4:]
        raise PacketError("no literal data packet")

    @property
    def signatures(self) -> tuple[Packet, ...]:
        return tuple(p for p in self.packets if p.tag == TAG_SIGNATURE)

    @property
    def signed_message(self) -> bytes:
        """One-pass signatures, literal data and signatures as one uncompressed message."""
        return b"".join(p.raw for p in self.packets)


def _flatten(data: bytes, depth: int = 0) -> list[Packet]:
    if depth > _MAX_DEPTH:
        raise PacketError("too many nested compression layers")
    out: list[Packet] = []
    for item in split_packets(data):
        if item.tag == TAG_COMPRESSED:
            if not item.body:
                raise PacketError("empty compressed data packet")
            out.extend(_flatten(_inflate(item.body[0], item.body[1:]), depth + 1))
        elif item.tag in (TAG_MARKER, TAG_PADDING):
            continue
        else:
            out.append(item)
    return out


def open_inner(message: bytes, keys: list[SecretKey]) -> InnerMessage | None:
    """The decrypted packets of a PKESK + SEIPD v1 message, or None if this code cannot open it.

    None covers formats left to pysequoia alone (AEAD packets, SEIPD v2, ciphers other than
    AES, key types other than RSA and Cv25519): the caller then does not learn the signatures.
    """
    packets = split_packets(message)
    pkesks = [p for p in packets if p.tag == TAG_PKESK]
    containers = [p for p in packets if p.tag == TAG_SEIPD]
    if len(containers) != 1:
        return None
    for symmetric, session in _session_keys(pkesks, keys):
        plain = _open_seipd(containers[0].body, symmetric, session)
        if plain is not None:
            return InnerMessage(tuple(_flatten(plain)))
    return None
