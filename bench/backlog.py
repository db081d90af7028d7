"""`python -m bench.backlog SPOOL COUNT`: fill a stopped gateway's spool with COUNT deferred
messages, as a next hop that has been refusing mail for a while would leave it.

The first message goes through the spool's public API (`Spool.enqueue`, then
`Spool.write_state` with a deferred state whose next attempt is 30 days away), so its files
are exactly what the gateway writes. The others are copies of that template in the spool's
documented on-disk format (gateway/spool.py, "File format": header, then length-framed
records with a CRC-32 each), with a queue id, an envelope and a Message-ID of their own:
the template is parsed first and compared with what was enqueued, and the first copy is read
back through the API, so a format this module does not understand (a new version, an
encrypted spool) makes it fall back to the public API for every message rather than write
files the gateway cannot read. Every message's state is the same bytes (a plain spool's
state record does not name its queue id), so state files are hard links to the template's:
creating an inode is what costs on a loaded filesystem.

Durability is not wanted here, only speed: this process replaces `os.fsync` by a no-op and
calls `os.sync()` once at the end. The gateway must not be running on this spool meanwhile.
Each message is a 1 KiB plain-route letter (clinic → hospital, one recipient).
"""

from __future__ import annotations

import asyncio
import errno
import os
import shutil
import struct
import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

from bench.site import letter, plain_recipient
from gateway.envelope import DeliveryState, Envelope, Peer, Recipient, Status
from gateway.spool import Spool

BATCH = 256
AWAY = 30 * 86400.0
SENDER = "a@clinique-test.fr"
_HEADER = struct.Struct(">4sBB")  # magic, version, mode
_LENGTH = struct.Struct(">Q")
_CRC = struct.Struct(">I")
_PLAIN = 0


def _no_fsync(fd: object) -> None:
    del fd


def _deferred(spool: Spool, index: int, now: float) -> tuple[Envelope, bytes, DeliveryState]:
    recipient = plain_recipient(0)
    message = letter(SENDER, recipient, 1024, "us-ascii").replace(
        b"<bench@", f"<backlog-{index}@".encode(), 1)
    envelope = Envelope(spool.new_queue_id(), SENDER, (Recipient(recipient, "hospital"),),
                        "clinic", Peer("127.0.0.1", helo="backlog.bench"), now, len(message),
                        message_id=f"<backlog-{index}@clinique-test.fr>")
    state = DeliveryState.initial(envelope).update(
        recipient, status=Status.DEFERRED, attempts=1, next_attempt=now + AWAY,
        last_reply="421 4.4.2 bench backlog", enhanced="4.4.2")
    return envelope, message, state


async def _seed_public(spool: Spool, first: int, count: int, now: float) -> None:
    """Messages first..count-1 through the public API only."""
    written = first
    while written < count:
        batch = [_deferred(spool, index, now)
                 for index in range(written, min(count, written + BATCH))]
        await asyncio.gather(*(spool.enqueue(e, m) for e, m, _ in batch))
        for envelope, _, state in batch:
            if spool.write_state(envelope.queue_id, state) != "deferred":
                raise RuntimeError(f"{envelope.queue_id} was not filed in deferred/")
        written += len(batch)


def _record(payload: bytes) -> bytes:
    return _LENGTH.pack(len(payload) + _CRC.size) + payload + _CRC.pack(zlib.crc32(payload))


@dataclass(frozen=True)
class _Template:
    header: bytes
    state_file: Path

    @staticmethod
    def read(spool: Spool, envelope: Envelope, message: bytes) -> _Template | None:
        """The template's header, if its queue file is what this module would write."""
        queue_file = spool.root / "deferred" / envelope.queue_id
        state_file = spool.root / "state" / f"{envelope.queue_id}.state"
        if not (queue_file.is_file() and state_file.is_file()):
            return None
        data = queue_file.read_bytes()
        header = data[:_HEADER.size]
        if len(header) != _HEADER.size or _HEADER.unpack(header)[2] != _PLAIN:
            return None
        if data != header + _record(envelope.to_json()) + _record(message):
            return None
        return _Template(header, state_file)

    def copy(self, spool: Spool, envelope: Envelope, message: bytes) -> None:
        """The state first, as `enqueue` orders it: a queue file is never without its state."""
        state_file = spool.root / "state" / f"{envelope.queue_id}.state"
        try:
            os.link(self.state_file, state_file)
        except OSError as error:
            if error.errno != errno.EMLINK:  # ext4 allows 65,000 links to one inode
                raise
            shutil.copyfile(self.state_file, state_file)
        with open(spool.root / "deferred" / envelope.queue_id, "xb") as handle:
            handle.write(self.header + _record(envelope.to_json()) + _record(message))


def _reads_back(spool: Spool, envelope: Envelope, message: bytes,
                state: DeliveryState) -> bool:
    try:
        return (spool.locate(envelope.queue_id) == "deferred"
                and spool.load(envelope.queue_id) == (envelope, message)
                and spool.read_state(envelope.queue_id) == state)
    except Exception:
        return False


async def seed(root: Path, count: int) -> float:
    """Seconds taken to write `count` deferred messages into the spool at `root`."""
    started = time.monotonic()
    os.fsync = _no_fsync  # this process only; see the module docstring
    spool = Spool(root)
    spool.open()
    now = time.time()
    try:
        await _seed_public(spool, 0, min(count, 1), now)
        template = None
        first = next(iter(spool.entries(("deferred",))), None)
        if count > 1 and first is not None and first.envelope is not None:
            _, message = spool.load(first.queue_id)
            template = _Template.read(spool, first.envelope, message)
        copied = 1
        if template is not None:
            envelope, message, state = _deferred(spool, 1, now)
            template.copy(spool, envelope, message)
            if _reads_back(spool, envelope, message, state):
                for index in range(2, count):
                    envelope, message, _ = _deferred(spool, index, now)
                    template.copy(spool, envelope, message)
                copied = count
            else:
                spool.delete(envelope.queue_id)
        if copied < count:
            print("the spool's files are not in the format bench/backlog.py writes; seeding "
                  "through the public API (slower)", file=sys.stderr)
            await _seed_public(spool, copied, count, now)
    finally:
        spool.close()
    os.sync()
    return time.monotonic() - started


def main() -> None:
    root, count = Path(sys.argv[1]), int(sys.argv[2])
    seconds = asyncio.run(seed(root, count))
    print(f"{count} {seconds:.3f}", flush=True)


if __name__ == "__main__":
    main()
