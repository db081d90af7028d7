"""The messages `gateway demo` plays, read from `examples/` (see examples/README.md).

Each example is the message as its author's mail client composed it, before any network
envelope. For one run, every message gets a fresh Message-ID and Date so that the receiving
sides can tell this run's messages from anything left over, and the audit trail can be searched
per message. The discharge letter gets its IHE_XDM.ZIP attached here, built from
`examples/ihe-xdm/`; the read receipt is written by the doctor's side when the letter arrives
(RFC 8098).

Standards: RFC 5322, RFC 2045-2046 (MIME), RFC 8098 (message disposition notifications),
IHE ITI XDM (the ZIP's layout).
"""

from __future__ import annotations

import base64
import datetime as dt
import email.utils
import io
import re
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from email.header import Header
from pathlib import Path

from adapters.cms.entity import decode_body, field_blocks, multipart_parts, parse_entity

__all__ = [
    "XDM_FILES",
    "Example",
    "Leaf",
    "examples_folder",
    "leaves",
    "load_examples",
    "read_receipt",
    "xdm_zip",
]

# The IHE XDM layout, in the order written into the ZIP.
XDM_FILES = ("INDEX.HTM", "README.TXT", "IHE_XDM/SUBSET01/METADATA.XML",
             "IHE_XDM/SUBSET01/DOC0001.XML")
_ZIP_TIME = (2026, 11, 20, 14, 30, 0)  # fixed, so the ZIP's bytes are the same every run


@dataclass(frozen=True)
class Example:
    name: str  # file name under examples/
    sender: str
    recipient: str
    message_id: str  # with angle brackets
    content: bytes  # the message as the author's client composed it


@dataclass(frozen=True)
class Leaf:
    """One MIME leaf as a recipient's client would show it."""

    media_type: str
    filename: str | None
    data: bytes  # decoded body
    charset: str | None


def examples_folder(config_dir: Path) -> Path | None:
    """examples/ beside routing.yaml, else the one of the source tree."""
    for candidate in (config_dir / "examples", Path(__file__).resolve().parents[1] / "examples"):
        if (candidate / "1-hprim-lab-report.eml").is_file():
            return candidate
    return None


def xdm_zip(folder: Path) -> bytes:
    """IHE_XDM.ZIP from the files of an XDM media tree (deterministic bytes)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name in XDM_FILES:
            info = zipfile.ZipInfo(name, date_time=_ZIP_TIME)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            archive.writestr(info, (folder / name).read_bytes())
    return buffer.getvalue()


def _base64_lines(data: bytes) -> bytes:
    encoded = base64.b64encode(data)
    return b"".join(encoded[i: i + 76] + b"\r\n" for i in range(0, len(encoded), 76))


def _refresh(content: bytes, message_id: str, now: dt.datetime) -> bytes:
    """The same message with this run's Message-ID and Date."""
    date = email.utils.format_datetime(now.astimezone())
    content = re.sub(rb"(?im)^Message-ID:[^\r\n]*", b"Message-ID: " + message_id.encode(),
                     content, count=1)
    return re.sub(rb"(?im)^Date:[^\r\n]*", b"Date: " + date.encode(), content, count=1)


def _with_attachment(letter: bytes, name: str, media_type: str, data: bytes) -> bytes:
    """A single-part letter made multipart/mixed: the letter's text, then the attachment."""
    entity = parse_entity(letter)
    outer = b"".join(raw for field, raw in field_blocks(entity.head)
                     if not field.startswith("content-") and field != "mime-version")
    inner = b"".join(raw for field, raw in field_blocks(entity.head)
                     if field.startswith("content-"))
    boundary = b"=_passerelle_demo_xdm"
    return (
        outer + b"MIME-Version: 1.0\r\n"
        b'Content-Type: multipart/mixed; boundary="' + boundary + b'"\r\n\r\n'
        b"--" + boundary + b"\r\n" + inner + b"\r\n" + entity.body.rstrip(b"\r\n") + b"\r\n"
        b"--" + boundary + b"\r\n"
        b"Content-Type: " + media_type.encode() + b'; name="' + name.encode() + b'"\r\n'
        b'Content-Disposition: attachment; filename="' + name.encode() + b'"\r\n'
        b"Content-Transfer-Encoding: base64\r\n\r\n" + _base64_lines(data)
        + b"--" + boundary + b"--\r\n"
    )


def _addresses(content: bytes) -> tuple[str, str]:
    entity = parse_entity(content)
    sender = email.utils.parseaddr(entity.get("from") or "")[1]
    recipient = email.utils.parseaddr(entity.get("to") or "")[1]
    return sender, recipient


def load_examples(folder: Path, token: str, now: dt.datetime) -> dict[str, Example]:
    """The five examples, keyed by step ("hprim", "discharge", "smime", "tampered", "stranger")."""
    files = {
        "hprim": "1-hprim-lab-report.eml",
        "discharge": "2-discharge-letter.eml",
        "smime": "3-smime-letter.eml",
        "tampered": "4-tampered-letter.eml",
        "stranger": "5-outside-trust-space.eml",
    }
    found: dict[str, Example] = {}
    for key, name in files.items():
        content = (folder / name).read_bytes()
        if key == "discharge":
            content = _with_attachment(content, "IHE_XDM.ZIP", "application/zip",
                                       xdm_zip(folder / "ihe-xdm"))
        sender, recipient = _addresses(content)
        message_id = f"<{key}.{token}@{sender.rpartition('@')[2]}>"
        found[key] = Example(name, sender, recipient, message_id,
                             _refresh(content, message_id, now))
    return found


def leaves(content: bytes) -> list[Leaf]:
    """Every leaf of a MIME message, decoded, in order (multipart/report parts included)."""
    entity = parse_entity(content)
    media_type, params = entity.content_type()
    if media_type.startswith("multipart/") and "boundary" in params:
        _, parts, _ = multipart_parts(entity.body, params["boundary"])
        return [leaf for part in parts for leaf in leaves(part)]
    disposition = entity.get("content-disposition") or ""
    match = re.search(r'filename="?([^";]+)"?', disposition)
    filename = match.group(1) if match else params.get("name")
    return [Leaf(media_type, filename, decode_body(entity), params.get("charset"))]


def read_receipt(letter: bytes, reader: str, now: dt.datetime,
                 new_id: Callable[[], str]) -> bytes:
    """The MDN (RFC 8098) the reader's client sends back for `letter`, or b"" if none asked."""
    entity = parse_entity(letter)
    notify = entity.get("disposition-notification-to")
    if not notify:
        return b""
    original_id = entity.get("message-id") or ""
    subject = entity.get("subject") or ""
    to = email.utils.parseaddr(notify)[1]
    boundary = b"=_passerelle_demo_mdn"
    human = (
        f"Le message envoyé le {entity.get('date')} a été lu par {reader}.\r\n"
        "Cet accusé de lecture ne garantit pas que le contenu a été compris.\r\n"
    ).encode()
    report = (
        "Reporting-UA: medecin.fr; demo client\r\n"
        f"Final-Recipient: rfc822; {reader}\r\n"
        f"Original-Message-ID: {original_id}\r\n"
        "Disposition: manual-action/MDN-sent-manually; displayed\r\n"
    ).encode("ascii")
    return (
        f"From: <{reader}>\r\nTo: <{to}>\r\n"
        f"Subject: {Header('Accusé de lecture : ' + subject, 'utf-8').encode()}\r\n"
        f"Date: {email.utils.format_datetime(now.astimezone())}\r\n"
          f"Message-ID: {new_id()}\r\nIn-Reply-To: {original_id}\r\n"
          f"References: {original_id}\r\nAuto-Submitted: auto-replied\r\n".encode()
        + b"MIME-Version: 1.0\r\n"
        b"Content-Type: multipart/report; report-type=disposition-notification; "
        b'boundary="' + boundary + b'"\r\n\r\n'
        b"--" + boundary + b"\r\nContent-Type: text/plain; charset=utf-8\r\n"
        b"Content-Transfer-Encoding: 8bit\r\n\r\n" + human
        + b"--" + boundary + b"\r\nContent-Type: message/disposition-notification\r\n\r\n"
        + report
        + b"--" + boundary + b"--\r\n"
    )
