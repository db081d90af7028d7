"""Opening a connection to a network's relay: TCP, greeting, EHLO (RFC 5321 §4.1.1.1, HELO
for an RFC 821 server), and STARTTLS (RFC 3207) as `relay.tls` says, then EHLO again.

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

aiosmtplib sets the connection up; the transactions then run on a `Wire` that takes the
socket over (aiosmtplib reads one reply per command, which rules out pipelining). Every failure
to set a connection up is a `TemporaryFailure`: even a 5xx greeting says something about the
relay, not about the recipients.

Untrusted input: the next hop's greeting, its EHLO keywords, its reply to STARTTLS and its
certificate, all read by aiosmtplib and the ssl module; reply text reaches a failure's sentence
only as one printable line (`reply_text`).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from dataclasses import dataclass, field

import aiosmtplib
from cryptography import x509

from gateway.client_tls import unverified_context
from gateway.config import RelaySettings
from gateway.errors import Reason, TemporaryFailure
from gateway.smtp_wire import (
    Disconnected,
    TransportStats,
    Wire,
    broken_connection,
    enhanced_code,
    reply_text,
)

__all__ = ["Connection", "Connector"]

# The whole deliver stage logs under one name, which operators filter on.
log = logging.getLogger("gateway.delivery")


@dataclass(eq=False)
class Connection:
    """An open connection to a relay, set up and ready for a transaction, with what the
    connection cache and the transactions keep track of on it."""

    wire: Wire
    relay: RelaySettings
    encrypted: bool
    verified: bool
    certificate: x509.Certificate | None
    extensions: dict[str, str]  # EHLO keywords (lower case) and their parameters
    messages: int = 0
    # No transaction open at the next hop: the next MAIL needs no RSET before it. False from
    # MAIL until the reply after the final dot (a refused MAIL, RCPT or DATA leaves it False).
    clean: bool = True
    reused: bool = False  # taken from the cache for this send
    expiry: asyncio.TimerHandle | None = field(default=None, repr=False)

    @property
    def usable(self) -> bool:
        return self.wire.is_open


@dataclass(frozen=True)
class Connector:
    """Opens connections to relays with the transport's settings: the gateway's host name for
    EHLO, its TLS client context (None: none configured) and the timeouts."""

    hostname: str
    context: ssl.SSLContext | None
    connect_timeout: float
    command_timeout: float
    stats: TransportStats

    async def connect(self, relay: RelaySettings) -> Connection:
        """A connection to `relay`, encrypted and verified as `relay.tls` requires; every
        failure is a TemporaryFailure saying why."""
        where = f"{relay.host}:{relay.port}"
        smtp = await self._open(relay, where)
        try:
            if relay.tls == "none":
                return self._in_clear(smtp, relay)
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
                return self._in_clear(smtp, relay)
            context = self.context
            if context is None:
                # No TLS client configuration at all: encryption without authentication is
                # still what opportunistic promises.
                return await self._starttls(smtp, relay, unverified_context(), verified=False)
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
        except Disconnected as error:
            smtp.close()
            raise broken_connection(where, "the connection set-up", error) from error
        except BaseException:
            smtp.close()
            raise

    def _in_clear(self, smtp: aiosmtplib.SMTP, relay: RelaySettings) -> Connection:
        return _take_over(smtp, relay, self.stats, encrypted=False, verified=False,
                          certificate=None)

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
            text = reply_text(error.message)
            raise TemporaryFailure(
                f"The next hop {where} refused the session: {error.code} {text}",
                enhanced="4.4.1" if error.code >= 500 else enhanced_code(error.code, error.message),
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
            raise broken_connection(where, "the greeting", error) from error
        try:
            await self._hello(smtp)
        except (aiosmtplib.SMTPException, OSError) as error:
            smtp.close()
            raise broken_connection(where, "EHLO", error) from error
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
    ) -> Connection:
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
                f"refused STARTTLS: {error.code} {reply_text(error.message)}"
                if 400 <= error.code < 600
                else "answered STARTTLS with a reply that does not start TLS "
                f"({error.code} {reply_text(error.message)})"
            )
            raise TemporaryFailure(
                f"The next hop {where} offered STARTTLS but {answer}; nothing was sent.",
                detail=f"{where} STARTTLS: {error.code} {error.message}",
                enhanced="4.7.4", reason=Reason.NEXT_HOP_UNAVAILABLE,
            ) from error
        except (aiosmtplib.SMTPException, OSError) as error:
            raise broken_connection(where, "STARTTLS", error) from error
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
            raise broken_connection(where, "EHLO after STARTTLS", error) from error
        return _take_over(smtp, relay, self.stats, encrypted=True, verified=verified,
                          certificate=certificate)


class _Untrusted(TemporaryFailure):
    """Verification of the next hop's certificate failed (opportunistic may fall back)."""


def _take_over(smtp: aiosmtplib.SMTP, relay: RelaySettings, stats: TransportStats, *,
               encrypted: bool, verified: bool,
               certificate: x509.Certificate | None) -> Connection:
    """The connection aiosmtplib set up (greeting, EHLO, STARTTLS), carried on by `Wire`
    (aiosmtplib reads one reply per command, which rules out pipelining)."""
    transport = smtp.transport
    if not isinstance(transport, asyncio.Transport) or transport.is_closing():
        raise Disconnected("the connection closed during its set-up")
    wire = Wire(transport, stats)
    transport.set_protocol(wire)
    stats.connections += 1
    return Connection(wire, relay, encrypted, verified, certificate,
                      dict(smtp.esmtp_extensions))


def _peer_certificate(smtp: aiosmtplib.SMTP) -> x509.Certificate | None:
    ssl_object = smtp.get_transport_info("ssl_object")
    if ssl_object is None:
        return None
    der = ssl_object.getpeercert(binary_form=True)
    return x509.load_der_x509_certificate(der) if der else None
