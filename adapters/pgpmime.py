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

Untrusted input: every entity handed to the readers here. Armor markers are found with
`bytes.find`, one pass each, never with a backtracking regular expression: a body full of
BEGIN lines without an END must cost no more than reading it.
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

_BEGIN_MESSAGE = b"-----BEGIN PGP MESSAGE-----"
_BEGIN_SIGNED = b"-----BEGIN PGP SIGNED MESSAGE-----"
_BEGIN_SIGNATURE = b"-----BEGIN PGP SIGNATURE-----"
_END_MESSAGE = b"-----END PGP MESSAGE-----"
_END_SIGNATURE = b"-----END PGP SIGNATURE-----"
_LINE_BREAK = re.compile(rb"\r\n|\r|\n")
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
    return _LINE_BREAK.sub(b"\r\n", data)


@dataclass(frozen=True)
class ArmoredBody:
    kind: str  # "message" (PGP MESSAGE) or "cleartext" (PGP SIGNED MESSAGE)
    block: bytes


def _line_starts(text: bytes, marker: bytes) -> int:
    """How many lines of `text` begin with `marker` (dash-escaped lines do not)."""
    return text.startswith(marker) + text.count(b"\n" + marker) + text.count(b"\r" + marker)


def whole_armored(text: bytes) -> ArmoredBody | None:
    """The armored block when it is the entire body (whitespace aside), else None.

    One block only: a second BEGIN or END line inside means text of another block (or none)
    would ride along with the first.
    """
    stripped = text.strip(b" \t\r\n")
    if stripped.startswith(_BEGIN_MESSAGE) and stripped.endswith(_END_MESSAGE):
        if _line_starts(stripped, b"-----BEGIN PGP") != 1 or (
            _line_starts(stripped, b"-----END PGP") != 1
        ):
            return None
        return ArmoredBody("message", stripped + b"\n")
    if stripped.startswith(_BEGIN_SIGNED) and stripped.endswith(_END_SIGNATURE):
        if _line_starts(stripped, b"-----BEGIN PGP") != 2 or (
            _line_starts(stripped, _BEGIN_SIGNATURE) != 1
            or _line_starts(stripped, b"-----END PGP") != 1
        ):
            return None
        return ArmoredBody("cleartext", stripped + b"\n")
    return None


def find_armored(text: bytes) -> bool:
    """True when an armored block (a BEGIN line, later an END line) appears anywhere in
    `text` (for audit notes). Linear: the earliest BEGIN, then one search for an END."""
    starts = [at for at in (text.find(_BEGIN_MESSAGE), text.find(_BEGIN_SIGNED)) if at >= 0]
    if not starts:
        return False
    first = min(starts)
    return text.find(_END_MESSAGE, first) >= 0 or text.find(_END_SIGNATURE, first) >= 0


def new_boundary(random: Callable[[int], bytes], avoid: bytes, prefix: str) -> bytes:
    while True:
        boundary = f"----={prefix}_".encode("ascii") + random(12).hex().encode("ascii")
        if boundary not in avoid:
            return boundary


def outer_fields(head: bytes) -> bytes:
    """The routing header fields of a head, CRLF-terminated, for an envelope."""
    return b"".join(
        canonical_crlf(raw.rstrip(b"\r\n")) + b"\r\n"
        for name, raw in field_blocks(head)
        if name in ROUTING_FIELDS or name in TRACE_FIELDS
    )


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
