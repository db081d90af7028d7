"""The accept stage: SMTP in (RFC 5321, 3207 STARTTLS, 3461 DSN, 1870 SIZE, 2034 codes).

Untrusted input: everything a peer sends on the connection.

A thin shim over aiosmtpd, as Postfix's smtpd is a thin front of the queue: it authenticates the
peer, routes each RCPT at RCPT time (so the gateway is never an open relay), refuses smuggling
attempts, and says 250 only once the spool has made the message durable.

- MAIL FROM: the peer must be authenticated for a network (`peers.resolve_source`) and the sender
  must belong to that network (or be the null sender).
- RCPT TO: the domain must belong to a network (else 550 5.1.2) and `routes:` must allow
  source → destination (else 550 5.7.1).
- DATA: read here, not by aiosmtpd (`gateway.smtp_data.DataReader`), in large chunks and in
  memory bounded by the size limit plus one line, whatever the peer sends. Only <CRLF>.<CRLF>
  ends it. A bare CR or LF anywhere is refused with 550 5.6.0 rather than normalised, and so
  is a NUL (RFC 2045 §2.8): a smuggled `\\n.\\n` or `\\r\\n\\0.\\r\\n` then never becomes a
  second message here nor at a next hop that reads line ends differently or drops NULs. Lines
  longer than 998 octets are refused (RFC 5321 §4.5.3.1.6); dot-stuffing is undone (§4.5.2).
  Past the size limit the rest is discarded as it arrives and the peer gets 552 5.3.4 after
  the terminator (RFC 1870 §6); a peer that never sends it is cut off after a bounded amount.
- The transaction ends with DATA (accepted or not), RSET, HELO/EHLO and STARTTLS (RFC 5321
  §4.1.4, RFC 3207 §4.2): a RCPT after it needs a new MAIL FROM.
- 250 only once the message is spooled and its `received` audit record is durable, one hop
  off the event loop per message: while a spool worker thread writes, fsyncs and renames the
  queue file into active/ and fsyncs active/, the event loop writes the record; the same
  thread then fsyncs the audit trail (`_Received`), which is cheap by then, since the spool's
  journal commits already carried most of it. Each fsync is shared by the sessions that reach
  it at the same moment. A failure on the way (spool, audit, a defect) is a 451 4.3.0 and the
  spooled copy is withdrawn, as it is when the peer leaves before the reply: the peer sends
  again, and delivering this copy as well would deliver the message twice. A `received` record
  may thus be followed by a `rejected` one with the same queue id. No exception reaches the
  peer as aiosmtpd's generic 500; internal details only reach the log and the audit trail.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, AnyStr

from aiosmtpd.smtp import DATA_SIZE_DEFAULT, MISSING, SMTP, Session, TLSSetupException, syntax
from aiosmtpd.smtp import Envelope as SmtpEnvelope
from cryptography import x509

from gateway.addresses import Path, parse_mail_params, parse_path, parse_rcpt_params
from gateway.config import Listener
from gateway.envelope import Envelope, Peer, Recipient
from gateway.errors import GatewayError, PermanentFailure, Reason, TemporaryFailure
from gateway.peers import PeerIdentity, PeerTrust, resolve_source
from gateway.runtime import Runtime
from gateway.smtp_data import DataReader
from gateway.spool import Spool

__all__ = ["DataReader", "Inbound"]

log = logging.getLogger("gateway.inbound")

_MESSAGE_ID = re.compile(rb"^message-id:[ \t]*(.*(?:\r\n[ \t].*)*)", re.IGNORECASE | re.MULTILINE)

_CHUNK = 64 * 1024
# A peer still sending this many times the size limit after crossing it is not going to end
# DATA: it is cut off rather than read until the session timeout.
_DISCARD_FACTOR = 4
# Seconds a spool worker waits for the event loop to write a `received` record (`_Received`).
_WRITE_BOUND = 60.0
# Seconds of silence after which a session is closed: between commands, and between the chunks
# of DATA (RFC 5321 §4.5.3.2 asks for at least 5 minutes and 3 minutes).
SESSION_TIMEOUT = 300.0
# Seconds DATA may take in all, however steadily it arrives: a peer trickling a few octets every
# few minutes would otherwise hold a connection for days. An hour lets a 25 MiB message through
# at 8 KB/s.
DATA_DEADLINE = 3600.0

_LOCAL_ERROR = "Requested action aborted: local error in processing, try again later"
_UNRECORDED = "Requested action aborted: the message could not be recorded here, try again later"

# aiosmtpd's own replies, given the enhanced status codes of RFC 3463 that the rest carry.
_ENHANCED = {
    "530 Must issue a STARTTLS command first": "530 5.7.0 Must issue a STARTTLS command first",
    "503 Error: need RCPT command": "503 5.5.1 Need RCPT command",
    "503 Error: need MAIL command": "503 5.5.1 Need MAIL command",
    "500 Error: bad syntax": "500 5.5.2 Syntax error",
    "500 Command line too long": "500 5.5.2 Command line too long",
    "554 Command refused due to lack of security":
        "554 5.7.0 Command refused: the TLS handshake did not succeed",
    "454 TLS not available": "454 4.7.0 TLS not available",
    "221 Bye": "221 2.0.0 Bye",
    "250 OK": "250 2.0.0 OK",
}
_UNKNOWN_COMMAND = '500 Error: command "'

# Called with the envelope and the message bytes just spooled, so the first delivery attempt
# need not read back what is still in memory.
Accepted = Callable[[Envelope, bytes], None]


class _Received:
    """The `received` audit record of one message, made durable with it
    (`gateway.spool.Alongside`): written on the event loop while the spool's worker thread
    writes the queue file, fsync'ed by that thread once the message is durable, so that the
    commit before the 250 is one hop off the event loop. Each fsync is shared by the sessions
    that reach it at the same moment.

    Never raises: the failure is kept in `error` for the session, which withdraws the
    message."""

    def __init__(self, events: Any, envelope: Envelope) -> None:
        self.events = events
        self.envelope = envelope
        self.error: Exception | None = None
        # Held until `write` has run (a bare lock: cheaper to make than an Event).
        self._unwritten = threading.Lock()
        self._unwritten.acquire()

    def write(self) -> None:
        try:
            self.events.received(self.envelope)
        except Exception as error:
            self.error = error
        finally:
            self._unwritten.release()

    def sync(self) -> None:
        # `write` runs just after the hand-off to the worker thread, well before the spool's
        # fsyncs return: this wait is a formality, bounded in case the event loop is stuck.
        if not self._unwritten.acquire(timeout=_WRITE_BOUND):
            self.error = TimeoutError("the received record was not written in time")
            return
        if self.error is not None:
            return
        try:
            audit = self.events.audit
            if audit is not None:
                audit.sync()  # looked up now: tests replace it to simulate a failing disk
        except Exception as error:
            self.error = error


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
    """aiosmtpd's protocol with our MAIL/RCPT handling (DSN parameters, routing at RCPT time)
    and our DATA reader."""

    # aiosmtpd sizes its StreamReader with this: the buffer for command lines and DATA chunks
    # (reading pauses past twice this much). It is not the DATA line limit, which is
    # `MAX_LINE` in `gateway.smtp_data`; command lines are held to `command_size_limit`.
    line_length_limit = 64 * 1024

    def __init__(self, inbound: Inbound, listener: Listener, **kwargs: Any) -> None:
        super().__init__(inbound, **{**kwargs, "decode_data": False})
        self.inbound = inbound
        self.listener = listener
        self.transaction: Transaction | None = None
        self._identity: tuple[tuple[str, bytes | None], PeerIdentity] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        fresh = self not in self.inbound.sessions  # aiosmtpd calls this again after STARTTLS
        super().connection_made(transport)
        self.inbound.sessions.add(self)
        if fresh and self.inbound.too_many(self):
            # Before the greeting's reply is read: a flood from one peer cannot starve the rest.
            if self._handler_coroutine is not None:
                self._handler_coroutine.cancel()  # no 220 after the 421
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
            if status.startswith(_UNKNOWN_COMMAND):
                status = "500 5.5.1 Command not recognized"
            await super().push(_ENHANCED.get(status, status))
        else:
            await super().push(status)

    def _set_post_data_state(self) -> None:
        # aiosmtpd calls this after DATA, whatever its outcome, and from _set_rset_state (RSET,
        # HELO, EHLO, and the new session after STARTTLS): our transaction ends with its own.
        super()._set_post_data_state()  # type: ignore[no-untyped-call]
        self.transaction = None

    async def handle_exception(self, error: Exception) -> str:
        peer = self.session.peer if self.session is not None else None
        if isinstance(error, TLSSetupException):
            log.info("TLS handshake with %s failed: %s", peer, error.__cause__)
        else:
            log.error("unexpected error in the session with %s", peer, exc_info=error)
        return f"451 4.3.0 {_LOCAL_ERROR}"

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
        der: bytes | None = None
        ssl_object = self.ssl_object()
        if ssl_object is not None:
            der = ssl_object.getpeercert(binary_form=True) or None
        # Asked at every MAIL and every DATA: parsed once per address and certificate (the
        # same bytes, compared whole, so a renegotiated certificate is parsed anew).
        if self._identity is not None and self._identity[0] == (host, der):
            return self._identity[1]
        certificate = x509.load_der_x509_certificate(der) if der else None
        identity = PeerIdentity(ipaddress.ip_address(host), certificate)
        self._identity = ((host, der), identity)
        return identity

    @syntax("STARTTLS", when="tls_context")
    async def smtp_STARTTLS(self, arg: str) -> None:
        if self._tls_protocol is not None or self.tls_active():
            # RFC 3207 §4.2: no second handshake inside the first (aiosmtpd would start one).
            await self.push("503 5.5.1 TLS is already active")
            return
        await super().smtp_STARTTLS(arg)

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

    @syntax("DATA")
    async def smtp_DATA(self, arg: str | None) -> None:
        if await self.check_helo_needed():
            return
        if await self.check_auth_needed("DATA"):
            return
        if not self.smtp_envelope().rcpt_tos:
            await self.push("503 5.5.1 Need RCPT command")
            return
        if arg:
            await self.push("501 5.5.4 Syntax: DATA")
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        try:
            status = await self._receive()
        finally:
            self._set_post_data_state()
        if status is not None:
            await self.push(status)

    def _end_session(self) -> None:
        # As QUIT does: close, and stop the command loop, so that nothing still buffered is
        # read as commands.
        if self.transport is not None:
            self.transport.close()
        if self._handler_coroutine is not None:
            self._handler_coroutine.cancel()

    async def _hang_up(self, reader: DataReader, failure: GatewayError) -> None:
        """Refuse the DATA in progress with `failure` (a 421) and end the session."""
        self.inbound.rejected(self, "DATA", f"{reader.received} octets", failure)
        await self.push(failure.smtp_reply)
        self._end_session()

    async def _receive(self) -> str | None:
        """Read DATA and hand the message over; the reply, or None when the session is over."""
        # Without a configured limit, memory is still bounded, at aiosmtpd's default.
        limit = self.data_size_limit or DATA_SIZE_DEFAULT
        reader = DataReader(limit)
        deadline = self.loop.time() + DATA_DEADLINE
        while True:
            chunk = await self._reader.read(_CHUNK)
            if not chunk:  # the peer left
                self._end_session()
                return None
            if self.loop.time() > deadline:
                await self._hang_up(reader, TemporaryFailure(
                    "DATA took too long; closing the connection, send the message again",
                    smtp_code=421, enhanced="4.4.2", reason=Reason.PEER_TOO_SLOW,
                    detail=f"{reader.received} octets in {DATA_DEADLINE:g}s",
                ))
                return None
            # aiosmtpd's idle timer only restarts at each command: a large message on a slow
            # link would otherwise be cut off in the middle of its DATA.
            self._reset_timeout()
            end = reader.feed(chunk)
            if end is not None:
                if end < len(chunk):
                    # Pipelined commands after the terminator: back to aiosmtpd's command loop,
                    # which reads the same buffer (StreamReader has no public unread).
                    self._reader._buffer[:0] = chunk[end:]  # type: ignore[attr-defined]
                break
            if reader.received > limit * (1 + _DISCARD_FACTOR):
                await self._hang_up(reader, TemporaryFailure(
                    "Message far exceeds the maximum size accepted here; closing the connection",
                    smtp_code=421, enhanced="4.3.4", reason=Reason.TOO_LARGE,
                    detail=f"no end of DATA after {reader.received} octets",
                ))
                return None
        if reader.error is not None:
            self.inbound.rejected(self, "DATA", f"{reader.received} octets", reader.error)
            return reader.error.smtp_reply
        # Octets as received, never decoded: the gateway runs with decode_data=False, which is
        # also what makes aiosmtpd advertise 8BITMIME.
        envelope = self.smtp_envelope()
        envelope.content = envelope.original_content = reader.content()
        try:
            status = await self._call_handler_hook("DATA")
        except Exception as error:  # never aiosmtpd's generic 500
            return await self.handle_exception(error)
        return "250 2.0.0 OK" if status is MISSING else str(status)


class Inbound:
    """The aiosmtpd handler: per-connection policy and the hand-off to the spool.

    `accepted` is called once a message is spooled and its `received` audit record durable,
    just before its 250: it hands the message to the queue manager.
    """

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
        self._withdrawals: set[asyncio.Task[None]] = set()

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
                 error: GatewayError, queue_id: str | None = None) -> None:
        peer = server.session.peer if server.session is not None else None
        log.info("reject %s %s from %s: %s (%s)", command, argument, peer,
                 error.smtp_reply, error.detail)
        if self.events is None:
            return
        try:
            self.events.rejected(server, command, argument, error, queue_id=queue_id)
        except Exception:
            # The refusal stands without its record: refusing is the safe side, and the peer
            # still learns why. The operator learns of the audit trail's failure here.
            log.exception("could not record the refusal of %s from %s in the audit trail",
                          command, peer)

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
        queue_id: str | None = None
        received: _Received | None = None
        try:
            envelope = self._envelope(server, session, transaction, data)
            queue_id = envelope.queue_id
            if self.events is not None:
                received = _Received(self.events, envelope)
            await self.spool.enqueue(envelope, data, alongside=received)
        except asyncio.CancelledError:
            if received is not None:
                # The spool removes its own copy of a cancelled enqueue once its worker is
                # done; withdrawn now as well, in case the worker waits on a disk that does not
                # answer (idempotent: a copy not yet in active/ is the spool's to remove).
                task = asyncio.get_running_loop().create_task(
                    self._withdraw(received.envelope.queue_id))
                self._withdrawals.add(task)
                task.add_done_callback(self._withdrawals.discard)
                self.rejected(server, "DATA", f"{len(data)} octets", TemporaryFailure(
                    "The session ended before the reply", detail="session ended before the 250"),
                    queue_id=queue_id)
            raise
        except GatewayError as error:
            self.rejected(server, "DATA", f"{len(data)} octets", error, queue_id=queue_id)
            return error.smtp_reply
        except Exception as error:  # a defect or an unforeseen condition: a 4xx, not a 500
            log.exception("could not spool a message of %d octets", len(data))
            failure = TemporaryFailure(_LOCAL_ERROR, detail=f"{type(error).__name__}: {error}")
            self.rejected(server, "DATA", f"{len(data)} octets", failure, queue_id=queue_id)
            return failure.smtp_reply
        return await self._commit(server, envelope, received, data)

    def _envelope(self, server: GatewaySMTP, session: Session, transaction: Transaction,
                  data: bytes) -> Envelope:
        peer = server.peer_identity()
        return Envelope(
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

    async def _commit(self, server: GatewaySMTP, envelope: Envelope,
                      received: _Received | None, data: bytes) -> str:
        """The message and its `received` record were to be made durable together: if both
        are, schedule it and give the 250.

        If the record could not be made durable, the spooled copy is withdrawn: the peer gets
        no 250 and will send the message again.
        """
        withdrawn = f"{envelope.size} octets, {envelope.queue_id} withdrawn"
        try:
            if received is not None and self.events is not None:
                # The `received` record of a message that gets a 250 must survive a crash.
                if received.error is not None:
                    raise received.error
                self.events.accepted(envelope)
            self.accepted(envelope, data)
        except Exception as error:
            log.error("%s: could not record the message as received, withdrawing it",
                      envelope.queue_id, exc_info=error)
            await self._withdraw(envelope.queue_id)
            failure = TemporaryFailure(_UNRECORDED, detail=f"{type(error).__name__}: {error}",
                                       reason=Reason.AUDIT_UNAVAILABLE)
            self.rejected(server, "DATA", withdrawn, failure, queue_id=envelope.queue_id)
            return failure.smtp_reply
        return f"250 2.0.0 Ok: queued as {envelope.queue_id}"

    async def _withdraw(self, queue_id: str) -> None:
        try:
            await self.spool.withdraw(queue_id)
        except Exception:
            log.critical("%s: could not withdraw the message from the spool; it may be "
                         "delivered although its sender was told to try again", queue_id,
                         exc_info=True)

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
            timeout=SESSION_TIMEOUT,
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
        handlers = [s._handler_coroutine for s in self.sessions if s._handler_coroutine is not None]
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
        # Let the cut sessions unwind, so that a message spooled without its 250 is withdrawn
        # now rather than found in the spool (and delivered) at the next start.
        if handlers:
            await asyncio.wait(handlers, timeout=5)
        if self._withdrawals:
            await asyncio.gather(*self._withdrawals, return_exceptions=True)
