"""Delivery status notifications: who gets one, and the bytes of the report (sans-I/O).

Standards: RFC 3464 (the `multipart/report; report-type=delivery-status` format and its
`message/delivery-status` fields), RFC 3461 (NOTIFY, RET, ENVID, ORCPT: what the sender asked
for), RFC 3463 (enhanced status codes), RFC 6522 (multipart/report), RFC 6533 §3 (non-ASCII
addresses in a 7-bit report), RFC 3834 (Auto-Submitted).

Nothing here touches a socket, a file, the clock or a random source: the caller hands in `now`
and a random token, so a report is a pure function of its inputs and can be tested as a vector.

Untrusted input: the original message (only split at its first empty line, never parsed further)
and the remote servers' replies quoted in the diagnostics. Both may hold anything, so every field
written here is reduced to printable 7-bit text on a single folded line: a remote reply cannot
inject a header or a report field.

Privacy: MSSanté subjects carry the patient's name and birth date. The report's own Subject is
fixed ("Delivery Status Notification (Failure)"), and the original Subject only comes back inside
the returned headers part, which goes to the original sender alone.
"""

from __future__ import annotations

import datetime as dt
import email.quoprimime
import email.utils
import re
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from gateway.envelope import DeliveryState, Envelope, Recipient, Status

__all__ = [
    "Action",
    "Event",
    "RecipientReport",
    "build_dsn",
    "dsn_recipients",
    "should_send_dsn",
]

Action = Literal["failed", "delayed", "delivered", "relayed", "expanded"]
Event = Literal["SUCCESS", "FAILURE", "DELAY"]

CRLF = "\r\n"

# RFC 3464 §2.3.4: the class digit of Status must agree with the Action.
_STATUS_CLASS: dict[str, str] = {
    "failed": "5",
    "delayed": "4",
    "delivered": "2",
    "relayed": "2",
    "expanded": "2",
}
_SUBJECT: dict[str, str] = {
    "failed": "Failure",
    "delayed": "Delay",
    "delivered": "Success",
    "relayed": "Success",
    "expanded": "Success",
}
_STATUS = re.compile(r"^[245]\.\d{1,3}\.\d{1,3}$")
_REPLY = re.compile(r"^[2-5]\d\d(?:[ -]|$)")
_XTEXT_HEX = re.compile(r"\+([0-9A-Fa-f]{2})")
_MSG_ID = re.compile(r"<[!-;=?-~]{1,250}>")  # printable ASCII without < and >
_LINE_ENDINGS = re.compile(rb"\r\n|\n|\r")


@dataclass(frozen=True)
class RecipientReport:
    """What the report says about one recipient (RFC 3464 §2.3)."""

    recipient: Recipient
    status: str  # RFC 3463 enhanced status code, "5.1.1"
    diagnostic: str  # the remote reply ("550 5.1.1 No such user") or the gateway's own reason
    last_attempt: dt.datetime
    remote_mta: str | None = None  # the next hop's host name, when it answered
    will_retry_until: dt.datetime | None = None  # for "delayed"
    advice: str = ""  # the one sentence for the human: what happened and what to do


def should_send_dsn(envelope: Envelope) -> bool:
    """Whether this message may cause a DSN at all.

    Never for the null sender (RFC 5321 §4.5.5, RFC 3461 §6.1: a bounce of a bounce would loop)
    and never for a report the gateway generated itself; those are sent from <> anyway, and the
    second test guards the rule should that ever change.
    """
    return bool(envelope.sender) and not envelope.generated


def dsn_recipients(envelope: Envelope, state: DeliveryState, event: Event) -> list[Recipient]:
    """The recipients a DSN for `event` should report, honouring each one's NOTIFY.

    FAILURE reports bounced recipients, SUCCESS delivered ones, DELAY deferred ones that were
    not reported as delayed yet. NOTIFY=NEVER excludes a recipient from all three; no NOTIFY
    means the RFC 3461 §4.1 default, FAILURE and DELAY.
    """
    if not should_send_dsn(envelope):
        return []
    wanted: list[Recipient] = []
    for recipient in envelope.recipients:
        if not recipient.wants(event):
            continue
        try:
            current = state.get(recipient.address)
        except KeyError:
            continue
        if event == "FAILURE" and current.status is Status.BOUNCED:
            wanted.append(recipient)
        elif event == "SUCCESS" and current.status is Status.DELIVERED:
            wanted.append(recipient)
        elif (
            event == "DELAY" and current.status is Status.DEFERRED and not current.delay_notified
        ):
            wanted.append(recipient)
    return wanted


def build_dsn(
    *,
    envelope: Envelope,
    reports: Sequence[RecipientReport],
    action: Action,
    reporting_mta: str,
    original: bytes,
    now: dt.datetime,
    random_token: str,
) -> bytes:
    """The complete DSN message, CRLF line endings, to be sent from <> to `envelope.sender`.

    The third part returns the original's header block (RET=HDRS, the default here as DESIGN
    §10 asks) or the whole original (RET=FULL) as `message/rfc822`.
    """
    if action not in _STATUS_CLASS:
        raise ValueError(f"unknown DSN action {action!r}")
    if not reports:
        raise ValueError("a DSN reports at least one recipient")
    original = _LINE_ENDINGS.sub(b"\r\n", original)
    full = (envelope.ret or "").upper() == "FULL"
    returned = original if full else _header_block(original)
    boundary = _boundary(random_token, returned)
    mta = _printable(reporting_mta) or "localhost"

    header = [
        f"From: Mail Delivery System <MAILER-DAEMON@{mta}>",
        f"To: {_address_header(envelope.sender)}",
        f"Subject: Delivery Status Notification ({_SUBJECT[action]})",
        f"Date: {_date(now)}",
        f"Message-ID: <{_token(random_token)}.{_aware(now):%Y%m%d%H%M%S}@{mta}>",
    ]
    original_id = _original_message_id(envelope, original)
    if original_id:
        header += [f"In-Reply-To: {original_id}", f"References: {original_id}"]
    header += [
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        "Content-Type: multipart/report; report-type=delivery-status;",
        f' boundary="{boundary}"',
    ]

    human = _human_text(envelope, reports, action, mta)
    status = _status_fields(envelope, reports, action, mta)

    out = bytearray()
    out += (CRLF.join(header) + CRLF + CRLF).encode("ascii")
    out += b"This is a MIME-encapsulated delivery status notification.\r\n"
    # Part 1: for the human reader.
    out += f"\r\n--{boundary}\r\n".encode("ascii")
    out += b"Content-Type: text/plain; charset=utf-8\r\n"
    out += b"Content-Transfer-Encoding: quoted-printable\r\n"
    out += b"Content-Description: Notification\r\n\r\n"
    out += _quoted_printable(human)
    # Part 2: for the sender's software (RFC 3464 §2.1).
    out += f"\r\n--{boundary}\r\n".encode("ascii")
    out += b"Content-Type: message/delivery-status\r\n"
    out += b"Content-Description: Delivery report\r\n\r\n"
    out += status.encode("ascii")
    # Part 3: the original, or its header block. It is returned as it came; if it holds 8-bit
    # octets the part says so (RFC 2046 §5.2.1 forbids base64 on message/rfc822), and the
    # delivery stage then sends BODY=8BITMIME.
    out += f"\r\n--{boundary}\r\n".encode("ascii")
    if full:
        out += b"Content-Type: message/rfc822\r\n"
        out += b"Content-Description: Undelivered message\r\n"
    else:
        out += b"Content-Type: text/rfc822-headers\r\n"
        out += b"Content-Description: Undelivered message headers\r\n"
    if not returned.isascii():
        out += b"Content-Transfer-Encoding: 8bit\r\n"
    out += b"\r\n" + returned
    if not returned.endswith(b"\r\n"):
        out += b"\r\n"
    out += f"\r\n--{boundary}--\r\n".encode("ascii")
    return bytes(out)


# -- the three parts -------------------------------------------------------------------------


def _human_text(
    envelope: Envelope, reports: Sequence[RecipientReport], action: str, mta: str
) -> str:
    english = {
        "failed": "Your message could not be delivered to the recipients below. "
        "It will not be retried: please read the reason given for each recipient, correct "
        "what it asks, and send the message again.",
        "delayed": "Your message has not been delivered yet to the recipients below. "
        "Nothing needs to be done now: the gateway keeps trying and will write to you again "
        "only if it gives up.",
        "delivered": "Your message was delivered to the recipients below.",
        "relayed": "Your message was handed over to the next mail system for the recipients "
        "below. That system does not send delivery reports, so this is the last news you will "
        "receive about it.",
        "expanded": "Your message was delivered to the list or alias below, which forwards it "
        "to its members.",
    }[action]
    french = {
        "failed": "Votre message n'a pas pu être remis aux destinataires ci-dessous et ne sera "
        "pas renvoyé : lisez la raison indiquée pour chacun, corrigez ce qu'elle demande, puis "
        "renvoyez le message.",
        "delayed": "Votre message n'a pas encore été remis aux destinataires ci-dessous. "
        "Vous n'avez rien à faire : la passerelle continue d'essayer et ne vous écrira de "
        "nouveau que si elle abandonne.",
        "delivered": "Votre message a été remis aux destinataires ci-dessous.",
        "relayed": "Votre message a été transmis au système de messagerie suivant, qui "
        "n'envoie pas d'accusés de remise : vous ne recevrez pas d'autre nouvelle.",
        "expanded": "Votre message a été remis à la liste ci-dessous, qui le diffuse à ses "
        "membres.",
    }[action]
    lines = [f"This is the mail gateway at {mta}.", ""]
    lines += textwrap.wrap(english, 76)
    lines.append("")
    for report in reports:
        address = _printable(report.recipient.address, keep_unicode=True)
        lines.append(f"<{address}>:")
        advice = _printable(report.advice, keep_unicode=True) or _default_advice(action)
        lines += textwrap.wrap(advice, 72, initial_indent="    ", subsequent_indent="    ")
        diagnostic = _printable(report.diagnostic, keep_unicode=True)
        if diagnostic and diagnostic != advice:
            via = f" from {_printable(report.remote_mta)}" if report.remote_mta else ""
            lines += textwrap.wrap(
                f"Reply{via}: {diagnostic}", 72,
                initial_indent="    ", subsequent_indent="      ",
            )
        if action == "delayed" and report.will_retry_until is not None:
            until = _date(report.will_retry_until)
            lines.append(f"    The gateway will keep trying until {until}.")
        lines.append("")
    if envelope.envid:
        lines.append(f"Envelope identifier: {_envelope_id(envelope.envid)}")
    if envelope.message_id:
        lines.append(f"Message-ID of your message: {_printable(envelope.message_id)}")
    lines += ["", "-- ", ""]
    lines += textwrap.wrap(f"Ceci est la passerelle de messagerie {mta}. {french}", 76)
    lines.append(
        "Le détail de chaque destinataire figure ci-dessus (en anglais) et dans le rapport joint."
    )
    return CRLF.join(lines) + CRLF


def _default_advice(action: str) -> str:
    return {
        "failed": "The message could not be delivered to this recipient.",
        "delayed": "The message could not be delivered yet; the gateway will try again.",
    }.get(action, "The message was delivered.")


def _status_fields(
    envelope: Envelope, reports: Sequence[RecipientReport], action: str, mta: str
) -> str:
    per_message = [f"Reporting-MTA: dns; {mta}"]
    if envelope.envid:
        per_message.append(_field("Original-Envelope-Id", _envelope_id(envelope.envid)))
    per_message.append(_field("X-Passerelle-Queue-Id", _printable(envelope.queue_id)))
    arrival = dt.datetime.fromtimestamp(envelope.received_at, dt.UTC)
    per_message.append(f"Arrival-Date: {_date(arrival)}")
    blocks = [CRLF.join(per_message) + CRLF]
    for report in reports:
        fields: list[str] = []
        if report.recipient.orcpt:
            fields.append(_field("Original-Recipient", _original_recipient(report.recipient.orcpt)))
        fields.append(_field("Final-Recipient", _typed_address(report.recipient.address)))
        fields.append(f"Action: {action}")
        fields.append(f"Status: {_status(report.status, action)}")
        if report.remote_mta:
            remote = _printable(report.remote_mta)
            fields.append(_field("Remote-MTA", remote if ";" in remote else f"dns; {remote}"))
        diagnostic = _printable(report.diagnostic)
        if diagnostic:
            # "smtp" is only for an SMTP reply (RFC 3464 §2.3.6); the gateway's own reasons are
            # marked with a private type, as Postfix marks its own with "X-Postfix".
            kind = "smtp" if _REPLY.match(diagnostic) else "X-Passerelle"
            fields.append(_field("Diagnostic-Code", f"{kind}; {diagnostic}"))
        fields.append(f"Last-Attempt-Date: {_date(report.last_attempt)}")
        if action == "delayed" and report.will_retry_until is not None:
            fields.append(f"Will-Retry-Until: {_date(report.will_retry_until)}")
        blocks.append(CRLF.join(fields) + CRLF)
    return CRLF.join(blocks)


def _header_block(original: bytes) -> bytes:
    """The original's header section, ending with the CRLF of its last field (RFC 6522 §4)."""
    if original.startswith(b"\r\n"):
        return b""
    end = original.find(b"\r\n\r\n")
    return original if end < 0 else original[: end + 2]


# -- encodings -------------------------------------------------------------------------------


def _status(status: str, action: str) -> str:
    """A well-formed code whose class matches the action; the detail is kept when it is sound."""
    wanted = _STATUS_CLASS[action]
    status = status.strip()
    if not _STATUS.match(status):
        return f"{wanted}.0.0"
    return wanted + status[1:]


def _printable(text: str | None, *, keep_unicode: bool = False) -> str:
    """One line of text: controls become spaces, runs of blanks collapse.

    In report fields non-ASCII characters are written as RFC 6533 `\\x{HEX}` escapes so the
    report stays 7-bit; in the human part (quoted-printable UTF-8) they are kept.
    """
    if not text:
        return ""
    out: list[str] = []
    for char in text:
        code = ord(char)
        if code < 0x20 or code == 0x7F or 0x80 <= code < 0xA0:
            out.append(" ")
        elif code > 0x7E and not keep_unicode:
            # Surrogate escapes are bytes that were not valid UTF-8 in a remote reply.
            out.append(f"\\x{{{code & 0xFF if 0xDC80 <= code <= 0xDCFF else code:X}}}")
        else:
            out.append(char)
    return " ".join("".join(out).split())


def _utf8_addr_xtext(address: str) -> str:
    """RFC 6533 §3 utf-8-addr-xtext: ASCII graphic characters except '+', '=' and '\\' as they
    are, everything else as \\x{HEX}."""
    return "".join(
        char if 0x21 <= ord(char) <= 0x7E and char not in "+=\\" else f"\\x{{{ord(char):X}}}"
        for char in address
    )


def _typed_address(address: str) -> str:
    if address.isascii() and _printable(address) == address:
        return f"rfc822; {address}"
    return f"utf-8; {_utf8_addr_xtext(address)}"


def _xtext_decode(value: str) -> str | None:
    """RFC 3461 §4 xtext decoded, or None when the result is not printable ASCII."""
    try:
        decoded = _XTEXT_HEX.sub(lambda m: chr(int(m.group(1), 16)), value)
    except ValueError:
        return None
    if not all(0x20 <= ord(c) <= 0x7E for c in decoded):
        return None
    return decoded


def _envelope_id(envid: str) -> str:
    """ENVID arrives xtext-encoded on MAIL FROM; the report carries the decoded identifier, as
    Sendmail and Postfix write it. An identifier that does not decode to printable text is
    returned as received rather than let a hex escape inject a line break."""
    decoded = _xtext_decode(envid)
    return _printable(decoded if decoded is not None else envid)


def _original_recipient(orcpt: str) -> str:
    """ORCPT "addr-type;xtext" → "addr-type;decoded address" (RFC 3461 §4.2, RFC 3464 §2.3.1)."""
    kind, _, value = orcpt.partition(";")
    decoded = _xtext_decode(value)
    return f"{_printable(kind)};{_printable(decoded if decoded is not None else value)}"


def _field(name: str, value: str) -> str:
    """A report field folded at spaces under 78 columns (RFC 3464 §2.1 uses RFC 822 folding)."""
    lines = textwrap.wrap(
        f"{name}: {value}", 76, break_long_words=False, break_on_hyphens=False
    )
    # A single word too long to fold is cut at the RFC 5322 limit instead.
    return (CRLF + " ").join(line[:990] for line in lines)


def _address_header(address: str) -> str:
    if address.isascii() and _printable(address) == address and address:
        return f"<{address}>"
    # An internationalised address cannot be written in a 7-bit header (RFC 2047 §5 forbids
    # encoded words inside an addr-spec). It becomes the display name of an empty group, which
    # the reader still sees; delivery uses the SMTP envelope, not this header.
    name = email.quoprimime.header_encode(address.encode("utf-8"), charset="utf-8")
    return f"{name}:;"


def _quoted_printable(text: str) -> bytes:
    # body_encode escapes each character below 256 as one octet; handing it the UTF-8 octets
    # spelt as Latin-1 characters makes it escape the UTF-8 encoding, octet by octet.
    octets = text.encode("utf-8").decode("latin-1")
    body = email.quoprimime.body_encode(octets, maxlinelen=76, eol=CRLF)
    if not body.endswith(CRLF):
        body += CRLF
    return body.encode("ascii")


def _aware(moment: dt.datetime) -> dt.datetime:
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=dt.UTC)


def _date(moment: dt.datetime) -> str:
    return email.utils.format_datetime(_aware(moment))


def _token(random_token: str) -> str:
    token = re.sub(r"[^A-Za-z0-9]", "", random_token)
    if not token:
        raise ValueError("random_token must contain letters or digits")
    return token


def _boundary(random_token: str, returned: bytes) -> str:
    """A boundary that the returned original cannot contain (RFC 2046 §5.1.1)."""
    base = f"=_dsn_{_token(random_token)}"
    boundary, counter = base, 0
    while boundary.encode("ascii") in returned:
        counter += 1
        boundary = f"{base}_{counter}"
    return boundary


def _original_message_id(envelope: Envelope, original: bytes) -> str | None:
    candidates = [envelope.message_id or ""]
    header = _header_block(original)
    for match in re.finditer(rb"(?im)^message-id:[ \t]*(.*(?:\r\n[ \t].*)*)", header):
        candidates.append(match.group(1).replace(b"\r\n", b"").decode("ascii", "replace"))
        break
    for candidate in candidates:
        found = _MSG_ID.search(candidate.strip())
        if found:
            return found.group(0)
    return None
