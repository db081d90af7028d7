"""PGP/MIME structure (RFC 3156) and inline armored blocks, on the raw octets of a message.

RFC 3156 §5: the signature of a `multipart/signed` covers the first body part exactly as it
arrived, line breaks made CRLF. The parts are cut from the received octets
(`adapters.cms.entity`, never Python's `email` serializer, which rewrites headers and line
ends). RFC 3156 §4 and §6.1: `multipart/encrypted` carries `application/pgp-encrypted`
("Version: 1") then the armored message; signed-then-encrypted mail nests a
`multipart/signed` inside it, which is what `signed_entity` and `encrypted_entity` build.

Inline armored text (RFC 9580 §6, §7) is recognised only when the whole body is one block:
text around a block is unprotected and must never pass as part of a signed or encrypted whole
(EFAIL-style wrapping, Thunderbird's partial-inline rule). The text inside a block goes on as
the octets the sender wrote (`text_part`, `cleartext`): HPRIM reports and EHR imports depend
on their line ends and charset, so neither is rewritten (RFC 2045 §6.8 base64 when SMTP could
not carry them).

Untrusted input: every entity handed to the readers here. Armor markers are found with
`bytes.find`, one pass each, never with a backtracking regular expression: a body full of
BEGIN lines without an END must cost no more than reading it.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Callable
from dataclasses import dataclass

from adapters.cms.entity import Entity, field_blocks

__all__ = [
    "ROUTING_FIELDS",
    "ArmoredBody",
    "canonical_crlf",
    "charset_label",
    "clear_fields",
    "cleartext",
    "encrypted_entity",
    "find_armored",
    "new_boundary",
    "outer_fields",
    "same_signed_text",
    "signed_entity",
    "text_entity",
    "text_part",
    "whole_armored",
]

_BEGIN_MESSAGE = b"-----BEGIN PGP MESSAGE-----"
_BEGIN_SIGNED = b"-----BEGIN PGP SIGNED MESSAGE-----"
_BEGIN_SIGNATURE = b"-----BEGIN PGP SIGNATURE-----"
_END_MESSAGE = b"-----END PGP MESSAGE-----"
_END_SIGNATURE = b"-----END PGP SIGNATURE-----"
_LINE_BREAK = re.compile(rb"\r\n|\r|\n")
_CHARSET_TOKEN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:+-]{0,39}")
_MAX_LINE = 998  # RFC 5322 §2.1.1, without the CRLF
# Header fields repeated on the encrypted envelope so that MTAs route it and clients list it;
# the authoritative copies travel inside, signed.
ROUTING_FIELDS = (
    "from", "sender", "reply-to", "to", "cc", "subject", "date", "message-id",
    "in-reply-to", "references",
    # A client offers a read receipt (RFC 8098 §2.1) from the header it shows, the outer one.
    "disposition-notification-to", "disposition-notification-options",
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


def clear_fields(head: bytes) -> bytes:
    """Every header field but the MIME ones, CRLF-terminated: a layout whose header block
    travels in clear and is all its reader sees (Apicrypt) keeps the sender's fields there —
    receipt requests, MSSanté `X-MSS-*` — while the new body brings its own MIME fields."""
    return b"".join(
        canonical_crlf(raw.rstrip(b"\r\n")) + b"\r\n"
        for name, raw in field_blocks(head)
        if not name.startswith("content-") and name != "mime-version"
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


def cleartext(block: bytes) -> bytes | None:
    """The text of a cleartext-signed block (RFC 9580 §7) as GnuPG prints it, else None.

    Every line between the armor headers' empty line and the signature armor line, dash
    escapes removed, each with its own line break, the last one included. RFC 9580 §7.1 leaves
    that last line break out of what the signature covers; GnuPG writes a text's final line
    break there and `gpg --decrypt` prints it back, so a newline-terminated HPRIM file comes
    out whole. The caller checks the result against what pysequoia verified
    (`same_signed_text`) before handing it on.
    """
    lines = iter(block.splitlines(keepends=True))
    first = next(lines, b"")
    if first.rstrip() != _BEGIN_SIGNED:
        return None
    for line in lines:  # armor headers ("Hash: SHA256"), then one blank line
        if not line.strip():
            break
    else:
        return None
    text: list[bytes] = []
    for line in lines:
        if line.startswith(_BEGIN_SIGNATURE):
            return b"".join(text)
        text.append(line[2:] if line.startswith(b"- ") else line)
    return None


def same_signed_text(printed: bytes, verified: bytes) -> bool:
    """Whether `printed` (from `cleartext`) is the text pysequoia verified, up to what a
    cleartext signature does not cover (RFC 9580 §7.2): the form of line breaks, spaces and
    tabs at the end of lines, and the line break before the signature armor."""
    if printed.endswith(b"\r\n"):
        printed = printed[:-2]
    elif printed.endswith((b"\n", b"\r")):
        printed = printed[:-1]
    return _signed_form(printed) == _signed_form(verified)


def _signed_form(text: bytes) -> bytes:
    return b"\r\n".join(line.rstrip(b" \t") for line in canonical_crlf(text).split(b"\r\n"))


def charset_label(charset: str) -> str:
    """`charset` if it is a plausible charset token, else `unknown-8bit` (RFC 1428)."""
    return charset.lower() if _CHARSET_TOKEN.fullmatch(charset) else "unknown-8bit"


def text_part(text: bytes, charset: str) -> bytes:
    """A text/plain entity whose decoded body is exactly `text`, labelled `charset`.

    SMTP carries lines ending in CRLF, at most 998 octets, no NUL; and the line break before
    the end of the data belongs to the SMTP terminator. Text that is all such lines goes as it
    is (7bit or 8bit). Anything else (bare LF or CR as HPRIM files often have, a missing final
    line break, long lines) goes in base64: its decoder yields the octets unchanged. Not
    quoted-printable: its line breaks stand for CRLF (RFC 2045 §6.7), so a bare LF would have to
    be written =0A, and decoders that re-canonicalise text line breaks differ on it; base64 is
    also what `adapters.cms.entity.seven_bit` uses, so the gateway has one rule for this.
    """
    lines = text.split(b"\r\n")
    plain = (
        (not text or text.endswith(b"\r\n")) and canonical_crlf(text) == text
        and b"\x00" not in text and all(len(line) <= _MAX_LINE for line in lines)
    )
    head = b"Content-Type: text/plain; charset=" + charset_label(charset).encode("ascii") + b"\r\n"
    if plain:
        encoding = b"7bit" if text.isascii() else b"8bit"
        return head + b"Content-Transfer-Encoding: " + encoding + b"\r\n\r\n" + text
    encoded = base64.b64encode(text)
    body = b"".join(encoded[i: i + 76] + b"\r\n" for i in range(0, len(encoded), 76))
    return head + b"Content-Transfer-Encoding: base64\r\n\r\n" + body


def text_entity(entity: Entity, text: bytes, charset: str) -> bytes:
    """`entity` with `text` as its body (`text_part`): its Content-Type and transfer encoding
    described the armored block, so they are replaced; its other fields are kept."""
    kept = b"".join(
        canonical_crlf(raw.rstrip(b"\r\n")) + b"\r\n"
        for name, raw in field_blocks(entity.head)
        if name not in ("content-type", "content-transfer-encoding")
    )
    return kept + text_part(text, charset)
