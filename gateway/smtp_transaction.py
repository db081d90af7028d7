"""One MAIL transaction on an open connection to the next hop: MAIL FROM, every RCPT TO, DATA
and the message (RFC 5321 §3.3), with the parameters of SIZE (RFC 1870), 8BITMIME (RFC 6152),
SMTPUTF8 (RFC 6531) and DSN (RFC 3461) when the next hop offers them, and an outcome with an
RFC 3463 enhanced status code for every recipient.

With PIPELINING (RFC 2920), MAIL, every RCPT and DATA (after RSET when the connection's last
transaction did not end) leave in one write, and the message with its final dot in one more
(in 1 MiB pieces that wait for the socket when it is larger). Without it, one command per
write. The message goes out in the form DATA requires (`wire_form`, RFC 5321 §4.5.2).

Replies (RFC 5321 §4.2, §4.3.2): a recipient counts as delivered only when MAIL FROM got 250,
its RCPT TO got 250 or 251 (251: the next hop will forward it), and the end of DATA got 250.
4xx defers, 5xx bounces. Any other reply where a success is expected (252, which answers VRFY
and EXPN, another 2xx, a 3xx, a code outside 200-599, or a DATA command answered with anything
but 354) is a next hop out of step with the protocol: the recipients are deferred with the
reply quoted in their last reply (451 4.5.0), never counted as delivered, and the connection
is not reused. Pipelined, each reply decides exactly what it decides unpipelined, the reply
to DATA included (RFC 2920 §3.1): a 354 when no recipient was accepted gets no message, and
the connection is closed (not the lone dot RFC 2920 suggests, which some next hop could take
as an empty message). The transport speaks SMTP only, so the end of DATA has one reply for
the whole transaction (no LMTP per-recipient replies, RFC 2033).

On a connection taken from the cache, a close before the first reply (or a first reply of
421, the next hop ending an idle session) is `Stale`: nothing that could be delivered was
sent, and the transport starts the message again on a new connection.

Untrusted input: the next hop's replies, read by `Wire`, and its EHLO keywords (SIZE's limit);
an unreadable reply defers the recipients and drops the connection. The addresses are checked
before they reach a command line, so none can carry extra parameters.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence

from gateway.envelope import Recipient
from gateway.errors import GatewayError, PermanentFailure, Reason, TemporaryFailure
from gateway.outcome import Outcome, outcome_from_error
from gateway.smtp_connection import Connection
from gateway.smtp_wire import (
    Disconnected,
    Reply,
    TransportStats,
    Unreadable,
    broken_connection,
    command,
    enhanced_code,
    refusal,
    reply_text,
)

__all__ = ["Stale", "Transaction"]

# The whole deliver stage logs under one name, which operators filter on.
log = logging.getLogger("gateway.delivery")

_CHUNK = 1024 * 1024  # the message is written in pieces of this size, waiting for the socket
_UNSAFE_ADDRESS = re.compile(r"[\x00-\x20\x7f<>]")


class Stale(Exception):
    """A cached connection turned out to be closed before the transaction got any reply: the
    next hop ended it while it was idle. Nothing was sent that could be delivered."""


class Transaction:
    """MAIL, RCPT..., DATA on one open connection; an outcome for every recipient.

    With PIPELINING (RFC 2920), MAIL, every RCPT and DATA leave in one write (after an RSET
    when the connection's last transaction did not end), and the replies are then read in
    order; each still decides exactly what it decides without pipelining."""

    def __init__(
        self,
        connection: Connection,
        sender: str,
        recipients: Sequence[Recipient],
        message: bytes,
        payload: bytes,
        envid: str | None,
        ret: str | None,
        *,
        stats: TransportStats,
        command_timeout: float,
        data_timeout: float,
    ) -> None:
        self.stats = stats
        self.command_timeout = command_timeout
        self.data_timeout = data_timeout
        self.connection = connection
        self.wire = connection.wire
        self.sender = sender
        self.recipients = recipients
        self.message = message
        self.payload = payload  # `message` as it goes on the wire, dot-stuffed, CRLF
        self.envid = envid
        self.ret = ret
        self.remote = connection.relay.host
        self.where = f"{connection.relay.host}:{connection.relay.port}"
        self.decided: dict[str, Outcome] = {}
        self.out_of_step = False  # a reply no conforming server gives: do not reuse
        self.replies = 0  # replies read in this transaction
        self.step = "MAIL FROM"  # the command whose reply is awaited, for the failure's sentence

    def _ordered(self) -> list[Outcome]:
        return [self.decided[r.address] for r in self.recipients]

    def _delivered(self, address: str, code: int, message: str) -> None:
        self.decided[address] = Outcome(
            address, "delivered", code, enhanced_code(code, message), reply_text(message), None,
            self.remote,
        )

    def _refused(self, address: str, step: str, code: int, message: str,
                 detail: str = "0.0") -> None:
        """`step` did not succeed for `address`: a 4xx defers, a 5xx bounces, and any other
        reply defers as a protocol error (never a delivery)."""
        kind = refusal(code)
        if kind is None:
            self.out_of_step = True
            text = reply_text(message)
            self.decided[address] = outcome_from_error(address, TemporaryFailure(
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
            address, kind, code, enhanced_code(code, message, detail), reply_text(message),
            Reason.DESTINATION_REFUSED, self.remote,
        )

    def _outcomes(self) -> list[Outcome]:
        if self.out_of_step:
            # The next hop said something no conforming server says: whatever state it is in,
            # the next message must not start on this connection.
            self.wire.abort()
        return self._ordered()

    def _fail_rest(self, error: GatewayError) -> list[Outcome]:
        for recipient in self.recipients:
            self.decided.setdefault(recipient.address, outcome_from_error(
                recipient.address, error, self.remote))
        return self._ordered()

    async def _reply(self, step: str, timeout: float | None = None) -> Reply:
        """The next reply, to `step`. On a connection taken from the cache, a close before
        the first reply (or a first reply of 421, the next hop closing an idle session) is
        `Stale`."""
        self.step = step
        stale_if_lost = self.connection.reused and self.replies == 0
        try:
            reply = await self.wire.read(timeout or self.command_timeout)
        except (Disconnected, OSError):
            if stale_if_lost:
                raise Stale from None
            raise
        self.replies += 1
        if stale_if_lost and reply.code == 421:
            raise Stale
        return reply

    async def run(self) -> list[Outcome]:
        extensions = self.connection.extensions
        utf8 = "smtputf8" in extensions
        encoding = "utf-8" if utf8 else "ascii"

        for recipient in self.recipients:
            problem = _address_problem(recipient.address, utf8)
            if problem is not None:
                self.decided[recipient.address] = outcome_from_error(
                    recipient.address, problem, None)
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

        mail = command(b"MAIL", b"FROM:<" + self.sender.encode(encoding) + b">",
                        *(o.encode("ascii") for o in options))
        rcpts: list[tuple[str, bytes]] = []
        for recipient in self.recipients:
            if recipient.address in self.decided:
                continue
            rcpt_options: list[str] = []
            if dsn and recipient.notify:
                rcpt_options.append("NOTIFY=" + ",".join(recipient.notify))
            if dsn and recipient.orcpt:
                rcpt_options.append(f"ORCPT={recipient.orcpt}")
            rcpts.append((recipient.address, command(
                b"RCPT", b"TO:<" + recipient.address.encode(encoding) + b">",
                *(o.encode("ascii") for o in rcpt_options),
            )))

        reset = not self.connection.clean
        self.connection.clean = False  # until the reply after the final dot
        self.stats.transactions += 1
        sending = False  # once the message's first byte is written
        try:
            if "pipelining" in extensions:
                accepted = await self._pipelined(reset, mail, rcpts)
            else:
                accepted = await self._stepwise(reset, mail, rcpts)
            if not accepted:
                return self._outcomes()

            self.step, sending = "DATA", True
            await self._send_message()
            reply = await self._reply("DATA", self.data_timeout)
            # The transaction is over whatever the reply (RFC 5321 §4.1.1.4).
            self.connection.clean = True
            for address in accepted:
                if reply.code == 250:
                    self._delivered(address, reply.code, reply.message)
                else:
                    self._refused(address, "DATA", reply.code, reply.message)
            return self._outcomes()
        except Stale:
            self.wire.abort()
            raise
        except _Closing as closing:
            self.wire.abort()
            return self._fail_rest(broken_connection(self.where, closing.step, closing))
        except (Disconnected, TimeoutError, OSError) as error:
            self.wire.abort()
            if sending:
                log.warning("%s: connection lost during DATA; the message may arrive twice if "
                            "the next hop had accepted it", self.where)
            return self._fail_rest(broken_connection(self.where, self.step, error))
        except Unreadable as error:
            # A reply that cannot be read (too long, malformed): the protocol is out of
            # step, so the connection cannot be trusted for anything more.
            self.wire.abort()
            return self._fail_rest(TemporaryFailure(
                f"The next hop {self.where} sent an unreadable reply during {self.step}.",
                detail=str(error), enhanced="4.5.0", reason=Reason.NEXT_HOP_UNAVAILABLE,
            ))

    async def _stepwise(self, reset: bool, mail: bytes,
                        rcpts: Sequence[tuple[str, bytes]]) -> list[str]:
        """Without PIPELINING: one command, one reply. The recipients the next hop accepted,
        once DATA got its 354 (empty when it is not to be sent)."""
        if reset:
            self.wire.send(b"RSET\r\n", replies=1)
            if (await self._reply("RSET")).code != 250:
                raise Stale  # the transaction cannot be cleared: start on a new connection
        self.wire.send(mail, replies=1)
        reply = await self._reply("MAIL FROM")
        if reply.code != 250:
            self._refuse_all(rcpts, reply)
            return []
        accepted: list[str] = []
        for address, line in rcpts:
            self.wire.send(line, replies=1)
            reply = await self._reply("RCPT TO")
            self._rcpt_reply(address, reply, accepted)
        if not accepted:
            return []
        self.wire.send(b"DATA\r\n", replies=1)
        reply = await self._reply("DATA")
        if reply.code != 354:
            # Then the message was not sent, even if the reply was a 250.
            for address in accepted:
                self._refused(address, "DATA", reply.code, reply.message)
            return []
        return accepted

    async def _pipelined(self, reset: bool, mail: bytes,
                         rcpts: Sequence[tuple[str, bytes]]) -> list[str]:
        """RFC 2920: the whole command group in one write, then every reply in order, each
        deciding what it decides in `_stepwise`; RFC 2920 §3.1 has the client check them all,
        the reply to DATA included, whatever came before."""
        group = [b"RSET\r\n"] if reset else []
        group += [mail, *(line for _address, line in rcpts), b"DATA\r\n"]
        self.wire.send(b"".join(group), replies=len(group))
        if reset and (await self._reply("RSET")).code != 250:
            raise Stale
        reply = await self._reply("MAIL FROM")
        mail_accepted = reply.code == 250
        if not mail_accepted:
            self._refuse_all(rcpts, reply)
        accepted: list[str] = []
        for address, _line in rcpts:
            reply = await self._reply("RCPT TO")
            if mail_accepted:
                self._rcpt_reply(address, reply, accepted)
        reply = await self._reply("DATA")
        if reply.code == 354 and not accepted:
            # The next hop waits for a message no recipient is to get. RFC 2920 would send a
            # lone dot; closing instead can never deliver anything (an empty message to a
            # recipient we think refused, say).
            self.out_of_step = True
            return []
        if reply.code != 354:
            for address in accepted:
                self._refused(address, "DATA", reply.code, reply.message)
            return []
        return accepted

    def _refuse_all(self, rcpts: Sequence[tuple[str, bytes]], reply: Reply) -> None:
        for address, _line in rcpts:
            self._refused(address, "MAIL FROM", reply.code, reply.message)
        if reply.code == 421:
            self.wire.abort()  # the next hop is closing the session

    def _rcpt_reply(self, address: str, reply: Reply, accepted: list[str]) -> None:
        if reply.code in (250, 251):  # RFC 5321 §4.3.2: RCPT's only successes
            accepted.append(address)
            return
        self._refused(address, "RCPT TO", reply.code, reply.message, "1.0")
        if reply.code == 421:  # the next hop is closing: nothing more on this connection
            raise _Closing("RCPT TO")

    async def _send_message(self) -> None:
        """The message and its final dot, in one write when it fits in `_CHUNK`, otherwise
        in pieces that wait for the socket (so it is never copied whole into a buffer)."""
        payload, timeout = self.payload, self.command_timeout
        if len(payload) <= _CHUNK:
            self.wire.send(payload + b".\r\n", replies=1)
            return
        view = memoryview(payload)
        for start in range(0, len(payload), _CHUNK):
            self.wire.send(view[start:start + _CHUNK])
            await self.wire.drain(timeout)
        self.wire.send(b".\r\n", replies=1)


class _Closing(Exception):
    """The next hop answered 421 (closing the session) in the middle of a transaction."""

    def __init__(self, step: str) -> None:
        super().__init__(f"421 during {step}")
        self.step = step


def _address_problem(address: str, utf8: bool) -> GatewayError | None:
    """Why `address` cannot go in a MAIL or RCPT command to this next hop, if it cannot."""
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
