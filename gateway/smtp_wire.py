"""The SMTP client's wire towards the next hop, once a connection is set up: commands go out
as bytes and replies come back in order (RFC 5321 §4.2), so several commands may be
outstanding at once (RFC 2920 PIPELINING).

- `Wire` is the connection's protocol: it counts the replies owed and reads them in order.
  Bytes the next hop sends while it owes no reply end the connection, so that they can never
  be read as the answer to a later command.
- `command` makes one command line and refuses a control character in any of its parts, which
  would start another command. `wire_form` gives a message the form DATA requires (RFC 5321
  §4.5.2): every bare CR or LF made CRLF, so a stray one cannot end DATA early at the next hop
  (SMTP smuggling), and a dot doubled at the start of a line.
- `reply_text`, `enhanced_code` and `refusal` read a reply for an outcome: its text as one
  printable line, its RFC 3463 enhanced status code (as RFC 2034 puts it in the text), and
  whether a 4xx or 5xx defers or bounces. `broken_connection` is the failure (RFC 3463 X.4.2)
  of a connection that broke or timed out.

Untrusted input: the next hop's replies. A reply line longer than 8192 octets, or one without
a three-digit code, is unreadable (`Unreadable`): the caller defers the recipients and drops
the connection. Reply text is reduced to one printable line before it reaches an outcome, a
log or a DSN.
"""

from __future__ import annotations

import asyncio
import collections
import re
from dataclasses import dataclass

import aiosmtplib

from gateway.errors import Reason, TemporaryFailure
from gateway.outcome import Kind

__all__ = [
    "Disconnected",
    "Reply",
    "TransportStats",
    "Unreadable",
    "Wire",
    "broken_connection",
    "command",
    "enhanced_code",
    "refusal",
    "reply_text",
    "wire_form",
]


@dataclass
class TransportStats:
    """Counters of the SMTP client, for tests and profiles (how many connections and writes a
    message costs)."""

    connections: int = 0  # opened: TCP connect, greeting, EHLO (and STARTTLS, EHLO again)
    transactions: int = 0  # MAIL transactions started
    writes: int = 0  # write calls on the transactions' connections
    stale: int = 0  # transactions started again because a cached connection proved closed


class Disconnected(Exception):
    """The next hop closed the connection (or it broke)."""


class Unreadable(Exception):
    """A reply that is not SMTP (RFC 5321 §4.2): out of step, so nothing more can be trusted."""


@dataclass(frozen=True)
class Reply:
    """One reply: its code, and the text of its lines joined by newlines."""

    code: int
    message: str


_MAX_LINE = 8192  # a reply line longer than this is not SMTP (RFC 5321 §4.5.3.1.5 says 512)
_MAX_PENDING = 4 * _MAX_LINE  # buffered bytes without a complete reply


class Wire(asyncio.Protocol):
    """One SMTP client connection once it is set up (greeting, EHLO, STARTTLS): commands go
    out as bytes, replies come back in order, so several commands may be outstanding at once
    (RFC 2920 PIPELINING). Bytes the next hop sends while it owes no reply (an idle-timeout
    421 before it closes, or a server out of step) end the connection, so that they can never
    be read as the answer to a later command."""

    def __init__(self, transport: asyncio.Transport, stats: TransportStats) -> None:
        self.transport = transport
        self.stats = stats
        self._buffer = bytearray()
        self._replies: collections.deque[Reply] = collections.deque()
        self._owed = 0
        self._problem: Exception | None = None
        self._closed = False
        self._waiter: asyncio.Future[None] | None = None
        self._writable: asyncio.Future[None] | None = None
        self._paused = False

    @property
    def is_open(self) -> bool:
        return not self._closed and not self.transport.is_closing()

    # -- asyncio.Protocol --

    def data_received(self, data: bytes) -> None:
        if self._owed == 0 or self._problem is not None:
            self._fail(Unreadable("the next hop sent bytes that answer no command"))
            return
        self._buffer += data
        while self._owed:
            try:
                reply = self._parse()
            except Unreadable as problem:
                self._fail(problem)
                return
            if reply is None:
                break
            self._owed -= 1
            self._replies.append(reply)
        if self._buffer and not self._owed:
            self._fail(Unreadable("the next hop sent more replies than commands"))
        elif len(self._buffer) > _MAX_PENDING:
            self._fail(Unreadable("reply too long"))
        self._wake()

    def eof_received(self) -> bool:
        self._closed = True
        self._wake()
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self._wake()
        self._wake_writer()

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        self._wake_writer()

    # -- parsing --

    def _parse(self) -> Reply | None:
        code = -1
        lines: list[str] = []
        offset = 0
        while True:
            end = self._buffer.find(b"\n", offset)
            if end == -1:
                if len(self._buffer) - offset > _MAX_LINE:
                    raise Unreadable("reply line too long")
                return None
            line = bytes(self._buffer[offset:end + 1])
            if len(line) > _MAX_LINE:
                raise Unreadable("reply line too long")
            head, separator = line[:3], line[3:4]
            if not (head.isdigit() and separator in (b" ", b"-", b"\r", b"\n")):
                text = line.decode("utf-8", "replace").strip()
                raise Unreadable(f"malformed reply line: {text[:100]}")
            code = int(head)
            lines.append(line[4:].strip(b" \t\r\n").decode("utf-8", "surrogateescape"))
            offset = end + 1
            if separator != b"-":
                del self._buffer[:offset]
                return Reply(code, "\n".join(lines))

    def _fail(self, problem: Exception) -> None:
        self._problem = problem
        self._closed = True
        self.transport.abort()
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _wake_writer(self) -> None:
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)

    # -- the client side --

    def send(self, data: bytes | memoryview, replies: int = 0) -> None:
        """Write `data`, which asks for `replies` replies."""
        if not self.is_open:
            raise Disconnected("the connection is closed")
        self._owed += replies
        self.transport.write(data)
        self.stats.writes += 1

    async def drain(self, timeout: float) -> None:
        """Until the socket takes more (flow control), so a large message is never copied
        whole into the transport's buffer."""
        while self._paused and self.is_open:
            self._writable = asyncio.get_running_loop().create_future()
            await asyncio.wait_for(self._writable, timeout)
        if not self.is_open:
            raise Disconnected("the connection closed while the message was sent")

    async def read(self, timeout: float) -> Reply:
        """The next reply, in order; Disconnected, Unreadable or TimeoutError."""
        while not self._replies:
            if self._problem is not None:
                raise self._problem
            if self._closed:
                raise Disconnected("the next hop closed the connection")
            self._waiter = asyncio.get_running_loop().create_future()
            await asyncio.wait_for(self._waiter, timeout)
        return self._replies.popleft()

    def abort(self) -> None:
        """Close at once, dropping anything not yet sent: a message cut short is never
        completed by a flush, so the next hop cannot take it."""
        self._closed = True
        self.transport.abort()

    def close(self) -> None:
        self._closed = True
        self.transport.close()


# -- commands and the message ----------------------------------------------------------------

_CONTROL = re.compile(rb"[\x00-\x1f\x7f]")
_BARE_LINE_END = re.compile(rb"\r\n|\r|\n")


def command(*parts: bytes) -> bytes:
    """One command line; a control character in any part would start another command."""
    for part in parts:
        if _CONTROL.search(part):
            raise ValueError("an SMTP command argument contains a control character")
    return b" ".join(parts) + b"\r\n"


def wire_form(message: bytes) -> bytes:
    """`message` as DATA carries it (RFC 5321 §4.5.2): every line ending CRLF (a bare CR or
    LF could otherwise end DATA early at the next hop: SMTP smuggling), the last line ended,
    and a dot doubled at the start of a line. The pipeline hands over CRLF messages, so
    usually only the counts are paid, not a copy."""
    crlf = message.count(b"\r\n")
    if message.count(b"\r") != crlf or message.count(b"\n") != crlf:
        message = _BARE_LINE_END.sub(b"\r\n", message)
    if not message.endswith(b"\r\n"):
        message += b"\r\n"
    if message.startswith(b"."):
        message = b"." + message
    return message.replace(b"\r\n.", b"\r\n..")


# -- replies ----------------------------------------------------------------------------------

_ENHANCED = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})(?=\s|$)")
_MAX_TEXT = 500


def reply_text(message: str) -> str:
    """A reply's text as one printable line, without the enhanced codes of its lines."""
    parts = []
    for line in message.splitlines():
        line = _ENHANCED.sub("", line.strip()).strip()
        if line:
            parts.append(line)
    text = " ".join(parts)
    text = "".join(c if c.isprintable() else " " for c in text)
    return " ".join(text.split())[:_MAX_TEXT]


def enhanced_code(code: int, message: str, default_detail: str = "0.0") -> str:
    """The enhanced code the server gave (RFC 2034), if its class agrees with the reply code."""
    match = _ENHANCED.match(message.strip())
    if match and str(code).startswith(match.group(1)):
        return ".".join(match.groups())
    klass = str(code)[:1] if 200 <= code < 600 else "4"
    return f"{klass}.{default_detail}"


def refusal(code: int) -> Kind | None:
    """What a 4xx or 5xx reply means for the recipients it answers; None for any other code
    (a success is decided by the caller, which knows which code the command may succeed with)."""
    if 400 <= code < 500:
        return "deferred"
    if 500 <= code < 600:
        return "bounced"
    return None


def broken_connection(where: str, step: str, error: BaseException) -> TemporaryFailure:
    """The connection broke or timed out: RFC 3463 X.4.2 (bad connection)."""
    if isinstance(error, aiosmtplib.SMTPTimeoutError | TimeoutError):
        what = "did not answer in time"
    elif isinstance(error, aiosmtplib.SMTPResponseException):
        what = f"answered {error.code} {reply_text(error.message)}"
    else:
        what = "closed the connection"
    return TemporaryFailure(
        f"The next hop {where} {what} during {step}.",
        detail=f"{where} during {step}: {error!r}",
        enhanced="4.4.2", smtp_code=421, reason=Reason.NEXT_HOP_UNAVAILABLE,
    )

