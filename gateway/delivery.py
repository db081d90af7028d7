"""The deliver stage: SMTP out to each network's relay (RFC 5321), with STARTTLS (RFC 3207),
DSN parameters (RFC 3461), SIZE (RFC 1870), 8BITMIME (RFC 6152), SMTPUTF8 (RFC 6531), and
every reply mapped to an outcome with an RFC 3463 enhanced status code.

`Transport` is the seam: the queue manager only knows `send()`, and pipeline tests pass a fake.
`SmtpTransport` is the real one, built on aiosmtplib.

TLS towards the next hop, per `relay.tls`:

- `required`: STARTTLS must be offered and the handshake must verify the next hop's certificate
  against the configured trust anchors (never the system store) and its host name. Anything
  else defers the recipients with a sentence saying why; not one byte of the message is sent
  in clear.
- `opportunistic`: STARTTLS when offered, verified when possible. If verification fails the
  gateway reconnects and encrypts without authenticating the next hop (RFC 7435: unauthenticated
  encryption is still better than the clear text this mode would otherwise allow) and logs a
  warning naming the reason. Clear text only for a next hop whose EHLO does not offer STARTTLS.
  Once STARTTLS is offered, anything that keeps the session from being encrypted defers the
  recipients instead of continuing in clear: a refusal (454, or any reply but 220), an
  unreadable reply, a handshake that fails outright, a next hop that stops offering STARTTLS on
  the reconnection. Otherwise a man in the middle could force a downgrade just by breaking the
  handshake or rewriting one reply.
- `none`: clear text.

The gateway always presents its own certificate as a TLS client (MSSanté operators require it).

Connections are pooled per relay: after a transaction the connection is kept idle (a few per
relay, closed after `idle_timeout`), probed with RSET before reuse, and dropped when anything
went wrong on it. `network.limits.concurrency` bounds the deliveries in progress per network,
and every step has its own timeout, so a slow next hop only ever holds up its own network.

The message is handed to aiosmtplib as bytes; the library dot-stuffs it and turns any bare CR
or LF into CRLF. The pipeline hands over CRLF messages, so in practice the bytes arrive
unchanged, and a stray bare LF cannot end DATA early at the next hop (SMTP smuggling).

Replies (RFC 5321 §4.2, §4.3.2): a recipient counts as delivered only when MAIL FROM got 250,
its RCPT TO got 250 or 251 (251: the next hop will forward it), and the end of DATA got 250.
4xx defers, 5xx bounces. Any other reply where a success is expected (252, which answers VRFY
and EXPN, another 2xx, a 3xx, a code outside 200-599, or a DATA command answered with anything
but 354) is a next hop out of step with the protocol: the recipients are deferred with the
reply quoted in their last reply (451 4.5.0), never counted as delivered, and the connection
is not reused. The transport speaks SMTP only, so the end of DATA has one reply for the whole
transaction (no LMTP per-recipient replies, RFC 2033).

Untrusted input: the next hop's replies (codes, text, EHLO keywords) and its certificate.
Reply text is reduced to one printable line before it reaches an outcome, a log or a DSN.
"""

from __future__ import annotations

import asyncio
import logging
import re
import socket
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol, TypeVar

import aiosmtplib
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from gateway.config import NetworkSettings, RelaySettings
from gateway.envelope import Recipient
from gateway.errors import GatewayError, PermanentFailure, Reason, TemporaryFailure

__all__ = [
    "ClientTlsContext",
    "Outcome",
    "PeerCheck",
    "SmtpTransport",
    "Transport",
    "make_client_tls_context",
]

log = logging.getLogger("gateway.delivery")

Kind = Literal["delivered", "deferred", "bounced"]

PeerCheck = Callable[[NetworkSettings, Sequence[Recipient], x509.Certificate | None], None]
"""Called once per send with the next hop's certificate (None in clear text). Raising a
`GatewayError` refuses to send: the recipients get that error's outcome."""


@dataclass(frozen=True)
class Outcome:
    """What became of one recipient in one delivery attempt."""

    address: str
    kind: Kind
    code: int  # the SMTP reply code, the remote's or one the gateway chose
    enhanced: str  # RFC 3463 code, from the reply or inferred
    text: str  # the remote reply's text, or the gateway's own sentence
    reason: Reason | None  # None when delivered
    remote_mta: str | None = None  # the next hop that answered, for the DSN's Remote-MTA


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


# -- TLS ------------------------------------------------------------------------------------


class ClientTlsContext(ssl.SSLContext):
    """The verifying client context, carrying an unverified twin with the same client
    certificate for the `opportunistic` fallback (an SSLContext cannot be copied)."""

    unverified: ssl.SSLContext | None = None


def make_client_tls_context(
    anchors: Sequence[Path | x509.Certificate],
    certificate: Path | None,
    key: Path | None,
) -> ClientTlsContext:
    """A TLS 1.2+ client context that verifies the next hop against `anchors` only (not the
    system store), checks its host name, and presents the gateway's certificate when given."""
    context = _client_context(ClientTlsContext, certificate, key)
    context.verify_mode = ssl.CERT_REQUIRED
    context.check_hostname = True
    # Every configured anchor is trusted as such, including an intermediate CA (as IGC-Santé
    # operators sometimes configure), without requiring the chain to reach a self-signed root.
    context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    pem: list[str] = []
    for anchor in anchors:
        if isinstance(anchor, x509.Certificate):
            pem.append(anchor.public_bytes(serialization.Encoding.PEM).decode("ascii"))
        else:
            data = Path(anchor).read_bytes()
            if b"-----BEGIN" not in data:  # a single DER certificate
                data = x509.load_der_x509_certificate(data).public_bytes(
                    serialization.Encoding.PEM
                )
            pem.append(data.decode("ascii"))
    if pem:
        context.load_verify_locations(cadata="".join(pem))
    unverified = _client_context(ssl.SSLContext, certificate, key)
    unverified.check_hostname = False
    unverified.verify_mode = ssl.CERT_NONE
    context.unverified = unverified
    return context


_Context = TypeVar("_Context", bound=ssl.SSLContext)


def _client_context(kind: type[_Context], certificate: Path | None, key: Path | None) -> _Context:
    context = kind(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options |= ssl.OP_NO_COMPRESSION
    if certificate is not None:
        context.load_cert_chain(certificate, key)
    return context


# -- replies ----------------------------------------------------------------------------------

_ENHANCED = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})(?=\s|$)")
_UNSAFE_ADDRESS = re.compile(r"[\x00-\x20\x7f<>]")
_MAX_TEXT = 500


def _reply_text(message: str) -> str:
    """A reply's text as one printable line, without the enhanced codes of its lines."""
    parts = []
    for line in message.splitlines():
        line = _ENHANCED.sub("", line.strip()).strip()
        if line:
            parts.append(line)
    text = " ".join(parts)
    text = "".join(c if c.isprintable() else " " for c in text)
    return " ".join(text.split())[:_MAX_TEXT]


def _enhanced(code: int, message: str, default_detail: str = "0.0") -> str:
    """The enhanced code the server gave (RFC 2034), if its class agrees with the reply code."""
    match = _ENHANCED.match(message.strip())
    if match and str(code).startswith(match.group(1)):
        return ".".join(match.groups())
    klass = str(code)[:1] if 200 <= code < 600 else "4"
    return f"{klass}.{default_detail}"


def _refusal(code: int) -> Kind | None:
    """What a 4xx or 5xx reply means for the recipients it answers; None for any other code
    (a success is decided by the caller, which knows which code the command may succeed with)."""
    if 400 <= code < 500:
        return "deferred"
    if 500 <= code < 600:
        return "bounced"
    return None


# -- the transport ----------------------------------------------------------------------------


@dataclass(eq=False)
class _Connection:
    smtp: aiosmtplib.SMTP
    relay: RelaySettings
    encrypted: bool
    verified: bool
    certificate: x509.Certificate | None
    messages: int = 0
    expiry: asyncio.TimerHandle | None = field(default=None, repr=False)

    @property
    def usable(self) -> bool:
        return self.smtp.is_connected


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
        idle_timeout: float = 30.0,
        idle_per_relay: int = 4,
        messages_per_connection: int = 100,
    ) -> None:
        self.hostname = hostname
        self.context = client_context
        self.peer_check = peer_check
        self.connect_timeout = connect_timeout
        self.command_timeout = command_timeout
        self.data_timeout = data_timeout
        self.idle_timeout = idle_timeout
        self.idle_per_relay = idle_per_relay
        self.messages_per_connection = messages_per_connection
        self._idle: dict[_RelayKey, list[_Connection]] = {}
        self._limits: dict[str, tuple[int, asyncio.Semaphore]] = {}
        self._closing: set[asyncio.Task[None]] = set()
        self._closed = False

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
            return [_from_error(r.address, error, None) for r in recipients]
        async with self._limit(network):
            try:
                return await self._send(network, relay, sender, recipients, message, envid, ret)
            except GatewayError as failure:
                return [_from_error(r.address, failure, None) for r in recipients]
            except Exception:
                # A bug here must not lose the message or pretend it left: defer and say so.
                log.exception("delivery to %s:%d failed unexpectedly", relay.host, relay.port)
                internal = TemporaryFailure(
                    "The gateway met an internal error while sending; it will try again.",
                    enhanced="4.3.0", reason=Reason.INTERNAL,
                )
                return [_from_error(r.address, internal, None) for r in recipients]

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
        connection = await self._acquire(relay)
        finished = False
        try:
            if relay.tls == "required" and not (connection.encrypted and connection.verified):
                # _connect() never returns such a connection; this guards the promise anyway.
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
            outcomes = await _Transaction(
                self, connection, sender, recipients, message, envid, ret
            ).run()
            finished = True
            return outcomes
        finally:
            if finished and connection.usable:
                self._release(connection)
            else:
                # Cancelled or failed mid-command: the conversation is out of step, so no
                # QUIT, just close.
                self._discard(connection, polite=False)

    # -- the pool --------------------------------------------------------------------------

    @staticmethod
    def _key(relay: RelaySettings) -> _RelayKey:
        return (relay.host, relay.port, relay.tls)

    async def _acquire(self, relay: RelaySettings) -> _Connection:
        idle = self._idle.get(self._key(relay), [])
        while idle:
            connection = idle.pop()  # the most recently used is the least likely to be stale
            if connection.expiry is not None:
                connection.expiry.cancel()
                connection.expiry = None
            if not connection.usable:
                self._discard(connection)
                continue
            try:
                # RSET both proves the connection alive and clears any half-finished
                # transaction (RFC 5321 §4.1.1.5) before the next MAIL FROM.
                reply = await connection.smtp.execute_command(
                    b"RSET", timeout=min(self.command_timeout, 30.0)
                )
            except (aiosmtplib.SMTPException, OSError):
                self._discard(connection)
                continue
            if reply.code != 250:
                self._discard(connection)
                continue
            return connection
        return await self._connect(relay)

    def _release(self, connection: _Connection) -> None:
        connection.messages += 1
        idle = self._idle.setdefault(self._key(connection.relay), [])
        if (
            self._closed
            or connection.messages >= self.messages_per_connection
            or len(idle) >= self.idle_per_relay
        ):
            self._discard(connection)
            return
        loop = asyncio.get_running_loop()
        connection.expiry = loop.call_later(self.idle_timeout, self._expire, connection)
        idle.append(connection)

    def _expire(self, connection: _Connection) -> None:
        idle = self._idle.get(self._key(connection.relay), [])
        if connection in idle:
            idle.remove(connection)
        connection.expiry = None
        self._discard(connection)

    def _discard(self, connection: _Connection, *, polite: bool = True) -> None:
        if connection.expiry is not None:
            connection.expiry.cancel()
            connection.expiry = None
        if not polite or not connection.usable:
            connection.smtp.close()
            return
        task = asyncio.get_running_loop().create_task(self._quit(connection))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    @staticmethod
    async def _quit(connection: _Connection) -> None:
        try:
            await connection.smtp.quit(timeout=5.0)
        except (aiosmtplib.SMTPException, OSError):
            pass  # the server went first; nothing to say goodbye to
        finally:
            connection.smtp.close()

    # -- opening a connection ----------------------------------------------------------------

    async def _connect(self, relay: RelaySettings) -> _Connection:
        where = f"{relay.host}:{relay.port}"
        smtp = await self._open(relay, where)
        try:
            if relay.tls == "none":
                return _Connection(smtp, relay, False, False, None)
            offered = smtp.supports_extension("starttls")
            if relay.tls == "required":
                if not offered:
                    raise TemporaryFailure(
                        f"The next hop {where} does not offer STARTTLS, and TLS is required for "
                        "it; nothing was sent. Its operator must enable STARTTLS.",
                        enhanced="4.7.4", reason=Reason.NEXT_HOP_UNTRUSTED,
                    )
                if self.context is None:
                    raise TemporaryFailure(
                        "TLS is required for the next hop but the gateway has no TLS client "
                        "configuration; nothing was sent.",
                        enhanced="4.3.5", reason=Reason.NEXT_HOP_UNTRUSTED,
                    )
                return await self._starttls(smtp, relay, self.context, verified=True)
            # opportunistic
            if not offered:
                return _Connection(smtp, relay, False, False, None)
            context = self.context
            if context is None:
                # No TLS client configuration at all: encryption without authentication is
                # still what opportunistic promises.
                return await self._starttls(smtp, relay, _unverified_context(), verified=False)
            try:
                return await self._starttls(smtp, relay, context, verified=True)
            except _Untrusted as untrusted:
                fallback = getattr(context, "unverified", None)
                if not isinstance(fallback, ssl.SSLContext):
                    raise
                log.warning(
                    "%s: certificate not verified (%s); relay.tls is opportunistic, so the "
                    "message is sent encrypted without authenticating the next hop",
                    where, untrusted.detail,
                )
            # The failed handshake left that connection unusable: start again, unverified.
            smtp.close()
            smtp = await self._open(relay, where)
            if not smtp.supports_extension("starttls"):
                raise TemporaryFailure(
                    f"The next hop {where} stopped offering STARTTLS after a failed handshake; "
                    "nothing was sent.",
                    enhanced="4.7.4", reason=Reason.NEXT_HOP_UNAVAILABLE,
                )
            return await self._starttls(smtp, relay, fallback, verified=False)
        except BaseException:
            smtp.close()
            raise

    async def _open(self, relay: RelaySettings, where: str) -> aiosmtplib.SMTP:
        """TCP connection, greeting and EHLO; every failure is a TemporaryFailure."""
        smtp = aiosmtplib.SMTP(
            hostname=relay.host, port=relay.port, local_hostname=self.hostname,
            timeout=self.command_timeout, start_tls=False, use_tls=False,
        )
        try:
            await smtp.connect(timeout=self.connect_timeout)
        except aiosmtplib.SMTPConnectResponseError as error:
            # A 4xx/5xx greeting: the relay will not talk to us now. Like Postfix's
            # smtp_skip_5xx_greeting, even a 5xx greeting defers rather than bounces: it says
            # something about the relay, not about the recipients.
            text = _reply_text(error.message)
            raise TemporaryFailure(
                f"The next hop {where} refused the session: {error.code} {text}",
                enhanced="4.4.1" if error.code >= 500 else _enhanced(error.code, error.message),
                smtp_code=error.code if 400 <= error.code < 500 else 421,
                reason=Reason.NEXT_HOP_UNAVAILABLE,
            ) from error
        except aiosmtplib.SMTPConnectTimeoutError as error:
            raise TemporaryFailure(
                f"The next hop {where} did not answer within {self.connect_timeout:g} seconds.",
                enhanced="4.4.1", smtp_code=421, reason=Reason.NEXT_HOP_UNAVAILABLE,
            ) from error
        except aiosmtplib.SMTPConnectError as error:
            if isinstance(error.__cause__, socket.gaierror):
                raise TemporaryFailure(
                    f"The name of the next hop {relay.host} could not be resolved "
                    f"({error.__cause__.strerror}).",
                    enhanced="4.4.3", smtp_code=421, reason=Reason.NEXT_HOP_UNAVAILABLE,
                ) from error
            cause = error.__cause__
            why = cause.strerror if isinstance(cause, OSError) and cause.strerror else str(error)
            raise TemporaryFailure(
                f"The next hop {where} could not be reached: {why}.",
                enhanced="4.4.1", smtp_code=421, reason=Reason.NEXT_HOP_UNAVAILABLE,
            ) from error
        except (aiosmtplib.SMTPException, OSError) as error:
            smtp.close()
            raise _lost(where, "the greeting", error) from error
        try:
            await self._hello(smtp)
        except (aiosmtplib.SMTPException, OSError) as error:
            smtp.close()
            raise _lost(where, "EHLO", error) from error
        return smtp

    @staticmethod
    async def _hello(smtp: aiosmtplib.SMTP) -> None:
        try:
            await smtp.ehlo()
        except aiosmtplib.SMTPHeloError:
            if not smtp.is_connected:
                raise
            await smtp.helo()  # an RFC 821 server: no extensions, hence no STARTTLS

    async def _starttls(
        self,
        smtp: aiosmtplib.SMTP,
        relay: RelaySettings,
        context: ssl.SSLContext,
        *,
        verified: bool,
    ) -> _Connection:
        where = f"{relay.host}:{relay.port}"
        try:
            await smtp.starttls(server_hostname=relay.host, tls_context=context)
        except ssl.SSLCertVerificationError as error:
            raise _Untrusted(
                f"The certificate of the next hop {where} is not trusted "
                f"({error.verify_message}); nothing was sent. Either the next hop presents the "
                "wrong certificate or its CA is missing from trust.anchors.",
                detail=str(error), enhanced="4.7.5", reason=Reason.NEXT_HOP_UNTRUSTED,
            ) from error
        except ssl.SSLError as error:
            raise TemporaryFailure(
                f"The TLS handshake with the next hop {where} failed ({error.reason or error}); "
                "nothing was sent.",
                detail=str(error), enhanced="4.7.5", reason=Reason.NEXT_HOP_UNAVAILABLE,
            ) from error
        except aiosmtplib.SMTPResponseException as error:
            # It offered STARTTLS and then did not start it: whether the next hop is broken or
            # someone rewrote its reply, continuing in clear would be a downgrade.
            answer = (
                f"refused STARTTLS: {error.code} {_reply_text(error.message)}"
                if 400 <= error.code < 600
                else "answered STARTTLS with a reply that does not start TLS "
                f"({error.code} {_reply_text(error.message)})"
            )
            raise TemporaryFailure(
                f"The next hop {where} offered STARTTLS but {answer}; nothing was sent.",
                detail=f"{where} STARTTLS: {error.code} {error.message}",
                enhanced="4.7.4", reason=Reason.NEXT_HOP_UNAVAILABLE,
            ) from error
        except (aiosmtplib.SMTPException, OSError) as error:
            raise _lost(where, "STARTTLS", error) from error
        if smtp.get_transport_info("sslcontext") is None:
            raise TemporaryFailure(  # the library said yes but the channel is not encrypted
                f"STARTTLS with the next hop {where} did not encrypt the connection.",
                enhanced="4.7.5", reason=Reason.NEXT_HOP_UNTRUSTED,
            )
        certificate = _peer_certificate(smtp)
        try:
            # RFC 3207 §4.2: forget what was learnt in clear and ask again.
            await self._hello(smtp)
        except (aiosmtplib.SMTPException, OSError) as error:
            raise _lost(where, "EHLO after STARTTLS", error) from error
        return _Connection(smtp, relay, True, verified, certificate)


class _Untrusted(TemporaryFailure):
    """Verification of the next hop's certificate failed (opportunistic may fall back)."""


def _unverified_context() -> ssl.SSLContext:
    context = _client_context(ssl.SSLContext, None, None)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def _peer_certificate(smtp: aiosmtplib.SMTP) -> x509.Certificate | None:
    ssl_object = smtp.get_transport_info("ssl_object")
    if ssl_object is None:
        return None
    der = ssl_object.getpeercert(binary_form=True)
    return x509.load_der_x509_certificate(der) if der else None


def _lost(where: str, step: str, error: BaseException) -> TemporaryFailure:
    """The connection broke or timed out: RFC 3463 X.4.2 (bad connection)."""
    if isinstance(error, aiosmtplib.SMTPTimeoutError | TimeoutError):
        what = "did not answer in time"
    elif isinstance(error, aiosmtplib.SMTPResponseException):
        what = f"answered {error.code} {_reply_text(error.message)}"
    else:
        what = "closed the connection"
    return TemporaryFailure(
        f"The next hop {where} {what} during {step}.",
        detail=f"{where} during {step}: {error!r}",
        enhanced="4.4.2", smtp_code=421, reason=Reason.NEXT_HOP_UNAVAILABLE,
    )


def _from_error(address: str, error: GatewayError, remote: str | None) -> Outcome:
    return Outcome(
        address=address,
        kind="bounced" if error.permanent else "deferred",
        code=error.smtp_code,
        enhanced=error.enhanced,
        text=error.advice,
        reason=error.reason,
        remote_mta=remote,
    )


# -- one MAIL transaction -----------------------------------------------------------------------


class _Transaction:
    """MAIL, RCPT..., DATA on one open connection; an outcome for every recipient."""

    def __init__(
        self,
        transport: SmtpTransport,
        connection: _Connection,
        sender: str,
        recipients: Sequence[Recipient],
        message: bytes,
        envid: str | None,
        ret: str | None,
    ) -> None:
        self.transport = transport
        self.connection = connection
        self.smtp = connection.smtp
        self.sender = sender
        self.recipients = recipients
        self.message = message
        self.envid = envid
        self.ret = ret
        self.remote = connection.relay.host
        self.where = f"{connection.relay.host}:{connection.relay.port}"
        self.decided: dict[str, Outcome] = {}
        self.out_of_step = False  # a reply no conforming server gives: do not reuse

    def _ordered(self) -> list[Outcome]:
        return [self.decided[r.address] for r in self.recipients]

    def _delivered(self, address: str, code: int, message: str) -> None:
        self.decided[address] = Outcome(
            address, "delivered", code, _enhanced(code, message), _reply_text(message), None,
            self.remote,
        )

    def _refused(self, address: str, step: str, code: int, message: str,
                 detail: str = "0.0") -> None:
        """`step` did not succeed for `address`: a 4xx defers, a 5xx bounces, and any other
        reply defers as a protocol error (never a delivery)."""
        kind = _refusal(code)
        if kind is None:
            self.out_of_step = True
            text = _reply_text(message)
            self.decided[address] = _from_error(address, TemporaryFailure(
                f"The next hop {self.where} answered {step} with {code} {text}".rstrip()
                + ", a reply that neither accepts nor refuses it (RFC 5321 §4.2); nothing was "
                "delivered and it will be tried again.",
                detail=f"{self.where} {step}: unexpected reply {code} {text}",
                enhanced="4.5.0", smtp_code=451, reason=Reason.NEXT_HOP_UNAVAILABLE,
            ), self.remote)
            return
        if kind != "bounced":
            detail = "0.0"  # X.1.0 (address status) only for a definite refusal of an address
        self.decided[address] = Outcome(
            address, kind, code, _enhanced(code, message, detail), _reply_text(message),
            Reason.DESTINATION_REFUSED, self.remote,
        )

    def _outcomes(self) -> list[Outcome]:
        if self.out_of_step:
            # The next hop said something no conforming server says: whatever state it is in,
            # the next message must not start on this connection.
            self.smtp.close()
        return self._ordered()

    def _fail_rest(self, error: GatewayError) -> list[Outcome]:
        for recipient in self.recipients:
            self.decided.setdefault(recipient.address, _from_error(
                recipient.address, error, self.remote))
        return self._ordered()

    async def run(self) -> list[Outcome]:
        extensions = self.smtp.esmtp_extensions
        utf8 = "smtputf8" in extensions
        encoding = "utf-8" if utf8 else "ascii"

        for recipient in self.recipients:
            problem = _address_problem(recipient.address, utf8)
            if problem is not None:
                self.decided[recipient.address] = _from_error(recipient.address, problem, None)
        sender_problem = _address_problem(self.sender, utf8) if self.sender else None
        if sender_problem is not None:
            return self._fail_rest(sender_problem)
        if len(self.decided) == len(self.recipients):
            return self._ordered()

        options: list[str] = []
        if "size" in extensions:
            limit = extensions["size"].strip()
            if limit.isdigit() and int(limit) > 0 and len(self.message) > int(limit):
                return self._fail_rest(PermanentFailure(
                    f"The message ({len(self.message)} bytes) is larger than the next hop "
                    f"{self.where} accepts ({limit} bytes); send a smaller message.",
                    smtp_code=552, enhanced="5.3.4", reason=Reason.TOO_LARGE,
                ))
            options.append(f"SIZE={len(self.message)}")
        if "8bitmime" in extensions and not self.message.isascii():
            options.append("BODY=8BITMIME")
        if utf8 and not all(
            a.isascii() for a in [self.sender, *(r.address for r in self.recipients)]
        ):
            options.append("SMTPUTF8")
        dsn = "dsn" in extensions
        if dsn and self.ret:
            options.append(f"RET={self.ret}")
        if dsn and self.envid:
            options.append(f"ENVID={self.envid}")

        step = "MAIL FROM"
        try:
            reply = await self.smtp.execute_command(
                b"MAIL", b"FROM:<" + self.sender.encode(encoding) + b">",
                *(o.encode("ascii") for o in options),
            )
            if reply.code != 250:
                for recipient in self.recipients:
                    if recipient.address not in self.decided:
                        self._refused(recipient.address, step, reply.code, reply.message)
                return self._outcomes()

            step = "RCPT TO"
            accepted: list[str] = []
            for recipient in self.recipients:
                if recipient.address in self.decided:
                    continue
                rcpt_options: list[str] = []
                if dsn and recipient.notify:
                    rcpt_options.append("NOTIFY=" + ",".join(recipient.notify))
                if dsn and recipient.orcpt:
                    rcpt_options.append(f"ORCPT={recipient.orcpt}")
                reply = await self.smtp.execute_command(
                    b"RCPT", b"TO:<" + recipient.address.encode(encoding) + b">",
                    *(o.encode("ascii") for o in rcpt_options),
                )
                if reply.code in (250, 251):  # RFC 5321 §4.3.2: RCPT's only successes
                    accepted.append(recipient.address)
                else:
                    self._refused(recipient.address, step, reply.code, reply.message, "1.0")
                    if not self.smtp.is_connected:  # 421: the server is closing
                        return self._fail_rest(_lost(self.where, step, _Closed()))
            if not accepted:
                return self._outcomes()

            step = "DATA"
            try:
                # Returns only for a 250 after the final dot.
                reply = await self.smtp.data(self.message, timeout=self.transport.data_timeout)
            except aiosmtplib.SMTPDataError as refused:
                # The reply to DATA itself when it was not 354 (then the message was not sent,
                # even if that reply was a 250), or the reply after the final dot when it was
                # not 250: the library does not say which, and neither is a delivery.
                for address in accepted:
                    self._refused(address, step, refused.code, refused.message)
                return self._outcomes()
            for address in accepted:
                self._delivered(address, reply.code, reply.message)
            return self._outcomes()
        except (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPTimeoutError, OSError) as error:
            self.smtp.close()
            if step == "DATA":
                log.warning("%s: connection lost during DATA; the message may arrive twice if "
                            "the next hop had accepted it", self.where)
            return self._fail_rest(_lost(self.where, step, error))
        except aiosmtplib.SMTPResponseException as error:
            # A reply the library could not read (too long, malformed): the protocol is out of
            # step, so the connection cannot be trusted for anything more.
            self.smtp.close()
            return self._fail_rest(TemporaryFailure(
                f"The next hop {self.where} sent an unreadable reply during {step}.",
                detail=f"{error.code} {error.message}",
                enhanced="4.5.0", reason=Reason.NEXT_HOP_UNAVAILABLE,
            ))


class _Closed(Exception):
    """Stands for a connection the server closed after a 421 reply."""


def _address_problem(address: str, utf8: bool) -> GatewayError | None:
    if _UNSAFE_ADDRESS.search(address):
        # The accept stage never lets such an address in; refuse rather than let it reach a
        # command line where it could carry extra parameters.
        return PermanentFailure(
            f"The address {address!r} cannot be written in an SMTP command.",
            smtp_code=553, enhanced="5.1.3", reason=Reason.MALFORMED,
        )
    if not address.isascii() and not utf8:
        return PermanentFailure(
            f"The next hop does not accept internationalised addresses (SMTPUTF8), so "
            f"{address} cannot be reached through it; use an ASCII address.",
            smtp_code=553, enhanced="5.6.7", reason=Reason.DESTINATION_REFUSED,
        )
    return None
