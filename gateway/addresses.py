"""Parsing of SMTP paths and ESMTP parameters (RFC 5321 §4.1.2, RFC 3461, RFC 1870, RFC 6152).

Untrusted input: the argument of MAIL FROM and RCPT TO, exactly as the peer sent it.

The gateway decides where a message goes from the recipient's domain alone, so an address must
have exactly one reading. Forms that some mail systems interpret as "relay further" are refused
instead of being guessed at, which is what keeps the gateway from being an open relay:

- `user%other@domain` (the "percent hack"), `other!user@domain` (UUCP bang paths) and a quoted
  local part containing `@` are refused with 553 5.1.3: the next hop might route them elsewhere.
- A source route `<@a,@b:user@c>` is accepted and ignored, as RFC 5321 §4.1.1.3 and appendix C
  ask; only the final mailbox `user@c` counts.
- Domains are compared in lower case without a trailing dot; address literals (`[192.0.2.1]`)
  belong to no network.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from gateway.errors import PermanentFailure, Reason

__all__ = [
    "MailParams",
    "Path",
    "RcptParams",
    "parse_mail_params",
    "parse_path",
    "parse_rcpt_params",
]

_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]"
_DOT_STRING = rf"{_ATEXT}+(?:\.{_ATEXT}+)*"
_QUOTED_STRING = r'"(?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\[\x20-\x7e])*"'
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_DOMAIN = rf"{_LABEL}(?:\.{_LABEL})*\.?"
_LITERAL = r"\[[\x21-\x5a\x5e-\x7e]+\]"
_UTF8_LOCAL = r"[^\x00-\x20\x7f\"(),:;<>@\[\\\]]+"

_MAILBOX = re.compile(
    rf"(?P<local>{_DOT_STRING}|{_QUOTED_STRING}|{_UTF8_LOCAL})@(?P<domain>{_DOMAIN}|{_LITERAL})"
)
_ROUTE = re.compile(rf"@{_DOMAIN}(?:,@{_DOMAIN})*:")
_XTEXT = re.compile(r"^(?:[\x21-\x2a\x2c-\x3c\x3e-\x7e]|\+[0-9A-F]{2})*$")

MAX_LOCAL = 64
MAX_PATH = 256


@dataclass(frozen=True)
class Path:
    """A reverse-path or forward-path, reduced to its mailbox."""

    local: str
    domain: str  # lower case, no trailing dot; "" for the null path

    @property
    def null(self) -> bool:
        return not self.local and not self.domain

    @property
    def address(self) -> str:
        return f"{self.local}@{self.domain}" if not self.null else ""

    @property
    def literal(self) -> bool:
        return self.domain.startswith("[")


def _syntax(advice: str) -> PermanentFailure:
    return PermanentFailure(advice, smtp_code=553, enhanced="5.1.3", reason=Reason.MALFORMED)


def parse_path(text: str, *, allow_null: bool) -> tuple[Path, str]:
    """Split `<path> params` into the path and the remaining parameter text."""
    text = text.lstrip()
    if not text.startswith("<"):
        raise _syntax("Address must be written in angle brackets, as <user@domain>")
    end = text.find(">")
    if end < 0:
        raise _syntax("Address is missing its closing '>'")
    inner, rest = text[1:end], text[end + 1 :]
    if rest and not rest.startswith(" "):
        raise _syntax("Unexpected characters after the address")
    if len(inner) > MAX_PATH:
        raise _syntax("Address is longer than RFC 5321 allows")
    if not inner:
        if not allow_null:
            raise _syntax("The null address <> cannot be a recipient")
        return Path("", ""), rest.strip()
    route = _ROUTE.match(inner)
    if route:
        inner = inner[route.end() :]
    match = _MAILBOX.fullmatch(inner)
    if not match:
        raise _syntax(f"Address <{inner}> is not a valid mailbox (RFC 5321 §4.1.2)")
    local, domain = match.group("local"), match.group("domain")
    if len(local.encode()) > MAX_LOCAL:
        raise _syntax("Local part is longer than 64 octets")
    bare_local = local[1:-1] if local.startswith('"') else local
    if any(c in bare_local for c in "%!@"):
        raise _syntax(
            "Addresses with '%', '!' or '@' in the local part are not relayed by this gateway"
        )
    if not domain.startswith("["):
        domain = domain.rstrip(".").lower()
    return Path(local, domain), rest.strip()


@dataclass(frozen=True)
class MailParams:
    size: int | None = None
    body: str | None = None  # 7BIT or 8BITMIME
    smtputf8: bool = False
    ret: str | None = None  # FULL or HDRS
    envid: str | None = None


@dataclass(frozen=True)
class RcptParams:
    notify: tuple[str, ...] = ()
    orcpt: str | None = None


def _split_params(text: str) -> dict[str, str | None]:
    params: dict[str, str | None] = {}
    for word in text.split():
        key, eq, value = word.partition("=")
        if not key.isalnum() or (eq and not value):
            raise PermanentFailure(
                f"Parameter {word!r} is malformed", smtp_code=501, enhanced="5.5.4",
                reason=Reason.MALFORMED,
            )
        key = key.upper()
        if key in params:
            raise PermanentFailure(
                f"Parameter {key} is given twice", smtp_code=501, enhanced="5.5.4",
                reason=Reason.MALFORMED,
            )
        params[key] = value if eq else None
    return params


def _unknown(key: str) -> PermanentFailure:
    return PermanentFailure(
        f"Parameter {key} is not supported", smtp_code=555, enhanced="5.5.4",
        reason=Reason.MALFORMED,
    )


def _xtext(key: str, value: str | None, limit: int = 100) -> str:
    if value is None or not _XTEXT.match(value) or len(value) > limit:
        raise PermanentFailure(
            f"{key} must be xtext (RFC 3461 §4)", smtp_code=501, enhanced="5.5.4",
            reason=Reason.MALFORMED,
        )
    return value


def parse_mail_params(text: str) -> MailParams:
    params = _split_params(text)
    size: int | None = None
    body = ret = envid = None
    smtputf8 = False
    for key, value in params.items():
        if key == "SIZE":
            if value is None or not value.isdigit():
                raise PermanentFailure(
                    "SIZE takes a number of octets", smtp_code=501, enhanced="5.5.4",
                    reason=Reason.MALFORMED,
                )
            size = int(value)
        elif key == "BODY":
            body = (value or "").upper()
            if body not in ("7BIT", "8BITMIME"):
                raise PermanentFailure(
                    "BODY must be 7BIT or 8BITMIME", smtp_code=501, enhanced="5.5.4",
                    reason=Reason.MALFORMED,
                )
        elif key == "SMTPUTF8":
            if value is not None:
                raise PermanentFailure(
                    "SMTPUTF8 takes no value", smtp_code=501, enhanced="5.5.4",
                    reason=Reason.MALFORMED,
                )
            smtputf8 = True
        elif key == "RET":
            ret = (value or "").upper()
            if ret not in ("FULL", "HDRS"):
                raise PermanentFailure(
                    "RET must be FULL or HDRS", smtp_code=501, enhanced="5.5.4",
                    reason=Reason.MALFORMED,
                )
        elif key == "ENVID":
            envid = _xtext("ENVID", value)
        else:
            raise _unknown(key)
    return MailParams(size=size, body=body, smtputf8=smtputf8, ret=ret, envid=envid)


def parse_rcpt_params(text: str) -> RcptParams:
    params = _split_params(text)
    notify: tuple[str, ...] = ()
    orcpt = None
    for key, value in params.items():
        if key == "NOTIFY":
            words = tuple(w.upper() for w in (value or "").split(","))
            allowed = {"NEVER", "SUCCESS", "FAILURE", "DELAY"}
            if not words or any(w not in allowed for w in words) or (
                "NEVER" in words and len(words) > 1
            ):
                raise PermanentFailure(
                    "NOTIFY must be NEVER or a list of SUCCESS, FAILURE, DELAY",
                    smtp_code=501, enhanced="5.5.4", reason=Reason.MALFORMED,
                )
            notify = words
        elif key == "ORCPT":
            addr_type, semicolon, _ = (value or "").partition(";")
            if not semicolon or not addr_type:
                raise PermanentFailure(
                    "ORCPT must be addr-type;xtext", smtp_code=501, enhanced="5.5.4",
                    reason=Reason.MALFORMED,
                )
            orcpt = _xtext("ORCPT", value, limit=500)
        else:
            raise _unknown(key)
    return RcptParams(notify=notify, orcpt=orcpt)
