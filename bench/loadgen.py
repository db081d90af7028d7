"""The one load generator for every system measured.

- `load`: N concurrent SMTP connections, each sending the same message back to back (MAIL,
  R x RCPT, DATA) until a deadline: the throughput cells. It counts the 250 replies to the
  final dot, i.e. what the relay accepted; the sink counts what came out at the other end.
- `paced`: messages started at a fixed rate (open loop: the schedule does not wait for the
  relay, up to a pool of connections), each with a Message-ID of its own, and the time of
  every 250: the latency cells, matched with the sink's times (`bench.stampsink`).

Plain sockets and a minimal client (no pipelining, no TLS), so that its own cost is small and
identical whatever it talks to. Every reply is awaited for at most REPLY_TIMEOUT seconds: a
relay that hangs ends the cell with an error instead of hanging the benchmark.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

REPLY_TIMEOUT = 300.0  # far above a 36 MiB message to a slow relay; only a hang reaches it


@dataclass
class Sent:
    accepted: int = 0
    refused: int = 0
    first: float = 0.0
    last: float = 0.0  # when the last 250 came


@dataclass
class Paced:
    rate: float  # messages per second asked for
    accepted: dict[str, float] = field(default_factory=dict)  # Message-ID -> time of the 250
    refused: int = 0
    late: list[float] = field(default_factory=list)  # how far behind schedule each send began
    first: float = 0.0
    last: float = 0.0


def dot_stuff(message: bytes) -> bytes:
    body = message.replace(b"\r\n.", b"\r\n..")
    if body.startswith(b"."):
        body = b"." + body
    if not body.endswith(b"\r\n"):
        body += b"\r\n"
    return body + b".\r\n"


class Client:
    """One SMTP connection on which transactions are run one after the other."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @staticmethod
    async def open(port: int) -> Client:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", port, limit=1 << 20), REPLY_TIMEOUT)
        client = Client(reader, writer)
        await client.reply()
        writer.write(b"EHLO loadgen.bench\r\n")
        await client.reply()
        return client

    async def reply(self) -> bytes:
        while True:
            line = await asyncio.wait_for(self.reader.readline(), REPLY_TIMEOUT)
            if not line:
                raise ConnectionError("connection closed")
            if line[3:4] != b"-":
                return line

    async def transaction(self, sender: str, recipients: Sequence[str], data: bytes) -> bool:
        """One message (`data` already dot-stuffed); True when the relay said 250 to it."""
        self.writer.write(f"MAIL FROM:<{sender}>\r\n".encode())
        if not (await self.reply()).startswith(b"250"):
            self.writer.write(b"RSET\r\n")
            await self.reply()
            return False
        for recipient in recipients:
            self.writer.write(f"RCPT TO:<{recipient}>\r\n".encode())
            await self.reply()
        self.writer.write(b"DATA\r\n")
        if not (await self.reply()).startswith(b"354"):
            self.writer.write(b"RSET\r\n")
            await self.reply()
            return False
        self.writer.write(data)
        await asyncio.wait_for(self.writer.drain(), REPLY_TIMEOUT)
        return (await self.reply()).startswith(b"250")

    async def close(self) -> None:
        try:
            self.writer.write(b"QUIT\r\n")
            await asyncio.wait_for(self.writer.drain(), 5)
        except (ConnectionError, TimeoutError):
            pass
        finally:
            self.writer.close()


async def _connection(port: int, sender: str, recipients: tuple[str, ...], data: bytes,
                      deadline: float, limit: int | None, sent: Sent) -> None:
    client = await Client.open(port)
    try:
        while time.monotonic() < deadline and (limit is None or sent.accepted < limit):
            if await client.transaction(sender, recipients, data):
                sent.accepted += 1
                sent.last = time.monotonic()
            else:
                sent.refused += 1
    finally:
        await client.close()


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


async def paced(port: int, sender: str, recipients: tuple[str, ...],
                messages: Sequence[tuple[str, bytes]], rate: float, connections: int) -> Paced:
    """Start one message every 1/`rate` seconds, each on a free connection of a pool of
    `connections`; a send that finds none free waits, and its lateness is recorded (a pool
    always busy means the relay cannot take `rate`)."""
    result = Paced(rate)
    pool: asyncio.Queue[Client] = asyncio.Queue()
    clients = [await Client.open(port) for _ in range(connections)]
    for client in clients:
        pool.put_nowait(client)

    async def send(client: Client, message_id: str, data: bytes) -> None:
        try:
            if await client.transaction(sender, recipients, data):
                result.accepted[message_id] = result.last = time.monotonic()
            else:
                result.refused += 1
        finally:
            pool.put_nowait(client)

    stuffed = [(message_id, dot_stuff(raw)) for message_id, raw in messages]
    tasks: list[asyncio.Task[None]] = []
    result.first = start = time.monotonic() + 0.05
    try:
        for index, (message_id, data) in enumerate(stuffed):
            due = start + index / rate
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            client = await asyncio.wait_for(pool.get(), REPLY_TIMEOUT)
            result.late.append(max(0.0, time.monotonic() - due))
            tasks.append(asyncio.create_task(send(client, message_id, data)))
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.gather(*(client.close() for client in clients), return_exceptions=True)
    return result
