"""Trace headers the gateway adds to the inner message, and forged verdicts it removes first.

Followed: RFC 5321 §4.4 (Received), RFC 5322 §2.2, §3.2.2 and §3.6 (field syntax, folding,
CFWS), RFC 8601 §2.2 and §5 (Authentication-Results; fields claiming our authserv-id are
removed), RFC 7281 (the `smime` method's properties), RFC 8617 §4.1.1 (ARC-Authentication-
Results: the authserv-id follows the instance tag), RFC 2045 §5.1 (token, quoted-string),
RFC 4514 (distinguished names as strings).

Untrusted input: the header block of the unwrapped message; and, among what we write, every
value that comes from a peer or a certificate: HELO name, peer certificate subject, recipient,
signer address (X.509 rfc822Name/emailAddress, OpenPGP user ID), serial, issuer, fingerprint.

Writing. Each field is printable US-ASCII, folded with CRLF TAB and nothing else; a value that
cannot be written safely is left out, never cut short (a truncated identity names someone
else), and `Authentication-Results` then says which property was withheld.
- Addresses (signer, recipient) only as a bare addr-spec: dot-atom local part, LDH domain. A
  quoted form such as `"x; smime=pass"@y` is valid RFC 8601, but a reader that splits on `;`
  would find a second result in it, so such addresses are withheld instead.
- Serials and fingerprints only as RFC 2045 tokens.
- Distinguished names (issuer, peer subject) are made ASCII with RFC 4514 hex escapes, which
  name the same DN (`\\C3\\B4` for ô, `\\3B` for `;`), then quoted (Authentication-Results) or
  put in a comment (Received).
- Free text (the verdict's reason, a HELO that is not a domain) only in comments, with controls
  and non-ASCII as `?`.
Non-ASCII is never written raw: RFC 6532 UTF-8 fields are only allowed when every hop supports
SMTPUTF8, which the gateway cannot know for a message that its recipient's client will parse
after decryption; hex escapes and omission are safe for any reader.

Removing. The header block (up to the first empty line; CRLF, bare LF and bare CR each end a
line, as they do for common parsers) is read field by field, in one pass with no backtracking,
and these fields are cut out whole, continuation lines included:
- `Authentication-Results` and `ARC-Authentication-Results` whose authserv-id is ours: found
  after any CFWS (folds, nested comments, quoted-pairs), unquoted, compared without case and
  without trailing dots. Also those whose authserv-id cannot be read at all (an RFC 2047
  encoded-word, an unclosed comment, a control or non-ASCII byte glued to it): no valid field
  lacks one, and a lenient reader could still credit it to us.
- `X-Passerelle` and `X-Passerelle-*`: our name space. The gateway never writes such a field
  into a message it delivers, so any copy is someone speaking in its name.
Every other byte, in the header block and below it, stays as the sender wrote it.
"""

from __future__ import annotations

import datetime as dt
import email.utils
import ipaddress
import re
from collections.abc import Iterator

from adapters.base import Verdict
from gateway.envelope import Envelope

__all__ = ["add_trace", "authentication_results", "received", "strip_forged_results"]

# -- reading the sender's header block --------------------------------------------------------

_LINE_END = re.compile(rb"\r\n|\r|\n")
_FIELD_NAME = re.compile(rb"([!-9;-~]+)[ \t]*:")
_RESULTS = frozenset({b"authentication-results", b"arc-authentication-results"})
_OURS = b"x-passerelle"
_TOKEN_OCTETS = frozenset(set(range(0x21, 0x7F)) - set(b'()<>@,;:\\"/[]?='))
_SPACE_OCTETS = frozenset(b" \t\r\n")
_AFTER_ID = frozenset(b" \t\r\n(;")  # what may follow an authserv-id (RFC 8601 §2.2)


def _lines(message: bytes) -> Iterator[tuple[int, int, int]]:
    """(start, end of text, end with the line break) of each line, lazily."""
    start = 0
    for match in _LINE_END.finditer(message):
        yield start, match.start(), match.end()
        start = match.end()
    if start < len(message):
        yield start, len(message), len(message)


def _skip_cfws(value: bytes, at: int) -> int | None:
    """Index after the white space and comments at `at`; None if a comment is not closed."""
    depth = 0
    while at < len(value):
        octet = value[at]
        if depth:
            if octet == 0x5C:  # quoted-pair: the next octet is literal
                at += 2
                continue
            depth += (octet == 0x28) - (octet == 0x29)
        elif octet == 0x28:
            depth = 1
        elif octet not in _SPACE_OCTETS:
            return at
        at += 1
    return None if depth else at


def _value(value: bytes, at: int) -> tuple[bytes, int] | None:
    """The RFC 2045 value (token or quoted-string, unquoted) at `at`, and the index after it."""
    if at < len(value) and value[at] == 0x22:
        text = bytearray()
        at += 1
        while at < len(value):
            octet = value[at]
            if octet == 0x22:
                return bytes(text), at + 1
            if octet == 0x5C and at + 1 < len(value):
                text.append(value[at + 1])
                at += 2
                continue
            if octet not in (0x0D, 0x0A):  # unfolding removes the line breaks only
                text.append(octet)
            at += 1
        return None
    start = at
    while at < len(value) and value[at] in _TOKEN_OCTETS:
        at += 1
    return (value[start:at], at) if at > start else None


def _after_instance(value: bytes, at: int) -> int | None:
    """ARC: the index after `i=N ;` (RFC 8617 §4.1.1), where the authserv-id begins."""
    if at >= len(value) or value[at] not in b"iI":
        return None
    found = _skip_cfws(value, at + 1)
    if found is None or found >= len(value) or value[found] != 0x3D:
        return None
    start = found = _skip_cfws(value, found + 1)
    while found is not None and found < len(value) and 0x30 <= value[found] <= 0x39:
        found += 1
    if found is None or found == start:
        return None
    found = _skip_cfws(value, found)
    if found is None or found >= len(value) or value[found] != 0x3B:
        return None
    return found + 1


def _authserv_id(name: bytes, value: bytes) -> bytes | None:
    """The authserv-id a results field claims, normalised; None when it cannot be read."""
    at = _skip_cfws(value, 0)
    if at is not None and name == b"arc-authentication-results":
        at = _after_instance(value, at)
        at = None if at is None else _skip_cfws(value, at)
    read = None if at is None else _value(value, at)
    if read is None or (read[1] < len(value) and value[read[1]] not in _AFTER_ID):
        return None
    return _normal_id(read[0])


def _normal_id(text: bytes) -> bytes:
    return text.strip(b" \t").rstrip(b".").lower()


def _forged(message: bytes, start: int, end: int, ours: bytes) -> bool:
    match = _FIELD_NAME.match(message, start, end)
    if match is None:
        return False
    name = match.group(1).lower()
    if name == _OURS or name.startswith(_OURS + b"-"):
        return True
    if name not in _RESULTS:
        return False
    claimed = _authserv_id(name, message[match.end() : end])
    return claimed is None or claimed == ours


def strip_forged_results(message: bytes, authserv_id: str) -> bytes:
    """The message without results fields that claim `authserv-id` (RFC 8601 §5), nor ours."""
    ours = _normal_id(authserv_id.encode("ascii"))
    fields: list[tuple[int, int]] = []  # each field's span, continuation lines included
    body = len(message)
    for start, text_end, end in _lines(message):
        if start == text_end:
            body = start
            break
        if message[start] in (0x20, 0x09) and fields:
            fields[-1] = (fields[-1][0], end)
        else:
            fields.append((start, end))
    kept = [message[start:end] for start, end in fields if not _forged(message, start, end, ours)]
    if len(kept) == len(fields):
        return message
    return b"".join(kept) + message[body:]


# -- writing our fields -----------------------------------------------------------------------

# A path is at most 256 octets with its angle brackets (RFC 5321 §4.5.3.1.3).
_MAX_ADDRESS = 254
# Longest value or comment we write: every line stays far under 998 octets (RFC 5322 §2.1.1).
_MAX_VALUE = 400
_MAX_COMMENT = 200
_MAX_HELO = 64

_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_ADDR_SPEC = re.compile(rf"{_ATEXT}(?:\.{_ATEXT})*@{_LABEL}(?:\.{_LABEL})+", re.ASCII)
_DOMAIN = re.compile(rf"{_LABEL}(?:\.{_LABEL})*", re.ASCII)
_ATOM = re.compile(_ATEXT, re.ASCII)
_TOKEN = re.compile(r"[!#$%&'*+.0-9A-Z^_`a-z{|}~-]+", re.ASCII)
_KEYWORD = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?", re.ASCII)
_PRINTABLE = re.compile(r"[ -~]*", re.ASCII)
_NOT_COMMENT_TEXT = re.compile(r"[^ -~]|;", re.ASCII)
_NOT_HELO_TEXT = re.compile(r"[^A-Za-z0-9.:\[\]_-]", re.ASCII)
_COMMENT_SPECIALS = re.compile(r"([()\\])")


def _address(text: str | None) -> str | None:
    """`text` if it can be written as a bare addr-spec (RFC 8601 pvalue)."""
    if text and len(text) <= _MAX_ADDRESS and _ADDR_SPEC.fullmatch(text):
        return text
    return None


def _token(text: str | None) -> str | None:
    if text and len(text) <= _MAX_VALUE and _TOKEN.fullmatch(text):
        return text
    return None


def _hex(character: str) -> str:
    return "".join(f"\\{octet:02X}" for octet in character.encode("utf-8", "surrogatepass"))


def _dn(text: str) -> str:
    """The same RFC 4514 name in printable ASCII without `;`: other characters hex-escaped."""
    out: list[str] = []
    at = 0
    while at < len(text):
        character = text[at]
        if character == "\\" and at + 1 < len(text):
            escaped = text[at + 1]
            plain = " " <= escaped <= "~" and escaped != ";"
            out.append("\\" + escaped if plain else _hex(escaped))
            at += 2
            continue
        out.append(character if " " <= character <= "~" and character != ";" else _hex(character))
        at += 1
    return "".join(out)


def _quoted(text: str) -> str | None:
    """An RFC 2045 quoted-string of printable ASCII `text`, or None when too long."""
    quoted = '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return quoted if len(quoted) <= _MAX_VALUE and _PRINTABLE.fullmatch(text) else None


def _comment(text: str, limit: int = _MAX_COMMENT) -> str:
    """Text for an RFC 5322 comment: printable ASCII, no `;`, specials as quoted-pairs."""
    plain = _NOT_COMMENT_TEXT.sub(lambda m: "," if m.group() == ";" else "?", text)
    return _COMMENT_SPECIALS.sub(r"\\\1", " ".join(plain.split())[:limit])


def _address_literal(address: str) -> str:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return "unknown"
    return f"[IPv6:{ip.compressed}]" if ip.version == 6 else f"[{ip}]"


def _domain(text: str) -> str | None:
    """`text` if it is a Domain or an address-literal (RFC 5321 §4.1.2)."""
    if not text or len(text) > 255:
        return None
    if _DOMAIN.fullmatch(text):
        return text
    if text.startswith("[") and text.endswith("]"):
        inner = text[1:-1]
        inner = inner[5:] if inner[:5].lower() == "ipv6:" else inner
        if _address_literal(inner) != "unknown":
            return text
    return None


def _field(name: str, pieces: list[str]) -> str:
    # The last guard: whatever the code above let through, no value may break the field.
    for piece in pieces:
        if not piece or not _PRINTABLE.fullmatch(piece):
            raise ValueError(f"{name}: refusing to write a value that is not printable ASCII")
    return f"{name}: " + "\r\n\t".join(pieces)


def received(envelope: Envelope, hostname: str, recipient: str | None, now: dt.datetime) -> str:
    """Our Received field (RFC 5321 §4.4); peer-supplied parts only where they are safe."""
    peer = envelope.peer
    literal = _address_literal(peer.address)
    helo = _domain(peer.helo)
    if helo:
        pieces = [f"from {helo} ({literal})"]
    else:
        shown = _NOT_HELO_TEXT.sub("?", peer.helo[:_MAX_HELO])
        pieces = [f"from unknown ({literal}" + (f" helo={shown})" if shown else ")")]
    if peer.certificate_subject:
        subject = _dn(peer.certificate_subject)
        pieces.append(f"(authenticated: {_comment(subject, _MAX_VALUE)})"
                      if len(subject) <= _MAX_VALUE else "(authenticated)")
    by = _domain(hostname) or _address_literal(hostname)
    protocol = "ESMTPS" if peer.tls else "ESMTP"
    queue_id = f" id {envelope.queue_id}" if _ATOM.fullmatch(envelope.queue_id) else ""
    pieces.append(f"by {by} (Passerelle) with {protocol}{queue_id}")
    if _address(recipient):
        pieces.append(f"for <{recipient}>")
    pieces[-1] += "; " + email.utils.format_datetime(now.astimezone(dt.UTC))
    return _field("Received", pieces)


def authentication_results(hostname: str, verdict: Verdict) -> str:
    """Our Authentication-Results field (RFC 8601 §2.2, RFC 7281 for `smime`)."""
    authserv_id = _token(hostname) or _quoted(hostname)
    if authserv_id is None:
        raise ValueError(f"hostname {hostname!r} cannot be an authserv-id")
    if not _KEYWORD.fullmatch(verdict.method) or not _KEYWORD.fullmatch(verdict.result):
        raise ValueError(f"method {verdict.method!r} and result {verdict.result!r} must be "
                         "RFC 8601 keywords")
    if verdict.method == "none":
        return _field("Authentication-Results", [f"{authserv_id}; none"])
    properties: list[str] = []
    withheld: list[str] = []

    def add(name: str, raw: str | None, written: str | None) -> None:
        if written:
            properties.append(f"{name}={written}")
        elif raw:
            withheld.append(name)

    if verdict.method == "smime":
        # RFC 7281 §3: the identifier is the signer's address; serial and issuer as in the cert.
        add("body.smime-identifier", verdict.signer, _address(verdict.signer))
        add("body.smime-serial", verdict.signer_serial, _token(verdict.signer_serial))
        issuer = verdict.signer_issuer
        add("body.smime-issuer", issuer, _quoted(_dn(issuer)) if issuer else None)
    else:
        add("header.from", verdict.signer, _address(verdict.signer))
        fingerprint = verdict.fingerprints[0] if verdict.fingerprints else None
        add(f"{verdict.method}.fingerprint", fingerprint, _token(fingerprint))
    result = f"{verdict.method}={verdict.result}"
    if verdict.reason and _comment(verdict.reason):
        result += f" ({_comment(verdict.reason)})"
    if withheld:
        result += f" (withheld: {', '.join(withheld)})"
    return _field("Authentication-Results", [f"{authserv_id};", result, *properties])


def add_trace(
    content: bytes,
    envelope: Envelope,
    verdict: Verdict,
    hostname: str,
    recipients: tuple[str, ...],
    now: dt.datetime,
) -> bytes:
    """The inner message as delivered: our trace headers on top, forged results removed."""
    content = strip_forged_results(content, hostname)
    single = recipients[0] if len(recipients) == 1 else None
    headers = received(envelope, hostname, single, now) + "\r\n"
    headers += authentication_results(hostname, verdict) + "\r\n"
    return headers.encode("ascii") + content
