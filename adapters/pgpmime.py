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
BEGIN lines without an END must cost no more than reading it. Bodies (up to the largest
message accepted) are scanned and rewritten with bytes methods that run in C (`count`,
`find`, `replace`, `split`), a Python loop per line only where lines must be looked at one
by one (armor headers, lines ending in blanks), and come back as they are when nothing needs
changing.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from adapters.cms.entity import Entity, field_blocks

__all__ = [
    "ROUTING_FIELDS",
    "ArmoredBody",
    "base64_body",
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
    "text_part_pieces",
    "whole_armored",
]

_BEGIN_MESSAGE = b"-----BEGIN PGP MESSAGE-----"
_BEGIN_SIGNED = b"-----BEGIN PGP SIGNED MESSAGE-----"
_BEGIN_SIGNATURE = b"-----BEGIN PGP SIGNATURE-----"
_END_MESSAGE = b"-----END PGP MESSAGE-----"
_END_SIGNATURE = b"-----END PGP SIGNATURE-----"
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
    """Every line break (CRLF, lone CR, lone LF) as CRLF (RFC 3156 §5 canonical form for
    signed parts); `data` itself when it already is."""
    carriage_returns = data.count(b"\r")
    if not carriage_returns:
        return data.replace(b"\n", b"\r\n")
    line_feeds = data.count(b"\n")
    if carriage_returns == line_feeds and data.count(b"\r\n") == line_feeds:
        return data
    # CRLF first becomes LF so that each line break, whatever its form, is one LF.
    return data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")


def base64_body(data: bytes) -> bytes:
    """RFC 2045 §6.8 base64 of `data` in lines of 76 characters, each ended by CRLF."""
    encoded = base64.b64encode(data)
    lines = [encoded[at: at + 76] for at in range(0, len(encoded), 76)]
    lines.append(b"")  # the last line's CRLF
    return b"\r\n".join(lines) if encoded else b""


@dataclass(frozen=True)
class ArmoredBody:
    kind: str  # "message" (PGP MESSAGE) or "cleartext" (PGP SIGNED MESSAGE)
    block: bytes


def _line_starts(text: bytes, marker: bytes) -> int:
    """How many lines of `text` begin with `marker` (dash-escaped lines do not)."""
    found = text.find(marker)
    if found < 0:
        return 0
    if text.find(marker, found + 1) < 0:  # the usual single occurrence: one search, not three
        return int(found == 0 or text[found - 1] in b"\r\n")
    return text.startswith(marker) + text.count(b"\n" + marker) + text.count(b"\r" + marker)


def whole_armored(text: bytes) -> ArmoredBody | None:
    """The armored block when it is the entire body (whitespace aside), else None.

    One block only: a second BEGIN or END line inside means text of another block (or none)
    would ride along with the first.
    """
    start, end = _blank_ends(text)
    stripped = memoryview(text)[start:end]  # looked at in place; copied once, below
    if stripped[:len(_BEGIN_MESSAGE)] == _BEGIN_MESSAGE and stripped[-len(_END_MESSAGE):] == (
        _END_MESSAGE
    ):
        kind = "message"
    elif stripped[:len(_BEGIN_SIGNED)] == _BEGIN_SIGNED and stripped[-len(_END_SIGNATURE):] == (
        _END_SIGNATURE
    ):
        kind = "cleartext"
    else:
        return None
    block = b"".join((stripped, b"\n"))
    if kind == "message":
        if not _dashless_between(block, _BEGIN_MESSAGE, _END_MESSAGE) and (
            _line_starts(block, b"-----BEGIN PGP") != 1
            or _line_starts(block, b"-----END PGP") != 1
        ):
            return None
    elif _line_starts(block, b"-----BEGIN PGP") != 2 or (
        _line_starts(block, _BEGIN_SIGNATURE) != 1 or _line_starts(block, b"-----END PGP") != 1
    ):
        return None
    return ArmoredBody(kind, block)


_BLANKS = b" \t\r\n"


def _blank_ends(text: bytes) -> tuple[int, int]:
    """(start, end) of `text` without the spaces, tabs and line breaks at either end, found
    without copying it as `bytes.strip` would: a run of blanks is stripped a slice at a time."""
    start = 0
    while start < len(text):
        head = text[start: start + 4096]
        kept = len(head.lstrip(_BLANKS))
        start += len(head) - kept
        if kept:
            break
    end = len(text)
    while end > start:
        tail = text[max(start, end - 4096): end]
        kept = len(tail.rstrip(_BLANKS))
        end -= len(tail) - kept
        if kept:
            break
    return start, end


def _dashless_between(block: bytes, begin: bytes, end: bytes) -> bool:
    """Whether only the first and the last line of `block` (`begin`'s, `end`'s, then a line
    break) can be armor lines: no dash between the two markers (base64 has none), and `end`
    starts a line. One search for one octet, where counting armor lines takes several
    searches for longer strings."""
    inside = len(block) - 1 - len(end)
    if inside <= len(begin):
        return False
    return block.find(b"-", len(begin), inside) < 0 and block[inside - 1] in b"\r\n"


def find_armored(text: bytes) -> bool:
    """True when an armored block (a BEGIN line, later an END line) appears anywhere in
    `text` (for audit notes). Linear: the earliest BEGIN, then one search for an END."""
    starts = [at for at in (text.find(_BEGIN_MESSAGE), text.find(_BEGIN_SIGNED)) if at >= 0]
    if not starts:
        return False
    first = min(starts)
    return text.find(_END_MESSAGE, first) >= 0 or text.find(_END_SIGNATURE, first) >= 0


def new_boundary(
    random: Callable[[int], bytes], avoid: bytes | Sequence[bytes], prefix: str
) -> bytes:
    """A boundary found in none of `avoid` (the content, whole or as its pieces)."""
    pieces = (avoid,) if isinstance(avoid, bytes) else avoid
    while True:
        boundary = f"----={prefix}_".encode("ascii") + random(12).hex().encode("ascii")
        if not any(boundary in piece for piece in pieces):
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
    return b"".join((  # joined once: `+` would copy the content again at every step
        b"Content-Type: multipart/signed; micalg=", micalg.encode("ascii"),
        b'; protocol="application/pgp-signature"; boundary="', boundary, b'"\r\n'
        b"\r\n"
        b"This is an OpenPGP/MIME signed message (RFC 3156).\r\n"
        b"--", boundary, b"\r\n",
        to_sign,
        b"\r\n--", boundary, b"\r\n"
        b'Content-Type: application/pgp-signature; name="signature.asc"\r\n'
        b"Content-Description: OpenPGP digital signature\r\n"
        b'Content-Disposition: attachment; filename="signature.asc"\r\n'
        b"\r\n",
        canonical_crlf(signature),
        b"--", boundary, b"--\r\n",
    ))


def encrypted_entity(outer: bytes, armored: bytes, boundary: bytes) -> bytes:
    """A `multipart/encrypted` message (RFC 3156 §4) under the `outer` header fields."""
    return b"".join((
        outer,
        b"MIME-Version: 1.0\r\n"
        b'Content-Type: multipart/encrypted; protocol="application/pgp-encrypted"; '
        b'boundary="', boundary, b'"\r\n'
        b"\r\n"
        b"This is an OpenPGP/MIME encrypted message (RFC 3156).\r\n"
        b"--", boundary, b"\r\n"
        b"Content-Type: application/pgp-encrypted\r\n"
        b"Content-Description: PGP/MIME version identification\r\n"
        b"\r\n"
        b"Version: 1\r\n"
        b"\r\n"
        b"--", boundary, b"\r\n"
        b'Content-Type: application/octet-stream; name="encrypted.asc"\r\n'
        b"Content-Description: OpenPGP encrypted message\r\n"
        b'Content-Disposition: inline; filename="encrypted.asc"\r\n'
        b"\r\n",
        canonical_crlf(armored),
        b"--", boundary, b"--\r\n",
    ))


def cleartext(block: bytes) -> bytes | None:
    """The text of a cleartext-signed block (RFC 9580 §7) as GnuPG prints it, else None.

    Every line between the armor headers' empty line and the signature armor line, dash
    escapes removed, each with its own line break, the last one included. RFC 9580 §7.1 leaves
    that last line break out of what the signature covers; GnuPG writes a text's final line
    break there and `gpg --decrypt` prints it back, so a newline-terminated HPRIM file comes
    out whole. The caller checks the result against what pysequoia verified
    (`same_signed_text`) before handing it on. Lines end at CRLF, CR or LF.
    """
    lines = _lines(block)
    first = next(lines, None)
    if first is None or block[:first].rstrip() != _BEGIN_SIGNED:
        return None
    start = first
    for end in lines:  # armor headers ("Hash: SHA256"), then one blank line
        blank = not block[start:end].strip()
        start = end
        if blank:
            break
    else:
        return None
    signature = _first_line_starting(block, _BEGIN_SIGNATURE, start)
    if signature < 0:
        return None
    text = block[start:signature]
    # A dash-escaped line starts with "- " (RFC 9580 §7.2): at the start, or after a break.
    unescaped = text.replace(b"\n- ", b"\n").replace(b"\r- ", b"\r")
    return unescaped[2:] if unescaped.startswith(b"- ") else unescaped


def _lines(data: bytes) -> Iterator[int]:
    """Where each line of `data` ends, after its line break (CRLF, CR or LF), lazily. The next
    CR and the next LF are each searched for once, not once per line."""
    next_lf = next_cr = -2  # -2: to be searched for; -1: none left
    at = 0
    while at < len(data):
        if next_lf != -1 and next_lf < at:
            next_lf = data.find(b"\n", at)
        if next_cr != -1 and next_cr < at:
            next_cr = data.find(b"\r", at)
        found = [position for position in (next_lf, next_cr) if position >= 0]
        if not found:
            yield len(data)
            return
        brk = min(found)
        at = brk + 2 if data[brk: brk + 2] == b"\r\n" else brk + 1
        yield at


def _first_line_starting(data: bytes, marker: bytes, start: int) -> int:
    """Where the first line of `data[start:]` that begins with `marker` starts, or -1."""
    found = data.find(marker, start)
    while found >= 0 and found != start and data[found - 1] not in b"\r\n":
        found = data.find(marker, found + 1)
    return found


def same_signed_text(printed: bytes, verified: bytes) -> bool:
    """Whether `printed` (from `cleartext`) is the text pysequoia verified, up to what a
    cleartext signature does not cover (RFC 9580 §7.2): the form of line breaks, spaces and
    tabs at the end of lines, and the line break before the signature armor."""
    if printed.endswith(b"\r\n"):
        printed = printed[:-2]
    elif printed.endswith((b"\n", b"\r")):
        printed = printed[:-1]
    printed, verified = canonical_crlf(printed), canonical_crlf(verified)
    return printed == verified or _without_trailing_blanks(printed) == (
        _without_trailing_blanks(verified)
    )


def _without_trailing_blanks(canonical: bytes) -> bytes:
    return b"\r\n".join([line.rstrip(b" \t") for line in canonical.split(b"\r\n")])


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
    return b"".join(text_part_pieces(text, charset))


def text_part_pieces(text: bytes, charset: str) -> tuple[bytes, bytes]:
    """`text_part` as (head with its empty line, body), for a caller that joins the parts of
    a message once: the body is `text` itself when it goes as it is."""
    head = b"Content-Type: text/plain; charset=" + charset_label(charset).encode("ascii") + b"\r\n"
    if _smtp_lines(text):
        encoding = b"7bit" if text.isascii() else b"8bit"
        return head + b"Content-Transfer-Encoding: " + encoding + b"\r\n\r\n", text
    return head + b"Content-Transfer-Encoding: base64\r\n\r\n", base64_body(text)


def _smtp_lines(text: bytes) -> bool:
    """Whether `text` is all lines SMTP carries as they are: each ended by CRLF (no lone CR
    or LF), at most 998 octets, no NUL."""
    if not text:
        return True
    if not text.endswith(b"\r\n") or b"\x00" in text:
        return False
    lines = text.split(b"\r\n")
    breaks = len(lines) - 1
    return (text.count(b"\r") == breaks and text.count(b"\n") == breaks
            and max(map(len, lines)) <= _MAX_LINE)


def text_entity(entity: Entity, text: bytes, charset: str) -> tuple[bytes, bytes]:
    """`entity` with `text` as its body (`text_part`), as (header fields, body): its
    Content-Type and transfer encoding described the armored block, so they are replaced;
    its other fields are kept. The empty line between the two is the caller's to write."""
    kept = b"".join(
        canonical_crlf(raw.rstrip(b"\r\n")) + b"\r\n"
        for name, raw in field_blocks(entity.head)
        if name not in ("content-type", "content-transfer-encoding")
    )
    head, body = text_part_pieces(text, charset)
    return kept + head[:-2], body  # the head without its empty line
