"""The audit chain detects edits, insertions, deletions; a torn tail is repaired and recorded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gateway.audit import AuditTrail, search, verify

DAY = 86400.0
T0 = 1_795_000_000.0  # 2026-11-18


def trail(folder: Path, now: list[float]) -> AuditTrail:
    audit = AuditTrail(folder, retention=183 * DAY, clock=lambda: now[0])
    audit.open()
    return audit


def fill(folder: Path, count: int = 5) -> list[float]:
    now = [T0]
    audit = trail(folder, now)
    for index in range(count):
        audit.record("received", queue_id=f"Q{index}", message_id=f"<m{index}@x>",
                     sender="a@chu-test.fr", recipients=["b@clinique-test.fr"])
        now[0] += DAY / 2  # crosses midnight: several files
    audit.close()
    return now


def lines(folder: Path) -> list[tuple[Path, int]]:
    out = []
    for path in sorted(folder.iterdir()):
        for number, _ in enumerate(path.read_text().splitlines(), 1):
            out.append((path, number))
    return out


def test_clean_chain_verifies_across_files(tmp_path: Path) -> None:
    fill(tmp_path)
    assert len(list(tmp_path.iterdir())) >= 3
    count, broken = verify(tmp_path)
    assert broken is None and count >= 5 + 3  # events plus one link record per file


def test_edit_is_detected(tmp_path: Path) -> None:
    fill(tmp_path)
    path = sorted(tmp_path.iterdir())[1]
    text = path.read_text().replace("b@clinique-test.fr", "c@clinique-test.fr", 1)
    path.write_text(text)
    _count, broken = verify(tmp_path)
    assert broken is not None and "changed" in broken.why and broken.file == path.name


def test_deletion_and_insertion_are_detected(tmp_path: Path) -> None:
    fill(tmp_path)
    first = sorted(tmp_path.iterdir())[0]
    rows = first.read_text().splitlines(keepends=True)
    first.write_text("".join(rows[1:]))  # the oldest record goes
    _count, broken = verify(tmp_path)
    assert broken is not None and "file boundary" in broken.why

    middle = tmp_path / "m"
    fill(middle)
    path = sorted(middle.iterdir())[1]
    rows = path.read_text().splitlines(keepends=True)
    path.write_text(rows[0] + "".join(rows[2:]))  # a record in the middle goes
    _count, broken = verify(middle)
    assert broken is not None and "chain is broken" in broken.why

    other = tmp_path / "b"
    fill(other)
    path = sorted(other.iterdir())[1]
    record = json.loads(path.read_text().splitlines()[0])
    path.write_text(json.dumps(record) + "\n" + path.read_text())  # a replayed record
    _count, broken = verify(other)
    assert broken is not None


def test_torn_tail_is_repaired_and_the_repair_recorded(tmp_path: Path) -> None:
    now = fill(tmp_path)
    last = sorted(tmp_path.iterdir())[-1]
    with open(last, "ab") as handle:
        handle.write(b'{"event":"delivered","queue_id":"Q9"')  # kill -9 mid-write
    audit = trail(tmp_path, now)
    audit.close()
    _count, broken = verify(tmp_path)
    assert broken is None
    records = [json.loads(line) for p in sorted(tmp_path.iterdir()) for line in p.read_text().splitlines()]
    assert records[-1]["event"] == "repair"


def test_never_content_nor_subject(tmp_path: Path) -> None:
    audit = trail(tmp_path, [T0])
    with pytest.raises(ValueError):
        audit.record("received", Subject="DUPONT Jean 01/02/1950")
    with pytest.raises(ValueError):
        audit.record("received", content="...")


def test_retention_removes_old_files(tmp_path: Path) -> None:
    now = fill(tmp_path)
    now[0] += 200 * DAY
    audit = trail(tmp_path, now)
    audit.record("start")
    audit.close()
    assert len(list(tmp_path.iterdir())) == 1


def test_search_by_message_id(tmp_path: Path) -> None:
    fill(tmp_path)
    found = list(search(tmp_path, message_id="<m3@x>"))
    assert [r["queue_id"] for r in found] == ["Q3"]
    assert len(list(search(tmp_path, address="B@CLINIQUE-TEST.FR"))) == 5


def test_search_by_address_returns_the_whole_timeline(tmp_path: Path) -> None:
    now = [T0]
    audit = trail(tmp_path, now)
    audit.record("received", queue_id="Q1", sender="a@chu-test.fr",
                 recipients=["b@clinique-test.fr"])
    audit.record("received", queue_id="Q2", sender="z@chu-test.fr", recipients=["y@x.fr"])
    audit.record("unwrapped", queue_id="Q1", verdict="pass")
    audit.record("bounced", queue_id="Q1", recipient="b@clinique-test.fr", reply="550")
    audit.record("dsn", queue_id="Q1", dsn_queue_id="Q3", action="failed")
    audit.record("delivered", queue_id="Q3", recipient="a@chu-test.fr")
    audit.close()
    events = [(r["event"], r["queue_id"]) for r in search(tmp_path, address="A@chu-test.fr")]
    assert events == [("received", "Q1"), ("unwrapped", "Q1"), ("bounced", "Q1"),
                      ("dsn", "Q1"), ("delivered", "Q3")]
