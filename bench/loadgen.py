"""The one load generator for every system measured: N concurrent SMTP connections, each
sending the same message back to back (MAIL, R x RCPT, DATA) until a deadline.

Plain sockets and a minimal client (no pipelining, no TLS), so that its own cost is small and
identical whatever it talks to. It counts the 250 replies to the final dot: what the relay
accepted. The sink (`smtp-sink`) counts what came out at the other end.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass


@dataclass
class Sent:
    accepted: int = 0
    refused: int = 0
    first: float = 0.0
    last: float = 0.0  # when the last 250 came


def dot_stuff(message: bytes) -> bytes:
    body = message.replace(b"\r\n.", b"\r\n..")
    if body.startswith(b"."):
        body = b"." + body
    if not body.endswith(b"\r\n"):
        body += b"\r\n"
    return body + b".\r\n"


async def _reply(reader: asyncio.StreamReader) -> bytes:
    while True:
        line = await reader.readline()
        if not line:
            raise ConnectionError("connection closed")
        if line[3:4] != b"-":
            return line


async def _connection(port: int, sender: str, recipients: tuple[str, ...], data: bytes,
                      deadline: float, limit: int | None, sent: Sent) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 20)
    try:
        await _reply(reader)
        writer.write(b"EHLO loadgen.bench\r\n")
        await _reply(reader)
        while time.monotonic() < deadline and (limit is None or sent.accepted < limit):
            writer.write(f"MAIL FROM:<{sender}>\r\n".encode())
            if not (await _reply(reader)).startswith(b"250"):
                sent.refused += 1
                writer.write(b"RSET\r\n")
                await _reply(reader)
                continue
            for recipient in recipients:
                writer.write(f"RCPT TO:<{recipient}>\r\n".encode())
                await _reply(reader)
            writer.write(b"DATA\r\n")
            if not (await _reply(reader)).startswith(b"354"):
                sent.refused += 1
                writer.write(b"RSET\r\n")
                await _reply(reader)
                continue
            writer.write(data)
            await writer.drain()
            reply = await _reply(reader)
            if reply.startswith(b"250"):
                sent.accepted += 1
                sent.last = time.monotonic()
            else:
                sent.refused += 1
        writer.write(b"QUIT\r\n")
        await writer.drain()
    finally:
        writer.close()


async def load(port: int, sender: str, recipients: tuple[str, ...], message: bytes,
               connections: int, seconds: float, limit: int | None = None) -> Sent:
    """Send for `seconds` (or until `limit` messages were accepted) over `connections`."""
    sent = Sent(first=time.monotonic())
    data = dot_stuff(message)
    deadline = sent.first + seconds
    await asyncio.gather(*(
        _connection(port, sender, recipients, data, deadline, limit, sent)
        for _ in range(connections)
    ))
    return sent
