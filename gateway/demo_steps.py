"""The steps `gateway demo` plays, each checked from the receiving side (see gateway.demo).

Each step sends one example through the gateway as a network's MTA would, waits for what the
destination network's MTA receives, has the recipient's client decrypt and verify it with the
recipient's own key, compares it with what the author wrote, and fills one row of the table.
A step that does not behave as expected raises `StepFailed` with the sentence the table shows.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import io
import re
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from adapters.cms.entity import parse_entity
from gateway.config import Config
from gateway.demo_networks import (
    Arrival,
    NetworkServer,
    Reading,
    gp_client,
    read_apicrypt,
    read_smime,
    smime_client,
    submit,
    tampered_smime,
)
from gateway.demo_pki import (
    GATEWAY_PGP_ADDRESS,
    GATEWAY_SMIME_ADDRESS,
    HOSPITAL_MTA,
    MEDECIN_MTA,
    STRANGER_MTA,
    DemoPki,
    Mta,
)
from gateway.demo_traffic import XDM_FILES, Example, leaves, read_receipt

__all__ = ["WAIT", "Row", "StepFailed", "Steps"]

WAIT = 30.0  # seconds a step waits for mail to arrive; the whole demo takes a few seconds


class StepFailed(Exception):
    """A step did not behave as expected; the message says how."""


@dataclass
class Row:
    number: str
    title: str
    route: str  # sender → recipient
    envelopes: str  # envelope in → envelope out
    verdict: str = ""
    outcome: str = ""
    seconds: float = 0.0
    ok: bool = False
    proof: list[str] = field(default_factory=list)
    failure: str = ""



class Steps:
    """The steps and their checks; the demo's runner sets these attributes before playing."""

    config: Config
    examples: dict[str, Example]
    pki: DemoPki | None
    servers: dict[str, NetworkServer]
    now: dt.datetime
    token: str
    out: Path  # demo-run/: what each side sent, received and decrypted
    port: int  # the gateway's listener
    arrow: str
    letter: bytes | None  # step 2's letter as the doctor read it
    mdn_id: str
    dsn_text: bytes  # step 4's DSN, shown under the table

    # -- helpers -------------------------------------------------------------------------------

    def _client(self, mta: Mta) -> tuple[Path, Path]:
        assert self.pki is not None
        return self.pki.mta_files[mta.key]

    async def _send(self, mta: Mta | None, sender: str, recipient: str, data: bytes,
                    client_certificate: bool = True) -> str:
        assert self.pki is not None
        client = self._client(mta) if mta is not None and client_certificate else None
        helo = mta.fqdn if mta is not None else "localhost"
        sent = await submit(self.port, self.pki.anchors, client, helo, sender, [recipient], data)
        if not sent.accepted:
            raise StepFailed(f"the gateway refused it: {sent.reply}")
        return sent.reply

    def _save(self, name: str, data: bytes) -> Path:
        path = self.out / name
        path.write_bytes(data)
        return path

    def _arrow(self, left: str, right: str) -> str:
        return f"{left} {self.arrow} {right}"

    def _gateway_tls(self, arrival: Arrival) -> str:
        assert self.pki is not None
        if not arrival.tls or arrival.peer_subject != self.pki.gateway_subject:
            raise StepFailed(f"the hospital MTA did not get it over mutual TLS from the gateway "
                             f"(peer {arrival.peer_subject})")
        return arrival.peer_subject.split(",")[0]

    def _verdict(self, message_id: str) -> str:
        """What the gateway verified, as its audit trail recorded it (`unwrapped` event)."""
        from gateway import audit

        for record in audit.search(self.config.gateway.audit.path, message_id=message_id):
            if record.get("event") == "unwrapped":
                if record.get("method") == "none":
                    return "none (plain MIME)"
                text = f"{record.get('method')}={record.get('verdict')}"
                if record.get("verdict") == "fail" and record.get("why"):
                    text += f" ({record['why']})"
                return text
        return "?"

    @staticmethod
    def _results(content: bytes) -> str:
        """The gateway's Authentication-Results, shortened: method=result (signer)."""
        value = parse_entity(content).get("authentication-results") or ""
        match = re.search(r";\s*([\w-]+)(?:=(\w+))?", value)
        if match is None:
            return "?"
        method, result = match.group(1), match.group(2)
        if method == "none":
            return "none (unsigned MIME)"
        signer = re.search(r"(?:smime-identifier|header\.from)=(\S+)", value)
        return f"{method}={result}" + (f" ({signer.group(1)})" if signer else "")

    def _same_parts(self, sent: bytes, received: bytes, text_charset: str | None = None) -> str:
        """Compare the decoded parts; returns a short description or raises StepFailed."""
        wanted, got = leaves(sent), leaves(received)
        if len(wanted) != len(got):
            raise StepFailed(f"{len(got)} part(s) arrived, {len(wanted)} were sent")
        for before, after in zip(wanted, got, strict=True):
            same = before.data == after.data
            if not same and text_charset and before.media_type == "text/plain":
                # Apicrypt v1 carries text in ISO-8859-1: the characters must be the same.
                same = (before.data.decode(before.charset or "us-ascii")
                        == after.data.decode(text_charset))
            if not same:
                raise StepFailed(f"part {before.filename or before.media_type} differs from what "
                                 "the sender wrote")
        names = [leaf.filename for leaf in wanted if leaf.filename]
        return f"{len(wanted)} part(s) identical" + (f" ({', '.join(names)})" if names else "")

    @staticmethod
    def _verified(reading: Reading, who: str, signer: str) -> None:
        if not reading.ok:
            raise StepFailed(f"{who} could not read it with their own key ({reading.tool}: "
                             f"{reading.detail})")
        if reading.signer != signer:
            raise StepFailed(f"{who} found it signed by {reading.signer}, not {signer}")

    # -- the steps -----------------------------------------------------------------------------

    async def _hprim(self, row: Row) -> None:
        ex, pki = self.examples["hprim"], self.pki
        assert pki is not None
        row.route = self._arrow(ex.sender, ex.recipient)
        row.envelopes = self._arrow("Apicrypt", "MIME/mTLS")
        wire = gp_client(pki, ex.sender, ex.content, self.now)
        self._save("1-hprim-lab-report.sent.eml", wire)
        await self._send(None, ex.sender, ex.recipient, wire)
        arrival = await self.servers["hospital"].wait_for(_carrying(ex), WAIT)
        self._save("1-hprim-lab-report.received.eml", arrival.data)
        peer = self._gateway_tls(arrival)
        self._same_parts(ex.content, arrival.data)
        if b"****FINFICHIER****" not in leaves(arrival.data)[0].data:
            raise StepFailed("the HPRIM text lost its ****FINFICHIER**** line")
        row.verdict = self._verdict(ex.message_id)
        seen = self._results(arrival.data)
        if not (row.verdict.startswith("x-apicrypt=pass") and seen.startswith("x-apicrypt=pass")):
            raise StepFailed(f"the gateway did not verify the GP's signature ({row.verdict})")
        row.outcome = "delivered"
        row.proof.append(f"hospital MTA got it over mutual TLS from {peer}; the HPRIM text "
                         "is byte-identical (ISO-8859-1, ****LAB**** ... ****FINFICHIER****)")

    async def _discharge(self, row: Row) -> None:
        ex, pki = self.examples["discharge"], self.pki
        assert pki is not None
        row.route = self._arrow(ex.sender, ex.recipient)
        row.envelopes = self._arrow("MIME/mTLS", "S/MIME")
        self._save("2-discharge-letter.sent.eml", ex.content)
        await self._send(HOSPITAL_MTA, ex.sender, ex.recipient, ex.content)
        arrival = await self.servers["medecin"].wait_for(_carrying(ex), WAIT)
        self._save("2-discharge-letter.received.p7m.eml", arrival.data)
        doctor = pki.doctors[ex.recipient]
        reading = await asyncio.to_thread(read_smime, arrival.data, doctor, pki, self.now)
        self._verified(reading, ex.recipient, GATEWAY_SMIME_ADDRESS)
        self._save("2-discharge-letter.decrypted.eml", reading.content)
        same = self._same_parts(ex.content, reading.content)
        archive = next(leaf.data for leaf in leaves(reading.content)
                       if leaf.filename == "IHE_XDM.ZIP")
        with zipfile.ZipFile(io.BytesIO(archive)) as opened:
            if tuple(opened.namelist()) != XDM_FILES or opened.testzip() is not None:
                raise StepFailed("IHE_XDM.ZIP arrived without its XDM layout")
        row.verdict = self._verdict(ex.message_id)
        row.outcome = "delivered, receipt asked"
        self.letter = reading.content
        row.proof.append(f"{ex.recipient} decrypted it with her own key ({reading.tool}), "
                         f"signed by {reading.signer}; {same}, the ZIP holds "
                         f"{len(XDM_FILES)} XDM files")

    async def _receipt(self, row: Row) -> None:
        ex, pki = self.examples["discharge"], self.pki
        assert pki is not None
        letter = self.letter
        if letter is None:
            raise StepFailed("the letter of step 2 did not arrive, so no receipt was sent")
        reader = ex.recipient
        row.route = self._arrow(reader, ex.sender)
        row.envelopes = self._arrow("S/MIME", "MIME/mTLS")
        mdn = read_receipt(letter, reader, self.now, lambda: self.mdn_id)
        if not mdn:
            raise StepFailed("the letter arrived without its Disposition-Notification-To")
        wire = await asyncio.to_thread(smime_client, pki, pki.doctors[reader], mdn, self.now)
        self._save("2b-read-receipt.sent.p7m.eml", wire)
        await self._send(MEDECIN_MTA, "", ex.sender, wire)  # MDNs go with a null sender
        original = ex.message_id.encode()
        arrival = await self.servers["hospital"].wait_for(
            lambda a: a.sender == "" and b"Original-Message-ID: " + original in a.data, WAIT)
        self._save("2b-read-receipt.received.eml", arrival.data)
        peer = self._gateway_tls(arrival)
        row.verdict = self._verdict(self.mdn_id)
        seen = self._results(arrival.data)
        if not (row.verdict.startswith("smime=pass") and seen.startswith("smime=pass")):
            raise StepFailed(f"the gateway did not verify the receipt's signature ({row.verdict})")
        row.outcome = "receipt delivered"
        row.proof.append(f"hospital MTA got the MDN for {ex.message_id} over mutual TLS from "
                         f"{peer}")

    async def _smime_letter(self, row: Row) -> None:
        ex, pki = self.examples["smime"], self.pki
        assert pki is not None
        row.route = self._arrow(ex.sender, ex.recipient)
        row.envelopes = self._arrow("S/MIME", "Apicrypt")
        wire = await asyncio.to_thread(smime_client, pki, pki.doctors[ex.sender], ex.content,
                                       self.now)
        self._save("3-smime-letter.sent.p7m.eml", wire)
        await self._send(MEDECIN_MTA, ex.sender, ex.recipient, wire)
        arrival = await self.servers["apicrypt"].wait_for(
            lambda a: ex.recipient in a.recipients and a.sender == ex.sender
            and ex.message_id.encode() in a.data, WAIT)
        self._save("3-smime-letter.received.apicrypt.eml", arrival.data)
        reading = await asyncio.to_thread(read_apicrypt, arrival.data, ex.recipient, pki,
                                          self.now)
        self._verified(reading, ex.recipient, GATEWAY_PGP_ADDRESS)
        self._save("3-smime-letter.decrypted.eml", reading.content)
        same = self._same_parts(ex.content, reading.content, text_charset="iso-8859-1")
        row.verdict = self._verdict(ex.message_id)
        if not row.verdict.startswith("smime=pass"):
            raise StepFailed(f"the gateway did not verify the doctor's signature ({row.verdict})")
        row.outcome = "delivered"
        apz = sum(1 for leaf in leaves(arrival.data)
                  if leaf.filename and leaf.filename.endswith(".apz"))
        row.proof.append(f"{ex.recipient} decrypted the text and {apz} .apz attachment(s) with "
                         f"his own key ({reading.tool}), signed by {reading.signer}; {same}")

    async def _tampered(self, row: Row) -> None:
        ex, pki = self.examples["tampered"], self.pki
        assert pki is not None
        row.route = self._arrow(ex.sender, ex.recipient)
        row.envelopes = self._arrow("S/MIME, altered", "DSN in S/MIME")
        wire = await asyncio.to_thread(tampered_smime, pki, pki.doctors[ex.sender], ex.content,
                                       self.now, (b"bisoprolol 5 mg", b"bisoprolol 50 mg"))
        self._save("4-tampered-letter.sent.p7m.eml", wire)
        # Accepted: the signature is inside the encryption, checked after the 250 (DESIGN §5).
        await self._send(MEDECIN_MTA, ex.sender, ex.recipient, wire)
        arrival = await self.servers["medecin"].wait_for(
            lambda a: a.sender == "" and ex.sender in a.recipients
            and ex.message_id.encode() in a.data, WAIT)  # In-Reply-To, in clear
        self._save("4-tampered-letter.dsn.p7m.eml", arrival.data)
        reading = await asyncio.to_thread(read_smime, arrival.data, pki.doctors[ex.sender], pki,
                                          self.now)
        self._verified(reading, ex.sender, GATEWAY_SMIME_ADDRESS)
        self._save("4-tampered-letter.dsn.decrypted.eml", reading.content)
        report = b"".join(leaf.data for leaf in leaves(reading.content))
        status = re.search(rb"(?m)^Status:\s*(5\.\d+\.\d+)", report)
        if status is None or ex.message_id.encode() not in report:
            raise StepFailed("the DSN does not report a permanent failure of this message")
        if any(ex.message_id.encode() in a.data for a in self.servers["hospital"].arrivals):
            raise StepFailed("the tampered message was delivered to the hospital")
        self.dsn_text = next((leaf.data for leaf in leaves(reading.content)
                              if leaf.media_type == "text/plain"), b"")
        row.verdict = self._verdict(ex.message_id)
        if not row.verdict.startswith("smime=fail"):
            raise StepFailed(f"the gateway's verdict was {row.verdict}, not a failure")
        row.outcome = f"bounced {status.group(1).decode()}, DSN delivered"
        row.proof.append(f"{ex.sender} decrypted the DSN with her own key ({reading.tool}), "
                         f"signed by {reading.signer}; the hospital received nothing")

    async def _stranger(self, row: Row) -> None:
        ex, pki = self.examples["stranger"], self.pki
        assert pki is not None
        row.route = self._arrow(ex.sender, ex.recipient)
        row.envelopes = self._arrow("TLS, unlisted DN", "nothing")
        sent = await submit(self.port, pki.anchors, self._client(STRANGER_MTA),
                            STRANGER_MTA.fqdn, ex.sender, [ex.recipient], ex.content)
        if sent.accepted:
            raise StepFailed(f"the gateway accepted it ({sent.reply})")
        if not sent.reply.startswith("5"):
            raise StepFailed(f"refused with a temporary reply: {sent.reply}")
        row.verdict = "not reached"
        row.outcome = f"refused {sent.reply.split()[0]} at SMTP"
        row.proof.append(f"{STRANGER_MTA.fqdn} ({STRANGER_MTA.organisation}) is not on the "
                         "MSSanté whitelist for chu-exemple.fr; the gateway answered:")
        row.proof.append(f"  {sent.reply}")


def _carrying(example: Example) -> Callable[[Arrival], bool]:
    wanted = example.message_id.encode()
    return lambda arrival: (example.recipient in arrival.recipients
                            and wanted in arrival.data)
