"""PGP/MIME structure (RFC 3156) and inline armored blocks, on the raw octets of a message.

RFC 3156 §5: the signature of a `multipart/signed` covers the first body part exactly as it
arrived, line breaks made CRLF. The parts are cut from the received octets
(`adapters.cms.entity`, never Python's `email` serializer, which rewrites headers and line
ends). RFC 3156 §4 and §6.1: `multipart/encrypted` carries `application/pgp-encrypted`
("Version: 1") then the armored message; signed-then-encrypted mail nests a
`multipart/signed` inside it, which is what `signed_entity` and `encrypted_entity` build.

Inline armored text (RFC 9580 §6, §7) is recognised only when the whole body is one block:
text around a block is unprotected and must never pass as part of a signed or encrypted whole
(EFAIL-style wrapping, Thunderbird's partial-inline rule).

Untrusted input: every entity handed to the readers here.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from adapters.cms.entity import Entity, field_blocks

__all__ = [
    "ROUTING_FIELDS",
    "ArmoredBody",
    "canonical_crlf",
    "encrypted_entity",
    "find_armored",
    "new_boundary",
    "outer_fields",
    "signed_entity",
    "text_entity",
    "whole_armored",
]

_BLOCK = re.compile(
    rb"-----BEGIN PGP (MESSAGE|SIGNED MESSAGE)-----.*?-----END PGP (MESSAGE|SIGNATURE)-----",
    re.DOTALL,
)
# Header fields repeated on the encrypted envelope so that MTAs route it and clients list it;
# the authoritative copies travel inside, signed.
ROUTING_FIELDS = (
    "from", "sender", "reply-to", "to", "cc", "subject", "date", "message-id",
    "in-reply-to", "references",
)
# The gateway's trace headers go on the envelope too: an Apicrypt client shows only the outer
# headers, and the recipient must see what the gateway verified (DESIGN.md §4).
TRACE_FIELDS = ("received", "authentication-results")


def canonical_crlf(data: bytes) -> bytes:
    """Every line break as CRLF (RFC 3156 §5 canonical form for signed parts)."""
    return re.sub(rb"\r\n|\r|\n", b"\r\n", data)


@dataclass(frozen=True)
class ArmoredBody:
    kind: str  # "message" (PGP MESSAGE) or "cleartext" (PGP SIGNED MESSAGE)
    block: bytes


def whole_armored(text: bytes) -> ArmoredBody | None:
    """The armored block when it is the entire body (whitespace aside), else None."""
    stripped = text.strip(b" \t\r\n")
    match = _BLOCK.fullmatch(stripped)
    if match is None:
        return None
    begin, end = match.group(1), match.group(2)
    if begin == b"MESSAGE" and end == b"MESSAGE":
        return ArmoredBody("message", stripped + b"\n")
    if begin == b"SIGNED MESSAGE" and end == b"SIGNATURE":
        if stripped.count(b"-----BEGIN PGP SIGNED MESSAGE-----") != 1:
            return None
        return ArmoredBody("cleartext", stripped + b"\n")
    return None


def find_armored(text: bytes) -> bool:
    """True when an armored block appears anywhere in `text` (for audit notes)."""
    return _BLOCK.search(text) is not None


def new_boundary(random: Callable[[int], bytes], avoid: bytes, prefix: str) -> bytes:
    while True:
        boundary = f"----={prefix}_".encode("ascii") + random(12).hex().encode("ascii")
        if boundary not in avoid:
            return boundary


def outer_fields(head: bytes) -> bytes:
    """The routing header fields of a head, CRLF-terminated, for an envelope."""
    out = b""
    for name, raw in field_blocks(head):
        if name in ROUTING_FIELDS or name in TRACE_FIELDS:
            out += canonical_crlf(raw.rstrip(b"\r\n")) + b"\r\n"
    return out


def signed_entity(to_sign: bytes, signature: bytes, micalg: str, boundary: bytes) -> bytes:
    """A `multipart/signed` entity (RFC 3156 §5) around exactly `to_sign`."""
    return (
        b'Content-Type: multipart/signed; micalg=' + micalg.encode("ascii")
        + b'; protocol="application/pgp-signature"; boundary="' + boundary + b'"\r\n'
        b"\r\n"
        b"This is an OpenPGP/MIME signed message (RFC 3156).\r\n"
        b"--" + boundary + b"\r\n"
        + to_sign + b"\r\n"
        b"--" + boundary + b"\r\n"
        b'Content-Type: application/pgp-signature; name="signature.asc"\r\n'
        b"Content-Description: OpenPGP digital signature\r\n"
        b'Content-Disposition: attachment; filename="signature.asc"\r\n'
        b"\r\n"
        + canonical_crlf(signature)
        + b"--" + boundary + b"--\r\n"
    )


def encrypted_entity(outer: bytes, armored: bytes, boundary: bytes) -> bytes:
    """A `multipart/encrypted` message (RFC 3156 §4) under the `outer` header fields."""
    return (
        outer
        + b"MIME-Version: 1.0\r\n"
        b'Content-Type: multipart/encrypted; protocol="application/pgp-encrypted"; '
        b'boundary="' + boundary + b'"\r\n'
        b"\r\n"
        b"This is an OpenPGP/MIME encrypted message (RFC 3156).\r\n"
        b"--" + boundary + b"\r\n"
        b"Content-Type: application/pgp-encrypted\r\n"
        b"Content-Description: PGP/MIME version identification\r\n"
        b"\r\n"
        b"Version: 1\r\n"
        b"\r\n"
        b"--" + boundary + b"\r\n"
        b'Content-Type: application/octet-stream; name="encrypted.asc"\r\n'
        b"Content-Description: OpenPGP encrypted message\r\n"
        b'Content-Disposition: inline; filename="encrypted.asc"\r\n'
        b"\r\n"
        + canonical_crlf(armored)
        + b"--" + boundary + b"--\r\n"
    )


def text_entity(entity: Entity, text: bytes) -> bytes:
    """`entity` with `text` as its body: transfer encoding set to what the text needs."""
    kept = b"".join(
        canonical_crlf(raw.rstrip(b"\r\n")) + b"\r\n"
        for name, raw in field_blocks(entity.head)
        if name != "content-transfer-encoding"
    )
    body = canonical_crlf(text)
    encoding = b"7bit" if all(b < 0x80 for b in body) else b"8bit"
    return kept + b"Content-Transfer-Encoding: " + encoding + b"\r\n\r\n" + body
