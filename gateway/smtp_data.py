"""The SMTP DATA reader (RFC 5321 §4.1.1.4, §4.5.2, §4.5.3.1.6, §2.3.8; RFC 2045 §2.8), sans-I/O.

Untrusted input: every octet a peer sends after the 354 reply, cut into chunks anywhere.

Only <CRLF>.<CRLF> ends DATA (SMTP smuggling). A bare CR or LF anywhere is refused with
550 5.6.0 rather than normalised, and so is a NUL: a smuggled `\\n.\\n` or `\\r\\n\\0.\\r\\n` then
never becomes a second message here nor at a next hop that reads line ends differently or drops
NULs. Lines longer than 998 octets are refused (500 5.5.2); dot-stuffing is undone. Past the
size limit the rest is discarded as it arrives and the reply is 552 5.3.4 once the terminator
comes (RFC 1870 §6).

Cost: each chunk is looked at by a few passes of C code over its octets (`find`, `count`,
`replace`, and `rfind` steps of up to 1000 octets for the line length), never by a Python loop
per line. Memory: the message so far, held once as the blocks of lines it came in (joined once,
by `content`), plus one unfinished line.
"""

from __future__ import annotations

from gateway.errors import GatewayError, PermanentFailure, Reason

__all__ = ["MAX_LINE", "DataReader"]

MAX_LINE = 998  # octets, without the CRLF (RFC 5321 §4.5.3.1.6)
_TERMINATOR = b"\r\n.\r\n"
_CARRY = len(_TERMINATOR) - 1  # octets that may begin a terminator cut across two chunks


def _too_large() -> GatewayError:
    return PermanentFailure("Message exceeds the maximum size accepted here",
                            smtp_code=552, enhanced="5.3.4", reason=Reason.TOO_LARGE)


def _line_too_long() -> GatewayError:
    return PermanentFailure(
        "Line longer than 998 octets (RFC 5321 §4.5.3.1.6); fix the sending software",
        smtp_code=500, enhanced="5.5.2", reason=Reason.MALFORMED,
    )


def _bare_line_end() -> GatewayError:
    return PermanentFailure(
        "Message refused: a bare CR or LF was found; only CRLF may end a line "
        "(RFC 5321 §2.3.8), fix the sending software",
        smtp_code=550, enhanced="5.6.0", reason=Reason.SMUGGLING,
    )


def _nul() -> GatewayError:
    return PermanentFailure(
        "Message refused: a NUL octet was found (RFC 2045 §2.8), fix the sending software",
        smtp_code=550, enhanced="5.6.0", reason=Reason.SMUGGLING,
    )


def _has_long_line(lines: bytes) -> bool:
    """Whether a line of `lines` (which begins a line and ends with CRLF, with no bare CR or
    LF) is longer than MAX_LINE. Each step jumps to the last CRLF within the next MAX_LINE + 2
    octets: none there means the line that starts here is too long; otherwise every line up to
    that CRLF fits. About one step per kilobyte, however short the lines."""
    window = MAX_LINE + 2
    position, end = 0, len(lines)
    while end - position > window:
        last = lines.rfind(b"\r\n", position, position + window)
        if last < 0:
            return True
        position = last + 2
    return False


class DataReader:
    """Finds the end of DATA and undoes dot-stuffing, in bounded memory.

    Fed the octets that follow the 354 reply as they arrive. The CRLF of the DATA command
    counts as the first of the terminator, so a lone dot at once is an empty message. While the
    message is within `limit` and well formed, each run of complete lines is checked (no bare
    CR or LF, no NUL, at most 998 octets a line), de-stuffed (RFC 5321 §4.5.2) and kept; an
    unfinished last line waits for its CRLF. From the first fault on nothing more is kept: the
    rest is only searched for the terminator, with the last four octets carried across chunks,
    and the fault is the reply once it comes.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.received = 0  # octets consumed, up to and including the terminator
        self.error: GatewayError | None = None
        self._blocks: list[bytes] = []  # de-stuffed runs of complete lines, in order
        self._kept = 0  # octets in _blocks
        self._pending = b""  # the unfinished line, from its first octet (no CRLF in it)
        self._carry = b""  # once faulted: the last octets seen, for a terminator across chunks

    def feed(self, chunk: bytes) -> int | None:
        """Consume `chunk`: None while DATA goes on, else the offset in `chunk` just past
        <CRLF>.<CRLF> (what follows is the peer's next command)."""
        end = self._keep(chunk) if self.error is None else self._discard(chunk)
        self.received += len(chunk) if end is None else end
        return end

    def content(self) -> bytes:
        """The message as the sender wrote it, once `feed` found the end without `error`.

        The blocks are joined once and the reader keeps only the result, so the message is not
        held twice once this returns."""
        if len(self._blocks) != 1:
            self._blocks = [b"".join(self._blocks)]
        return self._blocks[0]

    def buffered(self) -> int:
        """Octets held."""
        return self._kept + len(self._pending) + len(self._carry)

    def _keep(self, chunk: bytes) -> int | None:
        start = len(self._pending)
        data = self._pending + chunk if start else bytes(chunk)
        # `data` begins a line, so a lone dot there is the end.
        if data.startswith(b".\r\n"):
            self._pending = b""
            return 3 - start
        # What was pending holds no CRLF: only its last octet (a CR) can begin one.
        since = start - 1 if start else 0
        # The terminator is one kind of line that begins with a dot: where there is none, no
        # search for it and no de-stuffing (one pass instead of three).
        dot = data.find(b"\r\n.", since)
        found = data.find(_TERMINATOR, dot) if dot >= 0 else -1
        if found >= 0:
            self._pending = b""
            self._lines(data, found + 2, dot < found)
            return found + len(_TERMINATOR) - start
        last = data.rfind(b"\r\n", since)
        rest = data
        if last >= 0:
            self._lines(data, last + 2, 0 <= dot < last)
            rest = data[last + 2 :]
        # + 1: a CR may await its LF; + 1 more for a dot added for transparency.
        if self.error is None and len(rest) > MAX_LINE + 1 + rest.startswith(b"."):
            self.error = _line_too_long()
        if self.error is None and self._kept + len(rest) > self.limit:
            self.error = _too_large()
        if self.error is not None:
            # The CRLF before `rest` (a line end, or the DATA command's) may open the terminator.
            self._carry = (b"\r\n" + rest[-_CARRY:])[-_CARRY:]
            self._blocks, self._kept, self._pending = [], 0, b""
            return None
        self._pending = rest
        return None

    def _lines(self, data: bytes, end: int, stuffed: bool) -> None:
        """Check and keep `data[:end]`, which begins a line and ends with CRLF; `stuffed`: a
        line after the first may begin with a dot."""
        if self.error is not None:
            return
        lines = data[:end] if end < len(data) else data
        line_ends = lines.count(b"\r\n")
        if b"\x00" in lines:
            self.error = _nul()
        elif lines.count(b"\r") != line_ends or lines.count(b"\n") != line_ends:
            # Every CR and every LF belongs to a CRLF pair exactly when the three counts agree.
            self.error = _bare_line_end()
        else:
            if lines.startswith(b"."):
                lines = lines[1:]
            if stuffed:
                lines = lines.replace(b"\r\n.", b"\r\n")
            # Measured after de-stuffing: the dot added for transparency does not count
            # (RFC 5321 §4.5.3.1.6).
            if _has_long_line(lines):
                self.error = _line_too_long()
                return
            self._kept += len(lines)
            if self._kept > self.limit:
                self.error = _too_large()
            else:
                self._blocks.append(lines)

    def _discard(self, chunk: bytes) -> int | None:
        window = self._carry + chunk
        found = window.find(_TERMINATOR)
        if found >= 0:
            return found + len(_TERMINATOR) - len(self._carry)
        self._carry = window[-_CARRY:]
        return None
