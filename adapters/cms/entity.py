"""Raw MIME entities as bytes: split, look inside, and make 7-bit clean, never re-serialize.

S/MIME signatures cover exact bytes (RFC 8551 §3.1.1, RFC 5751 §3.1.1): the first part of a
`multipart/signed` is verified over the octets that arrived, and the content the gateway signs
must come out of the recipient's decoder bit for bit. Python's `email` package re-folds headers
and rewrites line endings when it serializes, so this module works on the raw octets and only
borrows `email` to parse single header *values* (Content-Type parameters, addresses).

Followed: RFC 5322 (header section), RFC 2045/2046 (Content-Type, Content-Transfer-Encoding,
multipart delimiters: the line break before a delimiter belongs to the delimiter), RFC 8551
§3.1.2/§3.1.3 (7-bit transfer encoding and canonical CRLF for signed content).

Untrusted input: every entity handed in (received mail, or the inner content to be signed).
Everything here is linear in the size of its input, whatever the input looks like: values
are built from lists of pieces joined once (never `bytes +=` in a loop), lines are read
lazily up to the end of the header block, MIME nesting is bounded (`MAX_DEPTH`), and a
Content-Type value longer than `MAX_CONTENT_TYPE` is refused before `email`'s parameter
parser, which is quadratic in the number of `;`, ever sees it. Bodies (up to the largest
message accepted, several MiB) are scanned with bytes methods that run in C (`find`,
`count`, `isascii`, `translate`, `replace`), never a Python loop or a regular expression per
octet, and are not copied when they are already in the form asked for.
"""

from __future__ import annotations

import base64
import binascii
import email.message
import email.utils
import functools
import quopri
import re
from collections.abc import Iterator
from dataclasses import dataclass

__all__ = [
    "MAX_CONTENT_TYPE",
    "MAX_DEPTH",
    "Entity",
    "address_of",
    "base64_lines",
    "crlf",
    "decode_body",
    "field_blocks",
    "multipart_parts",
    "parse_entity",
    "seven_bit",
]

_FIELD_NAME = re.compile(rb"^([!-9;-~]+)[ \t]*:")
_LINE = re.compile(rb"[^\r\n]*(?:\r\n|\n|\r(?!\n)|$)")
_PADDING = re.compile(rb"[ \t]*")  # RFC 2046 transport-padding after a delimiter

# Deeper MIME nesting than this is no mail client's output; each level is scanned once, so the
# bound keeps 7-bit preparation linear in the size of the message.
MAX_DEPTH = 64
# Real Content-Type fields are well under 1 KiB, RFC 2231 continuations included.
MAX_CONTENT_TYPE = 8192
# Every octet but the base64 alphabet and its padding, deleted before decoding.
_BASE64_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/="
_NOT_BASE64 = bytes(sorted(set(range(256)) - set(_BASE64_ALPHABET)))


@dataclass(frozen=True)
class Entity:
    """One MIME entity: its header block and body, both exactly as they arrived."""

    head: bytes  # header fields including their line breaks, without the empty line
    separator: bytes  # the empty line between head and body (b"\r\n", b"\n" or b"")
    body: bytes
    fields: tuple[tuple[str, str], ...]  # (lower-case name, unfolded value), in order

    def get(self, name: str) -> str | None:
        wanted = name.lower()
        for field_name, value in self.fields:
            if field_name == wanted:
                return value
        return None

    def content_type(self) -> tuple[str, dict[str, str]]:
        """("type/subtype" lower-cased, parameters); text/plain when absent (RFC 2045 §5.2)."""
        value = self.get("content-type")
        if value is None:
            return "text/plain", {}
        if len(value) > MAX_CONTENT_TYPE:
            raise ValueError(f"Content-Type field longer than {MAX_CONTENT_TYPE} characters")
        media_type, params = _content_type(value)
        return media_type, dict(params)  # the caller's own copy of the remembered answer

    def transfer_encoding(self) -> str:
        return (self.get("content-transfer-encoding") or "7bit").strip().lower()


@functools.lru_cache(maxsize=512)
def _content_type(value: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    """The parsed Content-Type value, remembered: the same few values (one per kind of part
    and per boundary) come back in every message, and `email`'s parser is slow."""
    holder = email.message.Message()
    holder["Content-Type"] = value
    params: dict[str, str] = {}
    for key, param in holder.get_params(failobj=[])[1:]:
        text = email.utils.collapse_rfc2231_value(param) if isinstance(param, tuple) else param
        params[key.lower()] = str(text)
    return holder.get_content_type(), tuple(params.items())


def _lines(data: bytes) -> Iterator[bytes]:
    """Lines with their own terminators, lazily, so joining them gives `data` back."""
    for match in _LINE.finditer(data):
        line = match.group(0)
        if not line:  # the empty match at the very end
            return
        yield line


def parse_entity(raw: bytes) -> Entity:
    """Split a header block from its body at the first empty line (either line ending)."""
    offset = 0
    # Each field's value as its pieces (first line, then each continuation line), joined
    # once at the end: a field folded over a million lines stays linear.
    fields: list[tuple[str, list[bytes]]] = []
    separator = b""
    for line in _lines(raw):
        stripped = line.rstrip(b"\r\n")
        if stripped == b"":
            separator = line
            break
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1][1].append(stripped.strip())
        else:
            match = _FIELD_NAME.match(stripped)
            if match is None:
                # RFC 5322 has no such line: treat it as the start of the body, as
                # mail readers do, rather than guess at a header.
                break
            fields.append((match.group(1).decode("ascii").lower(),
                           [stripped[match.end():].strip()]))
        offset += len(line)
    head = raw[:offset]
    body = raw[offset + len(separator):]
    decoded = tuple(
        (name, b" ".join(pieces).decode("utf-8", "replace")) for name, pieces in fields
    )
    return Entity(head=head, separator=separator, body=body, fields=decoded)


def field_blocks(head: bytes) -> list[tuple[str, bytes]]:
    """Each header field of a head as (lower-case name, raw octets with continuation lines)."""
    blocks: list[tuple[str, list[bytes]]] = []
    for line in _lines(head):
        if line[:1] in (b" ", b"\t") and blocks:
            blocks[-1][1].append(line)
            continue
        match = _FIELD_NAME.match(line)
        if match is None:
            continue
        blocks.append((match.group(1).decode("ascii").lower(), [line]))
    return [(name, b"".join(lines)) for name, lines in blocks]


def multipart_parts(body: bytes, boundary: str) -> tuple[bytes, list[bytes], bytes]:
    """(preamble, parts, epilogue) of a multipart body, each part as its exact octets.

    RFC 2046 §5.1.1: the line break before `--boundary` belongs to the delimiter, so a part
    ends just before it. A delimiter is `--boundary` at the start of the body or after a line
    break (CRLF or bare LF), optionally `--` (the closing one), optional spaces and tabs, then
    a line break or the end of the body. The search resumes after the line break that ended
    the previous delimiter, so that line break never also starts the next one. Raises
    ValueError when there is no closing delimiter.
    """
    if not boundary or len(boundary) > 200:
        raise ValueError("bad multipart boundary")
    delimiter = b"--" + boundary.encode("ascii")
    parts: list[bytes] = []
    preamble = b""
    start: int | None = None
    position = 0  # where the next delimiter (with its leading line break) may begin
    found = body.find(delimiter)
    while found >= 0:
        match = _delimiter_at(body, found, len(delimiter), position)
        if match is None:
            found = body.find(delimiter, found + 1)
            continue
        begin, closing, end = match
        if start is None:
            preamble = body[:begin]
        else:
            parts.append(body[start:begin])
        if closing:
            return preamble, parts, body[end:]
        start = position = end
        found = body.find(delimiter, end)
    raise ValueError("multipart body has no closing delimiter")


def _delimiter_at(
    body: bytes, found: int, length: int, position: int
) -> tuple[int, bool, int] | None:
    """(start with the line break before, closing?, end after the line break after) of the
    delimiter line whose `--boundary` is at `found`, or None when it is not one."""
    if found == 0:
        begin = 0
    elif found >= position + 2 and body[found - 2: found] == b"\r\n":
        begin = found - 2
    elif found >= position + 1 and body[found - 1: found] == b"\n":
        begin = found - 1
    else:
        return None
    at = found + length
    closing = body[at: at + 2] == b"--"
    if closing:
        at += 2
    padding = _PADDING.match(body, at)  # in C: a hostile run of spaces costs no Python loop
    at = padding.end() if padding else at
    if at == len(body):
        return begin, closing, at
    if body[at: at + 2] == b"\r\n":
        return begin, closing, at + 2
    if body[at: at + 1] == b"\n":
        return begin, closing, at + 1
    return None


def decode_body(entity: Entity) -> bytes:
    """The body with its Content-Transfer-Encoding removed."""
    encoding = entity.transfer_encoding()
    if encoding == "base64":
        try:
            # RFC 2045 §6.8: octets outside the alphabet (line breaks) are ignored.
            return base64.b64decode(entity.body.translate(None, _NOT_BASE64), validate=True)
        except (binascii.Error, ValueError) as error:
            raise ValueError(f"bad base64 body: {error}") from None
    if encoding == "quoted-printable":
        return quopri.decodestring(entity.body)
    return entity.body


def address_of(value: str | None) -> str | None:
    """The one mail address of a From:-style header value, lower-cased; None if not exactly one."""
    if not value:
        return None
    found = [a for _, a in email.utils.getaddresses([value]) if a]
    if len(found) != 1 or "@" not in found[0]:
        return None
    return found[0].lower()


# -- making content fit to be signed (RFC 8551 §3.1) -----------------------------------------

def _canonical_line_breaks(data: bytes) -> bool:
    """Whether every CR is followed by LF and every LF preceded by CR."""
    pairs = data.count(b"\r\n")
    return data.count(b"\r") == pairs and data.count(b"\n") == pairs


def crlf(data: bytes) -> bytes:
    """`data` with each CRLF, bare CR and bare LF as one CRLF (`data` itself if canonical)."""
    if _canonical_line_breaks(data):
        return data
    # CRLF first becomes LF so that each line break, whatever its form, is one LF.
    return data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")


def _is_seven_bit_clean(body: bytes) -> bool:
    """RFC 5322 §2.1.1 / RFC 2045 §2.7: US-ASCII without NUL, CRLF line breaks only, lines of
    at most 998 octets."""
    if not body.isascii() or b"\x00" in body:
        return False
    if len(body) <= 998:
        return _canonical_line_breaks(body)
    lines = body.split(b"\r\n")
    breaks = len(lines) - 1  # CRLFs; canonical when there is no other CR or LF
    return (body.count(b"\r") == breaks and body.count(b"\n") == breaks
            and max(map(len, lines)) <= 998)


def base64_lines(data: bytes) -> bytes:
    """RFC 2045 §6.8 base64 in lines of 76 characters, each ended by CRLF."""
    encoded = base64.b64encode(data)
    lines = [encoded[i: i + 76] for i in range(0, len(encoded), 76)]
    lines.append(b"")  # the last line's CRLF
    return b"\r\n".join(lines) if encoded else b""


def _replace_transfer_encoding(head: bytes, encoding: bytes) -> bytes:
    out: list[bytes] = []
    skipping = False
    for line in _lines(crlf(head)):
        if line[:1] in (b" ", b"\t"):
            if not skipping:
                out.append(line)
            continue
        skipping = line.lower().startswith(b"content-transfer-encoding:")
        if not skipping:
            out.append(line)
    out.append(b"Content-Transfer-Encoding: " + encoding + b"\r\n")
    return b"".join(out)


def seven_bit(raw: bytes) -> bytes:
    """`raw` with CRLF line breaks and every leaf part 7-bit clean, decoded bytes unchanged.

    A leaf whose body is not 7-bit clean (8-bit octets, NUL, bare CR or LF, lines over 998
    octets) is re-encoded as base64 from its exact decoded bytes, so what the recipient's
    decoder yields is what the sender wrote. Clean leaves and all structure pass unchanged
    apart from line breaks made canonical. Raises ValueError for MIME nested deeper than
    `MAX_DEPTH`.
    """
    out: list[bytes] = []
    _seven_bit(raw, out, 0)
    return b"".join(out)


def _seven_bit(raw: bytes, out: list[bytes], depth: int) -> None:
    """Append the 7-bit form of `raw` to `out` (pieces, joined once by the caller)."""
    if depth > MAX_DEPTH:
        raise ValueError(f"MIME structure nested deeper than {MAX_DEPTH} levels")
    entity = parse_entity(raw)
    media_type, params = entity.content_type()
    head = crlf(entity.head)
    if media_type in ("application/pkcs7-mime", "application/x-pkcs7-mime"):
        # Base64 of someone's CMS: only its line breaks may change.
        out += (head, b"\r\n", crlf(entity.body))
        return
    if media_type.startswith("multipart/") and "boundary" in params:
        try:
            preamble, parts, epilogue = multipart_parts(entity.body, params["boundary"])
        except ValueError:
            parts = []
            preamble = epilogue = b""
        if parts:
            delimiter = b"--" + params["boundary"].encode("ascii")
            out += (head, b"\r\n", crlf(preamble))
            for index, part in enumerate(parts):
                out += (b"\r\n" if index or preamble else b"", delimiter, b"\r\n")
                if index == 0 and media_type == "multipart/signed":
                    # Someone's signature covers these octets exactly: re-encoding them
                    # would break it (RFC 8551 §3.1 asks the *signer* to make them 7-bit).
                    out.append(part)
                else:
                    _seven_bit(part, out, depth + 1)
            out += (b"\r\n", delimiter, b"--\r\n", crlf(epilogue))
            return
    if media_type == "message/rfc822" and entity.transfer_encoding() in ("7bit", "8bit"):
        out += (head, b"\r\n")
        _seven_bit(entity.body, out, depth + 1)
        return
    encoding = entity.transfer_encoding()
    if encoding in ("base64", "quoted-printable"):
        # Already a 7-bit encoding: its line breaks are not part of the decoded octets.
        out += (head, b"\r\n", crlf(entity.body))
        return
    if _is_seven_bit_clean(entity.body):
        out += (head, b"\r\n", entity.body)
        return
    out += (_replace_transfer_encoding(entity.head, b"base64"), b"\r\n",
            base64_lines(entity.body))
