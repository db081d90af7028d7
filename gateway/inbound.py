"""The accept stage: SMTP in (RFC 5321, 3207 STARTTLS, 3461 DSN, 1870 SIZE, 2034 codes).

Untrusted input: everything a peer sends on the connection.

A thin shim over aiosmtpd, as Postfix's smtpd is a thin front of the queue: it authenticates the
peer, routes each RCPT at RCPT time (so the gateway is never an open relay), refuses smuggling
attempts, and says 250 only once `spool.enqueue` has made the message durable.

- MAIL FROM: the peer must be authenticated for a network (`peers.resolve_source`) and the sender
  must belong to that network (or be the null sender).
- RCPT TO: the domain must belong to a network (else 550 5.1.2) and `routes:` must allow
  source → destination (else 550 5.7.1).
- DATA: only <CRLF>.<CRLF> ends it (aiosmtpd reads CRLF-terminated lines). A bare CR or LF
  anywhere is refused with 550 5.6.0 rather than normalised: a smuggled `\\n.\\n` then never
  becomes a second message here nor at a next hop that reads line ends differently. Lines
  longer than 998 octets are refused (RFC 5321 §4.5.3.1.6).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, AnyStr

from aiosmtpd.smtp import SMTP, Session
from aiosmtpd.smtp import Envelope as SmtpEnvelope
from cryptography import x509

from gateway.addresses import Path, parse_mail_params, parse_path, parse_rcpt_params
from gateway.config import Listener
from gateway.envelope import Envelope, Peer, Recipient
from gateway.errors import GatewayError, PermanentFailure, Reason
from gateway.peers import PeerIdentity, PeerTrust, resolve_source
from gateway.runtime import Runtime
from gateway.spool import Spool

__all__ = ["Inbound"]

log = logging.getLogger("gateway.inbound")

_BARE_LINE_END = re.compile(rb"\r(?!\n)|(?<!\r)\n")
_MESSAGE_ID = re.compile(rb"^message-id:[ \t]*(.*(?:\r\n[ \t].*)*)", re.IGNORECASE | re.MULTILINE)

# aiosmtpd's own replies, given the enhanced status codes of RFC 3463 that the rest carry.
_ENHANCED = {
    "552 Error: Too much mail data": "552 5.3.4 Message exceeds the maximum size accepted here",
    "500 Line too long (see RFC5321 4.5.3.1.6)":
        "500 5.5.2 Line longer than 998 octets (RFC 5321 §4.5.3.1.6); fix the sending software",
    "530 Must issue a STARTTLS command first": "530 5.7.0 Must issue a STARTTLS command first",
    "503 Error: need RCPT command": "503 5.5.1 Need RCPT command",
    "503 Error: need MAIL command": "503 5.5.1 Need MAIL command",
    "221 Bye": "221 2.0.0 Bye",
    "250 OK": "250 2.0.0 OK",
}

Accepted = Callable[[Envelope], None]


@dataclass
class Transaction:
    """What this gateway learnt during one MAIL transaction."""

    sender: Path
    source: str
    size: int | None
    ret: str | None
    envid: str | None
    recipients: list[Recipient] = field(default_factory=list)


def message_id(data: bytes) -> str | None:
    """The Message-ID header of a message, for the audit trail (only the header block is read)."""
    end = data.find(b"\r\n\r\n")
    match = _MESSAGE_ID.search(data[: end if end >= 0 else len(data)])
    if not match:
        return None
    return match.group(1).replace(b"\r\n", b"").strip().decode("ascii", "replace")[:250]


class GatewaySMTP(SMTP):
    """aiosmtpd's protocol with our MAIL/RCPT handling (DSN parameters, routing at RCPT time)."""

    line_length_limit = 1000  # 998 octets + CRLF

    def __init__(self, inbound: Inbound, listener: Listener, **kwargs: Any) -> None:
        super().__init__(inbound, **kwargs)
        self.inbound = inbound
        self.listener = listener
        self.transaction: Transaction | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        fresh = self not in self.inbound.sessions  # aiosmtpd calls this again after STARTTLS
        super().connection_made(transport)
        self.inbound.sessions.add(self)
        if fresh and self.inbound.too_many(self):
            # Before the greeting's reply is read: a flood from one peer cannot starve the rest.
            if isinstance(transport, asyncio.WriteTransport):
                transport.write(b"421 4.7.0 Too many connections from your address, "
                                b"try again later\r\n")
            transport.close()

    def connection_lost(self, error: Exception | None) -> None:
        super().connection_lost(error)
        self.inbound.sessions.discard(self)

    def in_transaction(self) -> bool:
        return self.transaction is not None

    async def push(self, status: AnyStr) -> None:
        if isinstance(status, str):
            await super().push(_ENHANCED.get(status, status))
        else:
            await super().push(status)

    def _set_rset_state(self) -> None:
        super()._set_rset_state()  # type: ignore[no-untyped-call]
        self.transaction = None

    # Methods, not properties: aiosmtpd's constructor inspects every attribute of the protocol.
    def smtp_envelope(self) -> SmtpEnvelope:
        assert self.envelope is not None  # aiosmtpd creates it with the session
        return self.envelope

    def tls_active(self) -> bool:
        return self.ssl_object() is not None

    def ssl_object(self) -> ssl.SSLObject | None:
        transport = self.transport
        if transport is None:
            return None
        found = transport.get_extra_info("ssl_object")
        return found if isinstance(found, ssl.SSLObject | ssl.SSLSocket) else None  # type: ignore[return-value]

    def peer_identity(self) -> PeerIdentity:
        peer = self.session.peer if self.session is not None else None
        host = peer[0] if peer else "0.0.0.0"
        certificate = None
        ssl_object = self.ssl_object()
        if ssl_object is not None:
            der = ssl_object.getpeercert(binary_form=True)
            if der:
                certificate = x509.load_der_x509_certificate(der)
        return PeerIdentity(ipaddress.ip_address(host), certificate)

    async def smtp_MAIL(self, arg: str | None) -> None:
        if await self.check_helo_needed():
            return
        if self.smtp_envelope().mail_from:
            await self.push("503 5.5.1 Nested MAIL command")
            return
        argument = self._strip_command_keyword("FROM:", arg or "")
        if argument is None:
            await self.push("501 5.5.4 Syntax: MAIL FROM:<address> [parameters]")
            return
        try:
            path, rest = parse_path(argument, allow_null=True)
            params = parse_mail_params(rest)
            limit = self.data_size_limit
            if params.size is not None and limit and params.size > limit:
                raise PermanentFailure(
                    f"Message size {params.size} exceeds the maximum of {limit} octets",
                    smtp_code=552, enhanced="5.3.4", reason=Reason.TOO_LARGE,
                )
            runtime = self.inbound.runtime()
            # The handshake checked the chain but not the CRLs: the certificate is checked
            # again, now, under the running configuration's anchors and CRLs.
            trust = PeerTrust(runtime.trust.anchors, runtime.trust.crls)
            source = resolve_source(
                runtime.config, self.peer_identity(), None if path.null else path.domain,
                runtime.whitelist, trust=trust,
            )
        except GatewayError as error:
            self.inbound.rejected(self, "MAIL", argument, error)
            await self.push(error.smtp_reply)
            return
        self.transaction = Transaction(path, source.name, params.size, params.ret, params.envid)
        self.smtp_envelope().mail_from = path.address or "<>"
        await self.push("250 2.1.0 Sender OK")

    async def smtp_RCPT(self, arg: str | None) -> None:
        if await self.check_helo_needed():
            return
        transaction = self.transaction
        if transaction is None:
            await self.push("503 5.5.1 Need MAIL command")
            return
        argument = self._strip_command_keyword("TO:", arg or "")
        if argument is None:
            await self.push("501 5.5.4 Syntax: RCPT TO:<address> [parameters]")
            return
        try:
            path, rest = parse_path(argument, allow_null=False)
            params = parse_rcpt_params(rest)
            destination = self.inbound.route(transaction.source, path)
            if len(transaction.recipients) >= 1000:
                raise PermanentFailure(
                    "Too many recipients in one message", smtp_code=452, enhanced="4.5.3",
                    reason=Reason.MALFORMED,
                )
        except GatewayError as error:
            self.inbound.rejected(self, "RCPT", argument, error)
            await self.push(error.smtp_reply)
            return
        if any(r.address == path.address for r in transaction.recipients):
            await self.push("250 2.1.5 Recipient OK (duplicate ignored)")
            return
        transaction.recipients.append(
            Recipient(path.address, destination, orcpt=params.orcpt, notify=params.notify)
        )
        self.smtp_envelope().rcpt_tos.append(path.address)
        await self.push("250 2.1.5 Recipient OK")


class Inbound:
    """The aiosmtpd handler: per-connection policy and the hand-off to the spool."""

    def __init__(
        self,
        runtime: Callable[[], Runtime],
        spool: Spool,
        accepted: Accepted,
        events: Any = None,
    ) -> None:
        self.runtime = runtime
        self.spool = spool
        self.accepted = accepted
        self.events = events
        self.servers: list[asyncio.Server] = []
        self.sessions: set[GatewaySMTP] = set()

    # -- policy --------------------------------------------------------------------------------

    def too_many(self, session: GatewaySMTP) -> bool:
        """Whether the peer of `session` exceeds `limits.connections_per_peer`.

        The network is not known before MAIL FROM, so the most generous limit of all networks
        applies per peer address.
        """
        networks = self.runtime().config.networks.values()
        limit = max((n.limits.connections_per_peer for n in networks), default=20)
        host = session.session.peer[0] if session.session and session.session.peer else None
        same = sum(
            1 for other in self.sessions
            if other.session is not None and other.session.peer
            and other.session.peer[0] == host
        )
        return same > limit

    def route(self, source: str, path: Path) -> str:
        """The destination network of a recipient, or the 5xx that refuses it."""
        config = self.runtime().config
        network = None if path.literal else config.network_for_domain(path.domain)
        if network is None:
            raise PermanentFailure(
                f"Recipient domain {path.domain} is not served by this gateway",
                smtp_code=550, enhanced="5.1.2", reason=Reason.UNKNOWN_DOMAIN,
            )
        if not config.route_allowed(source, network.name):
            raise PermanentFailure(
                f"Relaying from this network to {path.domain} is not allowed",
                smtp_code=550, enhanced="5.7.1", reason=Reason.ROUTE_DENIED,
                detail=f"no route {source} -> {network.name} in routes:",
            )
        return network.name

    def rejected(self, server: GatewaySMTP, command: str, argument: str,
                 error: GatewayError) -> None:
        peer = server.session.peer if server.session is not None else None
        log.info("reject %s %s from %s: %s (%s)", command, argument, peer,
                 error.smtp_reply, error.detail)
        if self.events is not None:
            self.events.rejected(server, command, argument, error)

    # -- aiosmtpd hooks ------------------------------------------------------------------------

    async def handle_EHLO(
        self, server: GatewaySMTP, session: Session, envelope: SmtpEnvelope, hostname: str,
        responses: list[str],
    ) -> list[str]:
        session.host_name = hostname
        last = responses.pop()  # "250 HELP"
        responses.extend(["250-PIPELINING", "250-ENHANCEDSTATUSCODES", "250-DSN"])
        responses.append(last)
        return responses

    async def handle_DATA(
        self, server: GatewaySMTP, session: Session, smtp_envelope: SmtpEnvelope
    ) -> str:
        transaction = server.transaction
        if transaction is None or not transaction.recipients:
            return "503 5.5.1 Need RCPT command"
        data = smtp_envelope.original_content or b""
        try:
            if _BARE_LINE_END.search(data):
                raise PermanentFailure(
                    "Message refused: a bare CR or LF was found; only CRLF may end a line "
                    "(RFC 5321 §2.3.8), fix the sending software",
                    smtp_code=550, enhanced="5.6.0", reason=Reason.SMUGGLING,
                )
            peer = server.peer_identity()
            envelope = Envelope(
                queue_id=self.spool.new_queue_id(),
                sender=transaction.sender.address,
                recipients=tuple(transaction.recipients),
                source_network=transaction.source,
                peer=Peer(
                    address=str(peer.address),
                    port=int(session.peer[1]) if session is not None and session.peer else 0,
                    helo=session.host_name or "",
                    tls=server.tls_active(),
                    certificate_subject=peer.subject_text,
                ),
                received_at=time.time(),
                size=len(data),
                message_id=message_id(data),
                ret=transaction.ret,
                envid=transaction.envid,
            )
            await self.spool.enqueue(envelope, data)
        except GatewayError as error:
            self.rejected(server, "DATA", f"{len(data)} octets", error)
            return error.smtp_reply
        self.accepted(envelope)
        if self.events is not None:
            # The `received` audit record of a message that gets a 250 must survive a crash.
            await self.events.durable()
        return f"250 2.0.0 Ok: queued as {envelope.queue_id}"

    # -- serving -------------------------------------------------------------------------------

    def protocol(self, listener: Listener, tls: ssl.SSLContext | None,
                 max_size: int, hostname: str) -> GatewaySMTP:
        starttls = listener.tls == "starttls"
        server = GatewaySMTP(
            self,
            listener,
            hostname=hostname,
            ident="Passerelle ESMTP",
            data_size_limit=max_size,
            decode_data=False,
            tls_context=tls if starttls else None,
            require_starttls=starttls,
            enable_SMTPUTF8=True,
            timeout=300,
        )
        return server

    async def start(
        self,
        listeners: tuple[Listener, ...],
        tls: Callable[[Listener], ssl.SSLContext | None],
        max_size: int,
        hostname: str,
    ) -> None:
        loop = asyncio.get_running_loop()
        for listener in listeners:
            context = tls(listener)
            implicit = context if listener.tls == "implicit" else None
            server = await loop.create_server(
                lambda listener=listener, context=context: self.protocol(
                    listener, context, max_size, hostname
                ),
                host=listener.address,
                port=listener.port,
                ssl=implicit,
                reuse_address=True,
            )
            self.servers.append(server)

    def ports(self) -> list[int]:
        return [s.sockets[0].getsockname()[1] for s in self.servers if s.sockets]

    async def stop(self, grace: float = 30.0) -> None:
        """Stop accepting; let transactions in progress finish, up to `grace` seconds.

        Idle sessions are closed at once (the peer retries elsewhere or later); a session in a
        transaction gets the grace period to reach its 250, after which it is cut: a message
        that had no 250 is the client's to retry, so nothing accepted is lost either way.
        """
        for server in self.servers:
            server.close()
        deadline = asyncio.get_running_loop().time() + grace
        while self.sessions:
            for session in list(self.sessions):
                if not session.in_transaction() and session.transport is not None:
                    session.transport.close()
                    self.sessions.discard(session)
            if not self.sessions or asyncio.get_running_loop().time() > deadline:
                break
            await asyncio.sleep(0.05)
        for session in list(self.sessions):
            if session.transport is not None:
                log.warning("closing a session still in a transaction after %.0fs", grace)
                session.transport.close()
        self.sessions.clear()
        self.servers.clear()
