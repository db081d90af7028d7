"""Trace headers the gateway adds to the inner message (RFC 5321 §4.4, RFC 8601, RFC 7281).

Untrusted input: the header block of the unwrapped message.

The content below the header block is never touched: headers are added in front and forged
`Authentication-Results` headers that claim this gateway's authserv-id are cut out of the raw
header block, line by line, so every other byte stays as the sender wrote it.
"""

from __future__ import annotations

import datetime as dt
import email.utils
import re

from adapters.base import Verdict
from gateway.envelope import Envelope

__all__ = ["add_trace", "authentication_results", "received", "strip_forged_results"]

_FIELD = re.compile(rb"^([!-9;-~]+)[ \t]*:", re.ASCII)
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_SPECIAL = re.compile(r"([()\\\"])")


def _comment(text: str) -> str:
    """Text made safe for an RFC 5322 comment: no line breaks, specials as quoted-pairs."""
    return _SPECIAL.sub(r"\\\1", _CONTROL.sub(" ", text).strip()[:200])


def _header_block(message: bytes) -> tuple[bytes, bytes]:
    end = message.find(b"\r\n\r\n")
    if end < 0:
        return message, b""
    return message[: end + 2], message[end + 2 :]


def strip_forged_results(message: bytes, authserv_id: str) -> bytes:
    """Remove Authentication-Results fields whose authserv-id is ours (RFC 8601 §5)."""
    head, rest = _header_block(message)
    lines = head.split(b"\r\n")
    kept: list[bytes] = []
    dropping = False
    wanted = authserv_id.lower().encode()
    for line in lines:
        if line[:1] in (b" ", b"\t"):
            if not dropping:
                kept.append(line)
            continue
        dropping = False
        match = _FIELD.match(line)
        if match and match.group(1).lower() == b"authentication-results":
            value = line[match.end() :].strip().lower()
            server = re.split(rb"[\s;(]", value, maxsplit=1)[0]
            if server == wanted:
                dropping = True
                continue
        kept.append(line)
    return b"\r\n".join(kept) + rest


def received(envelope: Envelope, hostname: str, recipient: str | None, now: dt.datetime) -> str:
    peer = envelope.peer
    protocol = "ESMTPS" if peer.tls else "ESMTP"
    helo = _comment(peer.helo) or "unknown"
    parts = [f"from {helo} ([{peer.address}])"]
    if peer.certificate_subject:
        parts.append(f"(authenticated: {_comment(peer.certificate_subject)})")
    parts.append(f"by {hostname} (Passerelle) with {protocol} id {envelope.queue_id}")
    if recipient:
        parts.append(f"for <{recipient}>")
    date = email.utils.format_datetime(now.astimezone(dt.UTC))
    return "Received: " + "\r\n\t".join(parts) + f"; {date}"


def authentication_results(hostname: str, verdict: Verdict) -> str:
    if verdict.method == "none":
        return f"Authentication-Results: {hostname}; none"
    result = f"{verdict.method}={verdict.result}"
    if verdict.reason:
        result += f" ({_comment(verdict.reason)})"
    props: list[str] = []
    if verdict.method == "smime":
        # RFC 7281 §3: the identifier is the signer's address; serial and issuer as in the cert.
        if verdict.signer:
            props.append(f"body.smime-identifier={verdict.signer}")
        if verdict.signer_serial:
            props.append(f"body.smime-serial={verdict.signer_serial}")
        if verdict.signer_issuer:
            props.append(f'body.smime-issuer="{_comment(verdict.signer_issuer)}"')
    else:
        if verdict.signer:
            props.append(f"header.from={verdict.signer}")
        if verdict.fingerprints:
            props.append(f"{verdict.method}.fingerprint={verdict.fingerprints[0]}")
    return "Authentication-Results: " + "\r\n\t".join([f"{hostname};", result, *props])


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
    return headers.encode("utf-8") + content
