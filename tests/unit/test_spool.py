"""The spool keeps every accepted message, readable, and nothing else: durability, recovery,
encryption at rest, corruption handling, group commit and the operators' queue commands."""

from __future__ import annotations

import asyncio
import errno
import os
import stat
import threading
from pathlib import Path

import pytest

from gateway.envelope import DeliveryState, Envelope, Peer, Recipient, Status
from gateway.errors import Reason, TemporaryFailure
from gateway.spool import (
    CorruptQueueFile,
    NoSuchMessage,
    Operation,
    Spool,
    SpoolError,
    SpoolFaults,
)

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))
T0 = 1_795_000_000.0
SENDER = "dr.martin@clinique-test.fr"
SECRET = b"Patient DUPONT Jeanne nee le 12/03/1953, HbA1c 9.1%"


def make_spool(root: Path, key: bytes | None = None, **kwargs: object) -> Spool:
    spool = Spool(root, key, **kwargs)  # type: ignore[arg-type]
    spool.open()
    return spool


def make_envelope(spool: Spool, *recipients: str, size: int = 0) -> Envelope:
    return Envelope(
        queue_id=spool.new_queue_id(),
        sender=SENDER,
        recipients=tuple(Recipient(a, "hospital") for a in recipients or ("b@chu-test.fr",)),
        source_network="medecin",
        peer=Peer("192.0.2.7", 25, "mx.clinique-test.fr", True, "CN=mx.clinique-test.fr"),
        received_at=T0,
        size=size,
        message_id="<m1@clinique-test.fr>",
    )


def body(tag: str, size: int = 10 * 1024) -> bytes:
    head = b"Subject: " + SECRET + b"\r\n\r\n" + tag.encode() + b"\r\n"
    return head + b"x" * max(0, size - len(head))


async def put(spool: Spool, *recipients: str, size: int = 10 * 1024) -> tuple[Envelope, bytes]:
    envelope = make_envelope(spool, *recipients, size=size)
    data = body(envelope.queue_id, size)
    await spool.enqueue(envelope, data)
    return envelope, data


def files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


# -- durability and recovery ---------------------------------------------------------------------


@pytest.mark.parametrize("key", [None, KEY], ids=["plain", "encrypted"])
async def test_enqueue_then_recover_in_a_new_instance(tmp_path: Path, key: bytes | None) -> None:
    spool = make_spool(tmp_path, key)
    sent = [await put(spool, "b@chu-test.fr", "c@chu-test.fr"), await put(spool, size=0),
            await put(spool, size=3 * 1024 * 1024)]
    assert spool.stats.enqueued == 3

    again = Spool(tmp_path, key)
    entries = again.recover()
    assert [e.queue_id for e in entries] == sorted(e.queue_id for e, _ in sent)
    by_id = {e.queue_id: e for e in entries}
    for envelope, data in sent:
        entry = by_id[envelope.queue_id]
        assert entry.location == "active"
        assert entry.envelope == envelope
        assert entry.state == DeliveryState.initial(envelope)
        assert again.load(envelope.queue_id) == (envelope, data)
        assert again.read_state(envelope.queue_id) == DeliveryState.initial(envelope)


async def test_files_and_folders_are_private(tmp_path: Path) -> None:
    spool = make_spool(tmp_path / "spool")
    await put(spool)
    for folder in ("incoming", "active", "deferred", "hold", "corrupt", "state"):
        assert stat.S_IMODE((tmp_path / "spool" / folder).stat().st_mode) == 0o700
    for path in files(tmp_path / "spool"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_queue_ids_are_unique_sortable_and_safe() -> None:
    ids = [Spool.new_queue_id() for _ in range(2000)]
    assert len(set(ids)) == len(ids)
    assert ids == sorted(ids)
    assert all(len(i) == 17 and i.isalnum() and i.isupper() for i in ids)


def test_locate_refuses_names_that_are_not_queue_ids(tmp_path: Path) -> None:
    spool = make_spool(tmp_path / "spool")
    (tmp_path / "spool" / "active" / "x").write_bytes(b"")
    for name in ("../active/x", "x", "", "ABCDEFGHJKMN.state", "/etc/passwd"):
        assert spool.locate(name) is None


def test_a_key_must_be_32_bytes(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        Spool(tmp_path, b"too short\n")


async def test_incoming_leftovers_are_deleted_at_recovery(tmp_path: Path) -> None:
    spool = make_spool(tmp_path)
    kept, _ = await put(spool)
    incoming = tmp_path / "incoming"
    (incoming / "0123456789ABCDEF0").write_bytes(b"PSQF\x01\x00half a message")
    (incoming / "0123456789ABCDEF0.state").write_bytes(b"")
    (incoming / "0123456789ABCDEF1.state.1a2b.tmp").write_bytes(b"")
    assert [e.queue_id for e in Spool(tmp_path).recover()] == [kept.queue_id]
    assert list(incoming.iterdir()) == []


async def test_missing_state_file_means_the_initial_state(tmp_path: Path) -> None:
    spool = make_spool(tmp_path)
    envelope, _ = await put(spool, "b@chu-test.fr", "c@chu-test.fr")
    # Enqueue writes no state file: until an attempt changes it, the state is the initial one.
    assert not (tmp_path / "state" / f"{envelope.queue_id}.state").exists()
    [entry] = Spool(tmp_path).recover()
    assert entry.state == DeliveryState.initial(envelope)
    assert spool.read_state(envelope.queue_id) == DeliveryState.initial(envelope)


async def test_orphan_state_files_are_removed_at_recovery(tmp_path: Path) -> None:
    spool = make_spool(tmp_path)
    envelope, _ = await put(spool)
    spool.write_state(envelope.queue_id, DeliveryState.initial(envelope).update(
        "b@chu-test.fr", attempts=1))
    (tmp_path / "active" / envelope.queue_id).unlink()  # a crash between the two unlinks
    assert (tmp_path / "state" / f"{envelope.queue_id}.state").exists()
    assert Spool(tmp_path).recover() == []
    assert files(tmp_path) == []


# -- encryption at rest --------------------------------------------------------------------------


async def test_encrypted_spool_holds_no_plaintext(tmp_path: Path) -> None:
    for key, folder in ((KEY, tmp_path / "encrypted"), (None, tmp_path / "plain")):
        spool = make_spool(folder, key)
        envelope, _ = await put(spool, "patient.dupont@chu-test.fr")
        state = DeliveryState.initial(envelope).update(
            "patient.dupont@chu-test.fr", status=Status.DEFERRED, next_attempt=T0 + 60,
            last_reply="451 4.4.1 patient.dupont@chu-test.fr: mailbox busy",
        )
        spool.write_state(envelope.queue_id, state)
        held, _ = await put(spool, "other.patient@chu-test.fr")
        spool.hold(held.queue_id)
    needles = [SECRET, b"DUPONT", SENDER.encode(), b"patient.dupont", b"other.patient",
               b"chu-test.fr", b"mailbox busy", b"mx.clinique-test.fr", b"192.0.2.7"]
    plain = b"".join(p.read_bytes() for p in files(tmp_path / "plain"))
    assert all(needle in plain for needle in needles)  # the search itself works
    encrypted = files(tmp_path / "encrypted")
    assert len(encrypted) == 3  # two queue files, and the state that an attempt changed
    for path in encrypted:
        content = path.read_bytes()
        assert content[:4] in (b"PSQF", b"PSST")
        for needle in needles:
            assert needle not in content, (path, needle)


async def test_wrong_key_sends_the_message_to_corrupt(tmp_path: Path) -> None:
    spool = make_spool(tmp_path, KEY)
    envelope, data = await put(spool)
    wrong = Spool(tmp_path, OTHER_KEY)
    assert wrong.recover() == []
    assert wrong.locate(envelope.queue_id) == "corrupt"
    why = (tmp_path / "corrupt" / f"{envelope.queue_id}.why").read_text()
    assert "authentication failed" in why
    # Never deleted: an operator who fixes the key moves it back and nothing is lost.
    os.rename(tmp_path / "corrupt" / envelope.queue_id, tmp_path / "active" / envelope.queue_id)
    assert Spool(tmp_path, KEY).load(envelope.queue_id) == (envelope, data)


@pytest.mark.parametrize(("written", "read"), [(None, KEY), (KEY, None)])
async def test_plain_and_encrypted_files_are_not_mixed(
    tmp_path: Path, written: bytes | None, read: bytes | None
) -> None:
    envelope, _ = await put(make_spool(tmp_path, written))
    assert Spool(tmp_path, read).recover() == []
    assert "spool key" in (tmp_path / "corrupt" / f"{envelope.queue_id}.why").read_text()


async def test_swapped_files_fail_authentication(tmp_path: Path) -> None:
    spool = make_spool(tmp_path, KEY)
    first, _ = await put(spool)
    second, _ = await put(spool)
    third, _ = await put(spool)
    spool.write_state(first.queue_id, DeliveryState.initial(first).update(
        "b@chu-test.fr", attempts=1))
    active, state = tmp_path / "active", tmp_path / "state"
    # An attacker with write access replays one message under another's name, and one state.
    os.replace(active / first.queue_id, active / second.queue_id)
    os.replace(state / f"{first.queue_id}.state", state / f"{third.queue_id}.state")
    assert Spool(tmp_path, KEY).recover() == []
    assert {p.name for p in (tmp_path / "corrupt").iterdir()} >= {
        second.queue_id, third.queue_id, f"{second.queue_id}.why", f"{third.queue_id}.why"}


# -- corruption ----------------------------------------------------------------------------------


@pytest.mark.parametrize("key", [None, KEY], ids=["plain", "encrypted"])
async def test_truncated_and_garbage_files_go_to_corrupt(tmp_path: Path, key: bytes | None) -> None:
    spool = make_spool(tmp_path, key)
    good, data = await put(spool)
    truncated, _ = await put(spool)
    garbage, _ = await put(spool)
    empty, _ = await put(spool)
    bad_state, _ = await put(spool)
    path = tmp_path / "active" / truncated.queue_id
    path.write_bytes(path.read_bytes()[:-10])
    (tmp_path / "active" / garbage.queue_id).write_bytes(os.urandom(4000))
    (tmp_path / "active" / empty.queue_id).write_bytes(b"")
    (tmp_path / "state" / f"{bad_state.queue_id}.state").write_bytes(b"PSST\x01\x00garbage")

    again = Spool(tmp_path, key)
    entries = again.recover()  # never raises
    assert [e.queue_id for e in entries] == [good.queue_id]
    assert again.load(good.queue_id) == (good, data)
    corrupt = tmp_path / "corrupt"
    for envelope in (truncated, garbage, empty, bad_state):
        assert again.locate(envelope.queue_id) == "corrupt"
        assert (corrupt / envelope.queue_id).exists()
        assert (corrupt / f"{envelope.queue_id}.why").read_text().strip()
    assert "truncated" in (corrupt / f"{truncated.queue_id}.why").read_text()
    assert "state file" in (corrupt / f"{bad_state.queue_id}.why").read_text()
    listed = {e.queue_id: e for e in again.entries()}
    assert listed[garbage.queue_id].location == "corrupt"
    assert listed[garbage.queue_id].envelope is None
    # A second start leaves corrupt/ alone.
    assert [e.queue_id for e in Spool(tmp_path, key).recover()] == [good.queue_id]
    assert len(list(corrupt.iterdir())) == 9  # four queue files, their notes, the bad state


@pytest.mark.parametrize("key", [None, KEY], ids=["plain", "encrypted"])
async def test_damage_inside_the_body_is_caught_by_load(tmp_path: Path, key: bytes | None) -> None:
    spool = make_spool(tmp_path, key)
    envelope, _ = await put(spool)
    path = tmp_path / "active" / envelope.queue_id
    raw = bytearray(path.read_bytes())
    raw[-100] ^= 0x01
    path.write_bytes(bytes(raw))
    # Recovery checks the framing only (no 25 MiB decryption at start); `load` checks it all.
    assert [e.queue_id for e in spool.recover()] == [envelope.queue_id]
    with pytest.raises(CorruptQueueFile) as caught:
        spool.load(envelope.queue_id)
    spool.quarantine(envelope.queue_id, caught.value.why)
    assert spool.locate(envelope.queue_id) == "corrupt"
    with pytest.raises(CorruptQueueFile):
        spool.load(envelope.queue_id)
    assert spool.write_state(envelope.queue_id, DeliveryState.initial(envelope)) is None


async def test_state_that_does_not_match_the_envelope_is_corrupt(tmp_path: Path) -> None:
    spool = make_spool(tmp_path)
    envelope, _ = await put(spool, "b@chu-test.fr")
    other = make_envelope(spool, "intruder@chu-test.fr")
    spool.write_state(envelope.queue_id, DeliveryState.initial(other))
    assert spool.recover() == []
    assert spool.locate(envelope.queue_id) == "corrupt"


# -- failures at enqueue -------------------------------------------------------------------------


@pytest.mark.parametrize("operation", ["write", "fsync", "rename", "fsync_dir"])
async def test_storage_failure_gives_451_and_leaves_nothing(
    tmp_path: Path, operation: Operation
) -> None:
    make_spool(tmp_path)
    spool = Spool(tmp_path, KEY, faults=SpoolFaults.failing(errno.ENOSPC, [operation]))
    envelope = make_envelope(spool)
    with pytest.raises(TemporaryFailure) as caught:
        await spool.enqueue(envelope, body("x"))
    error = caught.value
    assert (error.smtp_code, error.enhanced, error.reason) == (451, "4.3.0",
                                                               Reason.SPOOL_UNAVAILABLE)
    assert error.smtp_reply == (
        "451 4.3.0 Requested action aborted: local storage problem, try again later")
    assert "No space left on device" in error.detail
    assert files(tmp_path) == []
    assert spool.locate(envelope.queue_id) is None
    assert (spool.stats.enqueued, spool.stats.enqueue_failures) == (0, 1)


async def test_failure_of_the_rename_into_active_leaves_nothing(tmp_path: Path) -> None:
    def hook(operation: Operation, path: Path) -> None:
        if operation == "rename" and path.parent.name == "active":  # the file is complete
            raise OSError(errno.EIO, "I/O error", str(path))

    spool = make_spool(tmp_path, faults=SpoolFaults(hook))
    with pytest.raises(TemporaryFailure):
        await spool.enqueue(make_envelope(spool), body("x"))
    assert files(tmp_path) == []


async def test_the_spool_works_again_once_the_disk_has_room(tmp_path: Path) -> None:
    full = [True]

    def hook(operation: Operation, path: Path) -> None:
        if full[0] and operation == "write":
            raise OSError(errno.ENOSPC, "No space left on device", str(path))

    spool = make_spool(tmp_path, faults=SpoolFaults(hook))
    with pytest.raises(TemporaryFailure):
        await put(spool)
    full[0] = False
    envelope, data = await put(spool)
    assert Spool(tmp_path).load(envelope.queue_id) == (envelope, data)


async def test_a_cancelled_enqueue_leaves_no_stranded_message(tmp_path: Path) -> None:
    entered, proceed = threading.Event(), threading.Event()

    def hook(operation: Operation, path: Path) -> None:
        if operation == "fsync_dir" and path.name == "active":
            entered.set()
            proceed.wait(10)

    spool = make_spool(tmp_path, faults=SpoolFaults(hook))
    task = asyncio.ensure_future(put(spool))
    await asyncio.to_thread(entered.wait, 10)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    proceed.set()
    for _ in range(500):  # bounded: the clean-up runs once the shared fsync returns
        if not any((tmp_path / "active").iterdir()):
            break
        await asyncio.sleep(0.01)
    assert files(tmp_path) == []


# -- group commit --------------------------------------------------------------------------------


async def test_concurrent_enqueues_share_directory_fsyncs(tmp_path: Path) -> None:
    count = 50

    def hook(operation: Operation, path: Path) -> None:
        # Hold the first directory fsync until every enqueue has renamed its file: then one
        # more fsync must release all of them, whatever the machine's speed.
        if operation == "fsync_dir" and spool.stats.dir_fsyncs == 0:
            for _ in range(3000):
                if spool.stats.published == count:
                    break
                threading.Event().wait(0.01)

    make_spool(tmp_path)
    # An enqueue holds its worker thread until an fsync covers it: as many workers as
    # enqueues, so that all of them are in flight together.
    spool = Spool(tmp_path, faults=SpoolFaults(hook), workers=count)
    sent = await asyncio.gather(*(put(spool, size=10 * 1024) for _ in range(count)))
    fsyncs = spool.stats.dir_fsyncs
    assert spool.stats.enqueued == count
    assert fsyncs < count
    assert fsyncs == 2  # the held one (covering the first arrivals) and one for all the rest
    assert {e.queue_id for e in Spool(tmp_path).recover()} == {e.queue_id for e, _ in sent}


async def test_file_fsyncs_run_concurrently(tmp_path: Path) -> None:
    inside, peak, lock = [0], [0], threading.Lock()
    all_in = threading.Event()

    def hook(operation: Operation, path: Path) -> None:
        if operation == "fsync":
            with lock:
                inside[0] += 1
                peak[0] = max(peak[0], inside[0])
                if inside[0] == 8:
                    all_in.set()
            all_in.wait(10)  # returns at once when 8 fsyncs are in flight together
            with lock:
                inside[0] -= 1

    spool = make_spool(tmp_path, faults=SpoolFaults(hook))
    await asyncio.gather(*(put(spool) for _ in range(8)))  # 8 queue files, no state file
    assert peak[0] == 8


# -- queue commands and state changes ------------------------------------------------------------


async def test_write_state_files_the_message_by_its_state(tmp_path: Path) -> None:
    now = [T0]
    spool = make_spool(tmp_path, clock=lambda: now[0])
    envelope, _ = await put(spool, "b@chu-test.fr", "c@chu-test.fr")
    qid = envelope.queue_id
    state = DeliveryState.initial(envelope).update(
        "b@chu-test.fr", status=Status.DEFERRED, attempts=1, next_attempt=T0 + 300)
    assert spool.write_state(qid, state) == "active"  # c is still pending
    state = state.update("c@chu-test.fr", status=Status.DELIVERED, attempts=1)
    assert spool.write_state(qid, state) == "deferred"
    assert spool.read_state(qid) == state
    assert [e.queue_id for e in spool.entries(["deferred"])] == [qid]
    # `gateway queue retry`: next_attempt=0 makes it due, so it moves back to active/.
    assert spool.write_state(qid, state.update("b@chu-test.fr", next_attempt=0.0)) == "active"
    assert spool.write_state(qid, state) == "deferred"
    now[0] = T0 + 301  # due by the clock
    assert spool.write_state(qid, state) == "active"
    [entry] = Spool(tmp_path).recover()
    assert (entry.location, entry.state) == ("active", state)
    spool.finish(qid)
    assert spool.locate(qid) is None
    assert files(tmp_path) == []
    spool.finish(qid)  # idempotent


async def test_hold_and_release(tmp_path: Path) -> None:
    now = [T0]
    spool = make_spool(tmp_path, clock=lambda: now[0])
    envelope, data = await put(spool, "b@chu-test.fr", "c@chu-test.fr")
    qid = envelope.queue_id
    deferred = DeliveryState.initial(envelope).update(
        "b@chu-test.fr", status=Status.DEFERRED, attempts=2, next_attempt=T0 + 3600,
    ).update("c@chu-test.fr", status=Status.DELIVERED, attempts=1)
    spool.write_state(qid, deferred)
    spool.hold(qid)
    assert spool.locate(qid) == "hold"
    spool.hold(qid)  # already held: nothing to do
    assert Spool(tmp_path).recover() == []  # the server does not schedule held mail
    # An attempt that was in flight records its outcome but does not take it out of hold/.
    assert spool.write_state(qid, deferred.update("b@chu-test.fr", attempts=3)) == "hold"
    assert spool.locate(qid) == "hold"
    assert [(e.queue_id, e.location) for e in spool.entries()] == [(qid, "hold")]

    now[0] = T0 + 10
    spool.release(qid)
    assert spool.locate(qid) == "active"
    state = spool.read_state(qid)
    assert state.get("b@chu-test.fr").next_attempt == T0 + 10
    assert state.get("b@chu-test.fr").attempts == 3
    assert state.get("c@chu-test.fr").status is Status.DELIVERED
    assert spool.load(qid) == (envelope, data)
    with pytest.raises(SpoolError, match="not on hold"):
        spool.release(qid)


async def test_delete_does_not_come_back(tmp_path: Path) -> None:
    spool = make_spool(tmp_path)
    envelope, _ = await put(spool)
    qid = envelope.queue_id
    spool.delete(qid)
    assert spool.locate(qid) is None
    assert files(tmp_path) == []
    # The server's attempt finishes after the operator's delete: no resurrection.
    assert spool.write_state(qid, DeliveryState.initial(envelope)) is None
    assert files(tmp_path) == []
    spool.finish(qid)
    with pytest.raises(NoSuchMessage):
        spool.load(qid)
    with pytest.raises(NoSuchMessage):
        spool.read_state(qid)
    with pytest.raises(NoSuchMessage):
        spool.delete(qid)
    with pytest.raises(NoSuchMessage):
        spool.hold(qid)


async def test_quarantine_and_delete_from_corrupt(tmp_path: Path) -> None:
    spool = make_spool(tmp_path)
    envelope, _ = await put(spool)
    qid = envelope.queue_id
    spool.quarantine(qid, "damaged by a test")
    assert spool.locate(qid) == "corrupt"
    assert "damaged by a test" in (tmp_path / "corrupt" / f"{qid}.why").read_text()
    assert [(e.queue_id, e.location, e.envelope) for e in spool.entries()] == [
        (qid, "corrupt", None)]
    with pytest.raises(SpoolError):
        spool.hold(qid)
    spool.delete(qid)  # only ever by an operator's command
    assert files(tmp_path) == []


async def test_entries_tolerate_files_changing_underneath(tmp_path: Path) -> None:
    spool = make_spool(tmp_path)
    sent = [(await put(spool))[0] for _ in range(6)]
    spool.write_state(sent[4].queue_id, DeliveryState.initial(sent[4]).update(
        "b@chu-test.fr", attempts=1))
    listing = spool.entries()
    first = next(listing)
    spool.delete(sent[1].queue_id)
    spool.hold(sent[2].queue_id)
    spool.finish(sent[3].queue_id)
    (tmp_path / "state" / f"{sent[4].queue_id}.state").unlink()
    rest = list(listing)
    seen = [first.queue_id] + [e.queue_id for e in rest]
    assert sent[1].queue_id not in seen and sent[3].queue_id not in seen
    assert {sent[0].queue_id, sent[4].queue_id, sent[5].queue_id} <= set(seen)
    assert next(e for e in rest if e.queue_id == sent[4].queue_id).state == (
        DeliveryState.initial(sent[4]))


async def test_entries_while_another_thread_moves_messages(tmp_path: Path) -> None:
    spool = make_spool(tmp_path)
    sent = [(await put(spool))[0] for _ in range(10)]
    stop = threading.Event()

    def churn() -> None:
        cli = Spool(tmp_path)  # as `gateway queue` would, from another process
        rounds = 0
        while not stop.is_set() and rounds < 2000:
            envelope = sent[rounds % len(sent)]
            rounds += 1
            try:
                if cli.locate(envelope.queue_id) == "hold":
                    cli.release(envelope.queue_id)
                else:
                    cli.hold(envelope.queue_id)
                state = DeliveryState.initial(envelope).update(
                    envelope.recipients[0].address, status=Status.DEFERRED,
                    next_attempt=T0 * (rounds % 2 * 2))
                cli.write_state(envelope.queue_id, state)
            except (SpoolError, CorruptQueueFile):
                pass  # a release racing a hold is refused, which is what the command says

    worker = threading.Thread(target=churn)
    worker.start()
    try:
        for _ in range(200):
            listed = list(spool.entries())
            assert all(e.envelope is not None and e.state is not None for e in listed)
            assert all(e.location in ("active", "deferred", "hold") for e in listed)
    finally:
        stop.set()
        worker.join()
    assert sorted(e.queue_id for e in spool.entries()) == sorted(e.queue_id for e in sent)
    assert {e.queue_id for e in Spool(tmp_path).recover()} | {
        e.queue_id for e in spool.entries(["hold"])} == {e.queue_id for e in sent}


# -- taking a message back, and removals that fail -----------------------------------------------


async def test_withdraw_removes_a_just_enqueued_message_durably(tmp_path: Path) -> None:
    synced: list[str] = []

    def hook(operation: Operation, path: Path) -> None:
        if operation == "fsync_dir":
            synced.append(path.name)

    spool = make_spool(tmp_path, faults=SpoolFaults(hook))
    kept, _ = await put(spool)
    envelope, _ = await put(spool, "b@chu-test.fr", "c@chu-test.fr")
    synced.clear()
    await spool.withdraw(envelope.queue_id)
    assert spool.locate(envelope.queue_id) is None
    # The removal is fsync'ed before it returns; state/ need not be (an orphan state file is
    # removed at recovery), and this message never had one.
    assert synced == ["active"]
    assert [e.queue_id for e in Spool(tmp_path).recover()] == [kept.queue_id]
    assert [p.name for p in files(tmp_path)] == [kept.queue_id]
    await spool.withdraw(envelope.queue_id)  # idempotent
    with pytest.raises(ValueError):
        await spool.withdraw("../active")


async def test_withdraw_on_a_failing_disk_raises_451_and_completes_when_called_again(
    tmp_path: Path,
) -> None:
    broken = [False]
    synced: list[str] = []

    def hook(operation: Operation, path: Path) -> None:
        if operation == "fsync_dir":
            if broken[0]:
                raise OSError(errno.EIO, "Input/output error", str(path))
            synced.append(path.name)

    spool = make_spool(tmp_path, faults=SpoolFaults(hook))
    envelope, _ = await put(spool)
    broken[0] = True
    with pytest.raises(TemporaryFailure) as caught:
        await spool.withdraw(envelope.queue_id)
    assert (caught.value.smtp_code, caught.value.enhanced, caught.value.reason) == (
        451, "4.3.0", Reason.SPOOL_UNAVAILABLE)
    broken[0] = False
    synced.clear()
    await spool.withdraw(envelope.queue_id)
    # The file was already unlinked: the second call still fsyncs every folder it could have
    # been removed from, so the removal is durable once it returns.
    assert synced == ["active", "deferred", "hold"]
    assert files(tmp_path) == []


async def test_finish_that_failed_is_completed_by_calling_it_again(tmp_path: Path) -> None:
    broken = [False]

    def hook(operation: Operation, path: Path) -> None:
        if broken[0] and operation == "unlink" and path.parent.name == "active":
            raise OSError(errno.EROFS, "Read-only file system", str(path))

    spool = make_spool(tmp_path, faults=SpoolFaults(hook))
    envelope, _ = await put(spool)
    broken[0] = True
    with pytest.raises(OSError):
        spool.finish(envelope.queue_id)
    assert spool.locate(envelope.queue_id) == "active"  # still there, state and all
    assert spool.read_state(envelope.queue_id) == DeliveryState.initial(envelope)
    broken[0] = False
    spool.finish(envelope.queue_id)
    assert files(tmp_path) == []
