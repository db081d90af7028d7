"""The external Apicrypt codec under attack: plaintext must never outlive a run of a program.

The APICEM programs are replaced by a stand-in (a Python script) that takes the same
documented command lines (`apicrypt -s SRC -o DST -u USER -k KEYDIR -d RECIPIENTS`,
`apiuncrypt -s SRC -o DST -k KEYDIR`) and, depending on the first line of its input,
behaves well or badly: hangs, forks a child that keeps writing plaintext, exits 1 after
writing its output, answers with a link or a FIFO, takes its own rights away... It reports
what it saw (its directory's mode, its environment, its arguments) in a file next to itself,
outside the private directory.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import stat
import sys
import time
from pathlib import Path
from typing import Any

import pytest

import adapters.apicrypt_external as external
from adapters.apicrypt_external import PROGRAMS, ExternalCodec
from gateway.errors import PermanentFailure, Reason, TemporaryFailure

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")

SECRET = b"Patient DUPONT Jean, ne le 01/02/1960: HbA1c 9,1 %"

STAND_IN = '''#!{python}
import json, os, signal, stat, sys, time
args = sys.argv[1:]
opts = dict(zip(args[::2], args[1::2]))
here = os.path.dirname(os.path.abspath(sys.argv[0]))
src, dst = opts["-s"], opts["-o"]
work = os.path.dirname(src)
data = open(src, "rb").read()
mode = data.split(b"\\n", 1)[0].decode()
report = {
    "name": os.path.basename(sys.argv[0]), "argv": args, "directory": work,
    "directory_mode": stat.S_IMODE(os.stat(work).st_mode),
    "source_mode": stat.S_IMODE(os.stat(src).st_mode),
    "cwd": os.getcwd(), "env": dict(os.environ), "stdin": sys.stdin.read(),
    "own_group": os.getpgrp() == os.getpid(),
}

def done(**more):
    report.update(more)
    with open(os.path.join(here, "report.jsonl"), "a") as handle:
        handle.write(json.dumps(report) + "\\n")

def leak_forever():
    while True:
        try:
            with open(os.path.join(work, "leak"), "ab") as handle:
                handle.write(data)
        except OSError:
            pass
        time.sleep(0.01)

def output(content=b"OUT:" + data):
    with open(dst, "wb") as handle:
        handle.write(content)
    return stat.S_IMODE(os.stat(dst).st_mode)

if mode == "fail-after-output":
    output(data)
    sys.stderr.write("key missing for recipient\\n")
    done()
    sys.exit(1)
if mode in ("hang", "leave-child"):
    child = os.fork()
    if child == 0:
        leak_forever()
    if mode == "hang":
        done(child=child)
        time.sleep(3600)
    done(child=child, output_mode=output())
    sys.exit(0)
if mode == "escape":
    child = os.fork()
    if child == 0:
        os.setsid()  # out of the program's process group
        leak_forever()
    time.sleep(0.2)  # let it leave the group before the program exits
    done(child=child, output_mode=output())
    sys.exit(0)
if mode == "link":
    os.symlink(os.path.join(here, "victim"), dst)
    os.symlink(os.path.join(here, "victim"), os.path.join(work, "another-link"))
    done()
    sys.exit(0)
if mode == "hard-link":
    os.link(os.path.join(here, "victim"), os.path.join(work, "hard-link"))
    done(output_mode=output())
    sys.exit(0)
if mode == "fifo":
    os.mkfifo(dst)
    done()
    sys.exit(0)
if mode == "lock-out":
    output()
    os.mkdir(os.path.join(work, "inner"))
    with open(os.path.join(work, "inner", "copy"), "wb") as handle:
        handle.write(data)
    os.chmod(os.path.join(work, "inner", "copy"), 0)
    os.chmod(os.path.join(work, "inner"), 0)
    os.chmod(work, 0o500)
    done()
    sys.exit(0)
if mode == "signal":
    done()
    os.kill(os.getpid(), signal.SIGKILL)
if mode == "no-output":
    done()
    sys.exit(0)
done(output_mode=output())
'''


@pytest.fixture
def programs(tmp_path: Path) -> dict[str, str]:
    folder = tmp_path / "apicem"
    folder.mkdir()
    (folder / "victim").write_bytes(b"outside the private directory")
    (folder / "victim").chmod(0o644)
    script = STAND_IN.replace("{python}", sys.executable)
    paths: dict[str, str] = {}
    for name in PROGRAMS:
        path = folder / name
        path.write_text(script)
        path.chmod(0o700)
        paths[name] = str(path)
    return paths


@pytest.fixture
def work(tmp_path: Path) -> Path:
    base = tmp_path / "work"
    base.mkdir(mode=0o700)
    return base


def codec(programs: dict[str, str], work: Path, timeout: float = 30.0) -> ExternalCodec:
    return ExternalCodec(programs, "LABO01", str(work.parent / "keys"), timeout, str(work))


def reports(programs: dict[str, str]) -> list[dict[str, Any]]:
    path = Path(programs["apicrypt"]).parent / "report.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def gone(pid: int) -> bool:
    """True once `pid` no longer runs (absent or a zombie); waits a bounded while for it."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            return True
        if state in ("Z", "X"):
            return True
        time.sleep(0.02)
    return False


def no_plaintext(error: BaseException) -> None:
    text = repr(error) + str(error) + getattr(error, "detail", "")
    assert "DUPONT" not in text


# -- the private directory ------------------------------------------------------------------


def test_private_directory_is_0700_and_files_0600_while_the_program_runs(
        programs: dict[str, str], work: Path) -> None:
    out = codec(programs, work).seal_text(b"ok\n" + SECRET, ["dr@medecin.fr"])
    assert out == b"OUT:ok\n" + SECRET
    [seen] = reports(programs)
    assert seen["directory_mode"] == 0o700 and seen["source_mode"] == 0o600
    assert seen["output_mode"] == 0o600  # the program runs with umask 077
    directory = Path(seen["directory"])
    assert directory.parent == work and directory.name.startswith("apicrypt-")
    assert len(directory.name) > len("apicrypt-") + 6  # mkdtemp's random part
    assert seen["cwd"] == str(directory) and seen["env"]["TMPDIR"] == str(directory)


def test_each_run_gets_a_new_directory(programs: dict[str, str], work: Path) -> None:
    codec(programs, work).open_text(b"ok\n" + SECRET)
    codec(programs, work).open_attachment(b"ok\n" + SECRET)
    first, second = reports(programs)
    assert first["directory"] != second["directory"]
    assert first["argv"][4:] == ["-k", str(work.parent / "keys")]
    assert second["name"] == "apiuncryptpj"


def test_system_temporary_directory_is_the_default_base(
        programs: dict[str, str], work: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import tempfile
    monkeypatch.setattr(tempfile, "tempdir", str(work))
    ExternalCodec(programs, "LABO01", "keys").seal_attachment(b"ok\n", ["dr@medecin.fr"])
    [seen] = reports(programs)
    assert Path(seen["directory"]).parent == work
    assert list(work.iterdir()) == []


def test_base_directory_writable_by_others_is_refused(
        programs: dict[str, str], work: Path) -> None:
    work.chmod(0o777)
    with pytest.raises(TemporaryFailure) as caught:
        codec(programs, work).seal_text(b"ok\n", ["dr@medecin.fr"])
    assert caught.value.enhanced == "4.3.5" and "sticky" in caught.value.detail
    assert reports(programs) == []
    work.chmod(0o1777)  # like /tmp: others may write, but not rename or remove our entries
    codec(programs, work).seal_text(b"ok\n", ["dr@medecin.fr"])
    assert list(work.iterdir()) == []


# -- always wiped ---------------------------------------------------------------------------


def test_nothing_left_after_success(programs: dict[str, str], work: Path) -> None:
    codec(programs, work).seal_text(b"ok\n" + SECRET, ["dr@medecin.fr"])
    assert list(work.iterdir()) == []


def test_nothing_left_after_failure(programs: dict[str, str], work: Path) -> None:
    with pytest.raises(PermanentFailure):
        codec(programs, work).open_text(b"fail-after-output\n" + SECRET)
    assert list(work.iterdir()) == []


def test_nothing_left_after_timeout(programs: dict[str, str], work: Path) -> None:
    with pytest.raises(TemporaryFailure):
        codec(programs, work, timeout=1.5).open_text(b"hang\n" + SECRET)
    assert list(work.iterdir()) == []


def test_nothing_left_after_an_exception_and_the_program_is_killed(
        programs: dict[str, str], work: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(pid: int, timeout: float) -> bool:
        time.sleep(0.5)  # let the stand-in fork and report
        raise RuntimeError("unexpected")

    monkeypatch.setattr(external, "_exited_within", broken)
    with pytest.raises(RuntimeError):
        codec(programs, work).open_text(b"hang\n" + SECRET)
    assert list(work.iterdir()) == []
    for seen in reports(programs):
        assert gone(seen["child"])


def test_nothing_left_after_an_exception_reading_the_output(
        programs: dict[str, str], work: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(target: Path) -> bytes:
        raise MemoryError

    monkeypatch.setattr(external, "_read_output", broken)
    with pytest.raises(MemoryError):
        codec(programs, work).open_text(b"ok\n" + SECRET)
    assert list(work.iterdir()) == []


def test_files_that_cannot_be_removed_defer_loudly(
        programs: dict[str, str], work: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(external.shutil, "rmtree", lambda *args, **kwargs: None)
    with pytest.raises(TemporaryFailure) as caught:
        codec(programs, work).open_text(b"ok\n" + SECRET)
    assert "files left in" in caught.value.detail
    [left] = work.iterdir()
    # What could not be removed was at least overwritten.
    assert (left / "source").read_bytes() == bytes(len(b"ok\n" + SECRET))
    monkeypatch.undo()
    external.shutil.rmtree(left)


def test_program_that_takes_its_own_rights_away_is_still_wiped(
        programs: dict[str, str], work: Path) -> None:
    assert codec(programs, work).open_text(b"lock-out\n" + SECRET) == b"OUT:lock-out\n" + SECRET
    assert list(work.iterdir()) == []


def test_wipe_does_not_follow_links_out_of_the_directory(
        programs: dict[str, str], work: Path) -> None:
    victim = Path(programs["apicrypt"]).parent / "victim"
    with pytest.raises(PermanentFailure) as caught:
        codec(programs, work).open_text(b"link\n" + SECRET)
    assert caught.value.reason is Reason.DECRYPTION_FAILED
    assert victim.read_bytes() == b"outside the private directory"
    assert list(work.iterdir()) == []


def test_wipe_does_not_overwrite_a_file_hard_linked_from_outside(
        programs: dict[str, str], work: Path) -> None:
    victim = Path(programs["apicrypt"]).parent / "victim"
    codec(programs, work).open_text(b"hard-link\n" + SECRET)
    assert victim.read_bytes() == b"outside the private directory"
    assert stat.S_IMODE(victim.stat().st_mode) == 0o644 and victim.stat().st_nlink == 1
    assert list(work.iterdir()) == []


def test_fifo_as_output_does_not_block(programs: dict[str, str], work: Path) -> None:
    with pytest.raises(PermanentFailure):
        codec(programs, work).open_text(b"fifo\n" + SECRET)
    assert list(work.iterdir()) == []


# -- processes ------------------------------------------------------------------------------


def test_hanging_program_is_killed_with_its_children(
        programs: dict[str, str], work: Path) -> None:
    with pytest.raises(TemporaryFailure) as caught:
        codec(programs, work, timeout=1.5).seal_text(b"hang\n" + SECRET, ["dr@medecin.fr"])
    assert caught.value.enhanced == "4.3.0" and "timed out" in caught.value.detail
    [seen] = reports(programs)
    assert seen["own_group"]
    assert gone(seen["child"])


def test_child_left_running_after_success_is_killed(
        programs: dict[str, str], work: Path) -> None:
    out = codec(programs, work).open_text(b"leave-child\n" + SECRET)
    assert out == b"OUT:leave-child\n" + SECRET
    [seen] = reports(programs)
    assert gone(seen["child"])
    assert list(work.iterdir()) == []


def test_child_that_left_the_group_with_setsid_is_killed_too(
        programs: dict[str, str], work: Path) -> None:
    out = codec(programs, work).open_text(b"escape\n" + SECRET)
    assert out == b"OUT:escape\n" + SECRET
    [seen] = reports(programs)
    try:
        assert gone(seen["child"])
        time.sleep(0.1)  # a child still running would have written its leak again by now
        assert list(work.iterdir()) == []
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(seen["child"], signal.SIGKILL)  # not left behind by a failing run


def test_program_killed_by_a_signal_defers(programs: dict[str, str], work: Path) -> None:
    with pytest.raises(TemporaryFailure) as caught:
        codec(programs, work).open_text(b"signal\n" + SECRET)
    assert "signal 9" in caught.value.detail
    assert list(work.iterdir()) == []


def test_without_pidfd_the_program_is_still_waited_for_and_killed(
        programs: dict[str, str], work: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def unavailable(pid: int, flags: int = 0) -> int:
        raise OSError(38, "Function not implemented")

    monkeypatch.setattr(external.os, "pidfd_open", unavailable)
    assert codec(programs, work).open_text(b"ok\n" + SECRET) == b"OUT:ok\n" + SECRET
    with pytest.raises(TemporaryFailure):
        codec(programs, work, timeout=1.5).open_text(b"hang\n" + SECRET)
    assert gone(reports(programs)[-1]["child"])
    assert list(work.iterdir()) == []


def test_environment_is_minimal_and_stdin_is_empty(
        programs: dict[str, str], work: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PASSERELLE_SPOOL_KEY", "do-not-leak")
    codec(programs, work).open_text(b"ok\n")
    [seen] = reports(programs)
    assert set(seen["env"]) == {"PATH", "LC_ALL", "TMPDIR"}
    assert seen["stdin"] == ""


# -- outcomes -------------------------------------------------------------------------------


def test_output_of_a_failed_program_is_discarded_unread(
        programs: dict[str, str], work: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    read: list[Path] = []
    real = external._read_output
    monkeypatch.setattr(external, "_read_output", lambda target: read.append(target) or real(target))
    with pytest.raises(PermanentFailure) as caught:
        codec(programs, work).open_text(b"fail-after-output\n" + SECRET)
    assert read == []
    assert caught.value.enhanced == "5.7.5" and caught.value.reason is Reason.DECRYPTION_FAILED
    assert "exit 1" in caught.value.detail and "key missing" in caught.value.detail
    no_plaintext(caught.value)
    assert list(work.iterdir()) == []


def test_success_without_output_bounces(programs: dict[str, str], work: Path) -> None:
    with pytest.raises(PermanentFailure) as caught:
        codec(programs, work).seal_text(b"no-output\n" + SECRET, ["dr@medecin.fr"])
    assert caught.value.reason is Reason.WRAP_FAILED and "without output" in caught.value.detail


def test_output_over_the_limit_bounces(programs: dict[str, str], work: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(external, "_MAX_OUTPUT", 16)
    with pytest.raises(PermanentFailure) as caught:
        codec(programs, work).open_text(b"ok\n" + SECRET)
    assert caught.value.enhanced == "5.3.4"
    assert list(work.iterdir()) == []


def test_missing_or_non_executable_program_defers(programs: dict[str, str], work: Path) -> None:
    Path(programs["apiuncrypt"]).chmod(0o600)
    for broken in (programs, {**programs, "apiuncrypt": str(work / "absent")}, {}):
        with pytest.raises(TemporaryFailure) as caught:
            codec(broken, work).open_text(b"ok\n" + SECRET)
        assert caught.value.enhanced == "4.3.5"
    assert list(work.iterdir()) == []


# -- arguments ------------------------------------------------------------------------------


def test_shell_metacharacters_in_recipient_are_passed_literally(
        programs: dict[str, str], work: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    hostile = "a;touch${IFS}pwned;$(touch${IFS}pwned2)`touch${IFS}pwned3`|b&c>d'e\"f*@medecin.fr"
    codec(programs, work).seal_text(b"ok\n" + SECRET, [hostile, "dr@medecin.fr"])
    [seen] = reports(programs)
    assert seen["argv"][-2:] == ["-d", hostile + ",dr@medecin.fr"]
    assert seen["argv"][:4] == ["-s", seen["directory"] + "/source",
                                "-o", seen["directory"] + "/target"]
    assert not [p for p in tmp_path.rglob("pwned*")]


def test_recipient_that_would_change_the_command_line_is_refused(
        programs: dict[str, str], work: Path) -> None:
    for hostile in ("evil@attacker.test,dr@medecin.fr", "-k/tmp/keys@medecin.fr",
                    "dr@medecin.fr -k /tmp", "dr@medecin.fr\n", ""):
        with pytest.raises(PermanentFailure) as caught:
            codec(programs, work).seal_attachment(b"ok\n" + SECRET, [hostile])
        assert caught.value.reason is Reason.WRAP_FAILED
    assert reports(programs) == []


def test_relative_program_path_is_not_looked_up_in_the_private_directory(
        programs: dict[str, str], work: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = Path(programs["apicrypt"]).parent
    monkeypatch.chdir(folder)
    relative = {name: os.path.relpath(path) for name, path in programs.items()}
    assert codec(relative, work).open_text(b"ok\n") == b"OUT:ok\n"
    assert stat.S_IMODE(work.stat().st_mode) == 0o700
