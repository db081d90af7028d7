"""`python -m bench.stampsink PORT LOG`: the next hop of the latency, memory and backlog cells.

An SMTP sink (RFC 5321 server side, just enough of it) that writes one line per transaction to
LOG: the CLOCK_MONOTONIC time at which it sends its 250 to the final dot, the Message-ID of the
message, the number of recipients and the size. CLOCK_MONOTONIC is one clock for every process
on the machine, so the load generator's 250 times and these compare directly. `smtp-sink` is
faster but only counts; this one is used wherever a per-message time is needed, and the same
for every system measured.

Raw asyncio rather than aiosmtpd: the latency measured should be the relay's, so the sink reads
DATA in one `readuntil` of the terminator (linear in the size) and keeps nothing but the
header block. Commands are answered one at a time in order, which also serves a pipelining
client. Untrusted input: whatever the relay sends; lines and messages are bounded (a line over
4 KiB or a message over 128 MiB closes the connection).
"""

from __future__ import annotations

import asyncio
import re
import signal
import sys
import time
from typing import IO

_MESSAGE_ID = re.compile(rb"^message-id:[ \t]*(?:\r\n[ \t]+)?(<[^>\r\n]{1,250}>)",
                         re.IGNORECASE | re.MULTILINE)
_LINE = 4096
_MESSAGE = 128 * 1024 * 1024
_IDLE = 300.0


def message_id(data: bytes) -> str:
    """The Message-ID of the header block, or "-" when it has none (a DSN without one)."""
    end = data.find(b"\r\n\r\n")
    found = _MESSAGE_ID.search(data[: end if end >= 0 else _LINE * 16])
    return found.group(1).decode("ascii", "replace") if found else "-"


class Sink:
    def __init__(self, log: IO[str]) -> None:
        self.log = log

    async def session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await self._session(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                TimeoutError, ValueError):
            pass
        finally:
            writer.close()

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 stampsink.bench ESMTP\r\n")
        recipients = 0
        while True:
            line = await asyncio.wait_for(reader.readuntil(b"\n"), _IDLE)
            if len(line) > _LINE:
                return
            verb = line[:4].upper()
            if verb == b"EHLO":
                writer.write(b"250-stampsink.bench\r\n250-PIPELINING\r\n250-8BITMIME\r\n"
                             b"250-SIZE 134217728\r\n250 ENHANCEDSTATUSCODES\r\n")
            elif verb == b"HELO":
                writer.write(b"250 stampsink.bench\r\n")
            elif verb == b"MAIL":
                recipients = 0
                writer.write(b"250 2.1.0 Ok\r\n")
            elif verb == b"RCPT":
                recipients += 1
                writer.write(b"250 2.1.5 Ok\r\n")
            elif verb == b"DATA":
                writer.write(b"354 End data with <CR><LF>.<CR><LF>\r\n")
                data = await asyncio.wait_for(reader.readuntil(b"\r\n.\r\n"), _IDLE)
                # Only the header block is looked at: dot-unstuffing cannot change a field
                # that does not start with a dot.
                found = message_id(data)
                writer.write(b"250 2.0.0 Ok: stamped\r\n")
                self.log.write(f"{time.monotonic():.6f} {found} {recipients} {len(data)}\n")
                self.log.flush()
                recipients = 0
            elif verb in (b"RSET", b"NOOP"):
                recipients = 0 if verb == b"RSET" else recipients
                writer.write(b"250 2.0.0 Ok\r\n")
            elif verb == b"QUIT":
                writer.write(b"221 2.0.0 Bye\r\n")
                await writer.drain()
                return
            else:
                writer.write(b"502 5.5.2 Command not recognized\r\n")
            await writer.drain()


async def main(port: int, path: str) -> None:
    with open(path, "a", encoding="ascii") as log:
        sink = Sink(log)
        server = await asyncio.start_server(sink.session, "127.0.0.1", port, limit=_MESSAGE,
                                            backlog=256)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for number in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(number, stop.set)
        async with server:
            await stop.wait()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), sys.argv[2]))
