"""The deliver stage: SMTP out to each network's relay (RFC 5321), with STARTTLS (RFC 3207),
PIPELINING (RFC 2920), DSN parameters (RFC 3461), SIZE (RFC 1870), 8BITMIME (RFC 6152),
SMTPUTF8 (RFC 6531), and every reply mapped to an outcome with an RFC 3463 enhanced status
code.

`Transport` is the seam: the queue manager only knows `send()`, and pipeline tests pass a fake.
`SmtpTransport` is the real one. A message's way out, one module each:

- here, `SmtpTransport.send`: the network's concurrency limit, a connection from the cache or
  a new one, the `PeerCheck`, and the outcomes (`gateway.outcome`);
- `gateway.smtp_connection`: opening a connection, with the TLS policy of `relay.tls`
  (`required`, `opportunistic`, `none`) and the contexts of `gateway.client_tls` (the gateway
  always presents its own certificate as a TLS client; MSSanté operators require it);
- `gateway.smtp_transaction`: MAIL, RCPT, DATA and the message, pipelined when the next hop
  offers it, and what each reply decides for the recipients;
- `gateway.smtp_wire`: commands and replies as bytes on the socket.

Connections are cached per relay, as Postfix's smtp caches them: after a transaction the
connection stays open for the next message (closed after `idle_timeout`, or after
`messages_per_connection` messages), with never more open connections to a network's relay
than `network.limits.concurrency`, which also bounds the deliveries in progress per network.
A cached connection is not probed before reuse: RSET goes first only when its last
transaction did not end (a refused MAIL, RCPT or DATA), and if the next hop turns out to have
closed it meanwhile (the connection ends, or answers 421, before the first reply of the
transaction), the message starts again on a new connection, which is not a failed attempt:
nothing that could be delivered had been sent. Bytes the next hop sends while it owes no
reply end the connection. Anything else that goes wrong drops the connection. Every step has
its own timeout, so a slow next hop only ever holds up its own network.

Untrusted input: the next hop's replies (codes, text, EHLO keywords), parsed in
`gateway.smtp_wire`, and its certificate, verified in `gateway.smtp_connection` and then
handed to the `PeerCheck`. Nothing the next hop says reaches an outcome, a log or a DSN but
as one printable line.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable, Sequence
from typing import Protocol

from cryptography import x509

from gateway.client_tls import ClientTlsContext, make_client_tls_context
from gateway.config import NetworkSettings, RelaySettings
from gateway.envelope import Recipient
from gateway.errors import GatewayError, Reason, TemporaryFailure
from gateway.outcome import Kind, Outcome, outcome_from_error
from gateway.smtp_connection import Connection, Connector
from gateway.smtp_transaction import Stale, Transaction
from gateway.smtp_wire import Disconnected, TransportStats, Unreadable, wire_form

__all__ = [
    "ClientTlsContext",
    "Kind",
    "Outcome",
    "PeerCheck",
    "SmtpTransport",
    "Transport",
    "TransportStats",
    "make_client_tls_context",
]

log = logging.getLogger("gateway.delivery")

PeerCheck = Callable[[NetworkSettings, Sequence[Recipient], x509.Certificate | None], None]
"""Called once per send with the next hop's certificate (None in clear text). Raising a
`GatewayError` refuses to send: the recipients get that error's outcome."""


class Transport(Protocol):
    async def send(
        self,
        network: NetworkSettings,
        sender: str,
        recipients: Sequence[Recipient],
        message: bytes,
        *,
        envid: str | None,
        ret: str | None,
    ) -> list[Outcome]:
        """Deliver `message` to `recipients` through `network`'s relay; one outcome each, in
        order. Never raises for a delivery problem: every failure is an outcome."""
        ...


_RelayKey = tuple[str, int, str]


class SmtpTransport:
    """Delivery over SMTP with per-relay connection reuse and per-network concurrency."""

    def __init__(
        self,
        hostname: str,
        client_context: ssl.SSLContext | None = None,
        *,
        peer_check: PeerCheck | None = None,
        connect_timeout: float = 30.0,
        command_timeout: float = 300.0,  # RFC 5321 §4.5.3.2: 5 minutes for MAIL and RCPT
        data_timeout: float = 600.0,  # ... and 10 minutes for the reply to the final dot
        idle_timeout: float = 5.0,
        idle_per_relay: int | None = None,
        messages_per_connection: int = 100,
    ) -> None:
        self.hostname = hostname
        self.context = client_context
        self.peer_check = peer_check
        self.connect_timeout = connect_timeout
        self.command_timeout = command_timeout
        self.data_timeout = data_timeout
        self.idle_timeout = idle_timeout
        self.idle_per_relay = idle_per_relay  # None: the network's limits.concurrency
        self.messages_per_connection = messages_per_connection
        self._idle: dict[_RelayKey, list[Connection]] = {}
        self._limits: dict[str, tuple[int, asyncio.Semaphore]] = {}
        self._closing: set[asyncio.Task[None]] = set()
        self._closed = False
        self.stats = TransportStats()

    # -- public ---------------------------------------------------------------------------

    async def send(
        self,
        network: NetworkSettings,
        sender: str,
        recipients: Sequence[Recipient],
        message: bytes,
        *,
        envid: str | None,
        ret: str | None,
    ) -> list[Outcome]:
        if not recipients:
            return []
        relay = network.relay
        if relay is None:
            error = TemporaryFailure(
                f"The network {network.name} has no relay configured, so mail for it cannot be "
                "sent; the operator must add one to routing.yaml.",
                enhanced="4.3.5", reason=Reason.NEXT_HOP_UNAVAILABLE,
            )
            return [outcome_from_error(r.address, error, None) for r in recipients]
        async with self._limit(network):
            try:
                return await self._send(network, relay, sender, recipients, message, envid, ret)
            except GatewayError as failure:
                return [outcome_from_error(r.address, failure, None) for r in recipients]
            except Exception:
                # A bug here must not lose the message or pretend it left: defer and say so.
                log.exception("delivery to %s:%d failed unexpectedly", relay.host, relay.port)
                internal = TemporaryFailure(
                    "The gateway met an internal error while sending; it will try again.",
                    enhanced="4.3.0", reason=Reason.INTERNAL,
                )
                return [outcome_from_error(r.address, internal, None) for r in recipients]

    async def close(self) -> None:
        """Close every pooled connection (politely, with QUIT) and wait for them."""
        self._closed = True
        for connections in self._idle.values():
            for connection in connections:
                self._discard(connection)
        self._idle.clear()
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)

    # -- one send --------------------------------------------------------------------------

    def _limit(self, network: NetworkSettings) -> asyncio.Semaphore:
        limit = max(1, network.limits.concurrency)
        current = self._limits.get(network.name)
        if current is None or current[0] != limit:
            # A reload changed the limit: deliveries under the old semaphore finish under it.
            current = (limit, asyncio.Semaphore(limit))
            self._limits[network.name] = current
        return current[1]

    async def _send(
        self,
        network: NetworkSettings,
        relay: RelaySettings,
        sender: str,
        recipients: Sequence[Recipient],
        message: bytes,
        envid: str | None,
        ret: str | None,
    ) -> list[Outcome]:
        payload = wire_form(message)
        for fresh in (False, True):
            connection = await self._acquire(relay, fresh=fresh)
            finished = False
            try:
                if relay.tls == "required" and not (connection.encrypted and connection.verified):
                    # Connector.connect() never returns such a connection; this guards the promise
                    # anyway.
                    raise TemporaryFailure(
                        "The connection to the next hop is not verified TLS, which it must be.",
                        enhanced="4.7.5", reason=Reason.NEXT_HOP_UNTRUSTED,
                    )
                if self.peer_check is not None:
                    try:
                        self.peer_check(network, recipients, connection.certificate)
                    except GatewayError:
                        finished = True  # nothing was started on the connection: keep it
                        raise
                outcomes = await Transaction(
                    connection, sender, recipients, message, payload, envid, ret,
                    stats=self.stats, command_timeout=self.command_timeout,
                    data_timeout=self.data_timeout,
                ).run()
                finished = True
                return outcomes
            except Stale:
                # Closed by the next hop while it sat in the cache: not a delivery failure,
                # and nothing it could deliver was sent. Once more, on a new connection.
                self.stats.stale += 1
                log.debug("%s:%d closed a cached connection; sending on a new one",
                          relay.host, relay.port)
            finally:
                if finished and connection.usable:
                    self._release(connection, network)
                else:
                    # Cancelled or failed mid-command: the conversation is out of step, so no
                    # QUIT, just close.
                    self._discard(connection, polite=False)
        raise AssertionError("a new connection is never stale")  # pragma: no cover

    # -- the pool --------------------------------------------------------------------------

    @staticmethod
    def _key(relay: RelaySettings) -> _RelayKey:
        return (relay.host, relay.port, relay.tls)

    async def _acquire(self, relay: RelaySettings, *, fresh: bool = False) -> Connection:
        """A cached connection to `relay` (the most recently used: the least likely to have
        been closed by the next hop meanwhile), or a new one. No command is spent on checking
        it: a transaction whose connection proves closed before any reply starts again on a
        new one (`Stale`)."""
        idle = self._idle.get(self._key(relay), [])
        while idle and not fresh:
            connection = idle.pop()
            if connection.expiry is not None:
                connection.expiry.cancel()
                connection.expiry = None
            if not connection.usable:
                self._discard(connection)
                continue
            connection.reused = True
            return connection
        return await self._connect(relay)

    def _release(self, connection: Connection, network: NetworkSettings) -> None:
        connection.messages += 1
        connection.reused = False
        idle = self._idle.setdefault(self._key(connection.relay), [])
        # Never more open connections than deliveries may run at once to this network: one
        # is only opened when none is idle, and at most `concurrency` are in use.
        limit = self.idle_per_relay or max(1, network.limits.concurrency)
        if (
            self._closed
            or connection.messages >= self.messages_per_connection
            or len(idle) >= limit
        ):
            self._discard(connection)
            return
        loop = asyncio.get_running_loop()
        connection.expiry = loop.call_later(self.idle_timeout, self._expire, connection)
        idle.append(connection)

    def _expire(self, connection: Connection) -> None:
        idle = self._idle.get(self._key(connection.relay), [])
        if connection in idle:
            idle.remove(connection)
        connection.expiry = None
        self._discard(connection)

    def _discard(self, connection: Connection, *, polite: bool = True) -> None:
        if connection.expiry is not None:
            connection.expiry.cancel()
            connection.expiry = None
        if not polite or not connection.usable:
            connection.wire.abort()
            return
        task = asyncio.get_running_loop().create_task(self._quit(connection))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    @staticmethod
    async def _quit(connection: Connection) -> None:
        wire = connection.wire
        try:
            # QUIT also ends a transaction left open (RFC 5321 §4.1.1.10): no RSET first.
            wire.send(b"QUIT\r\n", replies=1)
            await wire.read(5.0)
        except (Disconnected, Unreadable, TimeoutError, OSError):
            pass  # the server went first; nothing to say goodbye to
        finally:
            wire.close()

    # -- opening a connection ----------------------------------------------------------------

    async def _connect(self, relay: RelaySettings) -> Connection:
        """A new connection to `relay`, opened with the transport's settings as they are now."""
        connector = Connector(self.hostname, self.context, self.connect_timeout,
                              self.command_timeout, self.stats)
        return await connector.connect(relay)
