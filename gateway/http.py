"""The metrics endpoint: `/metrics` (Prometheus text format) and `/healthz`, on asyncio.

Untrusted input: one HTTP/1.x request line and its headers from whoever can reach the port
(bind it to loopback or a monitoring network). Only GET of those two paths is answered; the
request is read with a size limit and a timeout, and the connection is closed after the reply.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

__all__ = ["MetricsServer"]

Health = Callable[[], tuple[bool, str]]


class MetricsServer:
    def __init__(self, registry: CollectorRegistry, health: Health) -> None:
        self.registry = registry
        self.health = health
        self.server: asyncio.Server | None = None

    async def start(self, address: str, port: int) -> None:
        self.server = await asyncio.start_server(self._serve, address, port)

    @property
    def port(self) -> int:
        assert self.server is not None
        port: int = self.server.sockets[0].getsockname()[1]
        return port

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            writer.close()
            return
        method, _, rest = head.split(b"\r\n", 1)[0].partition(b" ")
        path = rest.split(b" ", 1)[0].split(b"?", 1)[0]
        if method != b"GET":
            status, body, kind = "405 Method Not Allowed", b"GET only\n", "text/plain"
        elif path == b"/metrics":
            status, body, kind = "200 OK", generate_latest(self.registry), CONTENT_TYPE_LATEST
        elif path == b"/healthz":
            ready, why = self.health()
            status = "200 OK" if ready else "503 Service Unavailable"
            body, kind = (why + "\n").encode(), "text/plain"
        else:
            status, body, kind = "404 Not Found", b"/metrics or /healthz\n", "text/plain"
        writer.write(
            f"HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {len(body)}\r\n"
            f"Connection: close\r\n\r\n".encode() + body
        )
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        writer.close()
