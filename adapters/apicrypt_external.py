"""The `external` Apicrypt codec: the licensed APICEM programs, run as they are documented.

    apicrypt     -s SRC -o DST -u USER -k KEYDIR -d RECIPIENTS   text body
    apiuncrypt   -s SRC -o DST -k KEYDIR                         text body
    apicryptpj   -s SRC -o DST -u USER -k KEYDIR -d RECIPIENTS   attachment (.apz)
    apiuncryptpj -s SRC -o DST -k KEYDIR                         attachment

The proprietary cipher is never re-implemented: this module only runs the configured programs.

Adapters are sans-I/O; this codec is the one exception, because the programs work on files and
run as processes. The exception stays inside `ExternalCodec`: the layout code in
`adapters.apicrypt` hands it bytes and gets bytes back, like the built-in codec. Each run:

- a private directory from `mkdtemp` (random name, mode 0700) under `work_directory`, or the
  system temporary directory (`TMPDIR`) when none is given; a base that other users could write
  to (group/other-writable without the sticky bit, or owned by someone else) is refused. SRC and
  the program's messages are created there with O_EXCL and mode 0600; the program runs with
  umask 077, that directory as working directory and as TMPDIR, so what it writes is private
  and is wiped with the rest;
- no shell: arguments are passed as they are (recipients comma-separated in one argument, so a
  recipient that holds a comma, white space or a leading `-` is refused before anything runs);
  stdin is /dev/null, the environment is only PATH, LC_ALL and TMPDIR;
- its own process group and a timeout. When the program exits, or when the timeout strikes, or
  when anything here raises, the whole group is killed (SIGKILL) before the program is reaped,
  so a child it forked cannot go on writing plaintext and the group id cannot have been reused.
  A child that left the group with setsid() is found by what it still holds in the private
  directory (its working directory, an open file) and killed too; one that also moved out
  and closed its files would escape (only a cgroup contains that; the APICEM programs do
  neither);
- the directory is wiped whatever happened: each regular file overwritten with zeros and
  synced, then everything removed; links are removed, never followed. If anything is left the
  run fails (temporary), so plaintext on disk is never silent.

Outcomes. Output is read only when the program exited 0 and DST is a regular file of at most
64 MiB; otherwise it is discarded unread. Temporary (4xx, retried; the sender did nothing
wrong): program missing or not executable, unsafe or unusable temporary directory, timeout,
program killed by a signal, files left behind. Permanent (5xx, DSN): the program exited
non-zero (it refuses the input or lacks a key), exited 0 without output, output too large, a
recipient that cannot be passed safely.

Even in a private directory, plaintext is on disk while a program runs: point `work_directory`
(or TMPDIR) at a memory file system (tmpfs) to keep it off persistent storage; overwriting is a
best effort on journaling or copy-on-write file systems.

Untrusted input: the data handed in (from peers), recipients, and whatever the programs write.
"""

from __future__ import annotations

import math
import os
import select
import shutil
import signal
import stat
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from gateway.errors import PermanentFailure, Reason, TemporaryFailure

__all__ = ["PROGRAMS", "ExternalCodec"]

PROGRAMS = ("apicrypt", "apiuncrypt", "apicryptpj", "apiuncryptpj")
_MAX_OUTPUT = 64 * 1024 * 1024
_MAX_MESSAGES = 300  # octets of the program's own messages kept for the operator
_REAP_GRACE = 5.0  # seconds to wait for a killed program to be reaped
_CHUNK = 1024 * 1024
_NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
_EXISTING = os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)


def _unsafe_base(base: str) -> str | None:
    """Why a base directory would let another user tamper with our private directory."""
    try:
        info = os.stat(base)
    except OSError as error:
        return f"{base}: {error.strerror}"
    if not stat.S_ISDIR(info.st_mode):
        return f"{base} is not a directory"
    if info.st_mode & 0o022 and not info.st_mode & stat.S_ISVTX:
        return f"{base} is writable by other users and has no sticky bit"
    if info.st_uid not in (0, os.geteuid()):
        return f"{base} belongs to another user (uid {info.st_uid})"
    return None


def _overwrite(path: str) -> None:
    """Zeros over a regular file's contents, synced. Anything else, and a file with other
    links (it would be someone else's file too), is left to be unlinked only."""
    try:
        info = os.lstat(path)
        if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:
            return
        if not info.st_mode & stat.S_IWUSR:
            os.chmod(path, 0o600)
        handle = os.open(path, os.O_WRONLY | _EXISTING)
    except OSError:
        return
    try:
        opened = os.fstat(handle)
        if (opened.st_dev, opened.st_ino) != (info.st_dev, info.st_ino) or opened.st_nlink != 1:
            return
        zeros = bytes(min(opened.st_size, _CHUNK))
        written = 0
        while written < opened.st_size:
            written += os.write(handle, zeros[: opened.st_size - written])
        os.fsync(handle)
    except OSError:
        pass
    finally:
        os.close(handle)


def _wipe(directory: Path) -> bool:
    """Overwrite and remove `directory` and all below it; True when nothing is left."""
    try:
        os.chmod(directory, 0o700)
    except OSError:
        pass
    for root, folders, files in os.walk(directory, followlinks=False):
        for folder in folders:
            path = os.path.join(root, folder)
            try:
                # A program may have taken its own rights away; we need them to wipe below.
                if stat.S_ISDIR(os.lstat(path).st_mode):
                    os.chmod(path, 0o700)
            except OSError:
                pass
        for name in files:
            _overwrite(os.path.join(root, name))
    shutil.rmtree(directory, ignore_errors=True)
    return not os.path.lexists(directory)


def _exited_within(pid: int, timeout: float) -> bool:
    """Wait for the program to exit *without reaping it*: until it is reaped, its pid (which
    is also its process group id) cannot be given to another process, so killing the group
    afterwards can only hit what the program left behind."""
    try:
        descriptor = os.pidfd_open(pid)
    except (AttributeError, OSError):
        descriptor = None
    if descriptor is not None:
        try:
            poller = select.poll()
            poller.register(descriptor, select.POLLIN)
            return bool(poller.poll(math.ceil(timeout * 1000)))
        finally:
            os.close(descriptor)
    # Kernels or platforms without pidfd: poll, still without reaping.
    deadline = time.monotonic() + timeout
    while os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT | os.WNOHANG) is None:
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.01)
    return True


def _kill_group(process: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        process.wait(timeout=_REAP_GRACE)
    except subprocess.TimeoutExpired:
        pass  # stuck in the kernel; the SIGKILL will take it when it returns


def _kill_strays(directory: Path) -> None:
    """SIGKILL every process of ours still working in `directory` (its working directory or
    an open file there): a child that left the program's group with setsid() escapes
    `_kill_group`, but not this, unless it also moved out and closed its files. The directory
    is private and freshly made, so only the program's descendants can be in it. Waits a
    bounded while for them to be gone, so that none writes there after the wipe has begun."""
    inside = os.fspath(directory)
    marked = inside + os.sep
    strays = []
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            links = [os.readlink(f"/proc/{entry}/cwd")]
            fds = f"/proc/{entry}/fd"
            links += [os.readlink(f"{fds}/{fd}") for fd in os.listdir(fds)]
        except OSError:
            continue  # gone, or another user's: not one of the program's
        if any(link == inside or link.startswith(marked) for link in links):
            strays.append(int(entry))
    for pid in strays:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    deadline = time.monotonic() + _REAP_GRACE
    while strays and time.monotonic() < deadline:
        strays = [pid for pid in strays if _running(pid)]
        if strays:
            time.sleep(0.01)


def _running(pid: int) -> bool:
    """Whether `pid` still runs (neither gone nor a zombie waiting for its parent)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            return handle.read().rsplit(b")", 1)[1].split()[0] not in (b"Z", b"X")
    except (OSError, IndexError):
        return False


def _read_output(target: Path) -> bytes | None:
    """DST if it is a regular file no larger than the limit; None if it is not there."""
    try:
        handle = os.open(target, os.O_RDONLY | _EXISTING)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(handle).st_mode):
            return None
        chunks: list[bytes] = []
        size = 0
        while size <= _MAX_OUTPUT:
            chunk = os.read(handle, min(_CHUNK, _MAX_OUTPUT + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        return b"".join(chunks)
    finally:
        os.close(handle)


def _temporary(name: str, reason: Reason, advice: str, detail: str,
               enhanced: str = "4.3.0") -> TemporaryFailure:
    return TemporaryFailure(f"{advice}; the message will be retried", enhanced=enhanced,
                            reason=reason, detail=f"apicrypt external: {name}: {detail}")


def _messages(path: Path) -> str:
    """The start of what the program printed, on one line, for the operator."""
    try:
        handle = os.open(path, os.O_RDONLY | _EXISTING)
    except OSError:
        return ""
    try:
        text = os.read(handle, _MAX_MESSAGES).decode("utf-8", "replace")
    except OSError:
        return ""
    finally:
        os.close(handle)
    return " ".join("".join(c if c.isprintable() else " " for c in text).split())


@dataclass(frozen=True)
class ExternalCodec:
    programs: Mapping[str, str]
    user: str
    key_directory: str
    timeout: float = 30.0
    work_directory: str | None = None  # base of the private directories; None: TMPDIR

    def seal_text(self, data: bytes, recipients: Sequence[str]) -> bytes:
        return self._run("apicrypt", data, self._sealing(recipients), sealing=True)

    def open_text(self, data: bytes) -> bytes:
        return self._run("apiuncrypt", data, ["-k", self.key_directory], sealing=False)

    def seal_attachment(self, data: bytes, recipients: Sequence[str]) -> bytes:
        return self._run("apicryptpj", data, self._sealing(recipients), sealing=True)

    def open_attachment(self, data: bytes) -> bytes:
        return self._run("apiuncryptpj", data, ["-k", self.key_directory], sealing=False)

    def _sealing(self, recipients: Sequence[str]) -> list[str]:
        for address in recipients:
            # One argument holds them all, split on commas by the program: an address with a
            # comma would add a recipient, one starting with "-" could read as an option.
            if (not address or address.startswith("-") or "@" not in address
                    or any(c == "," or not c.isprintable() or c.isspace() for c in address)):
                raise PermanentFailure(
                    "This recipient address cannot be passed to the Apicrypt program",
                    enhanced="5.1.3", reason=Reason.WRAP_FAILED,
                    detail=f"apicrypt external: recipient {address!r} refused",
                )
        return ["-u", self.user, "-k", self.key_directory, "-d", ",".join(recipients)]

    def _run(self, name: str, data: bytes, extra: list[str], *, sealing: bool) -> bytes:
        reason = Reason.WRAP_FAILED if sealing else Reason.DECRYPTION_FAILED
        program = self.programs.get(name)
        if not program or not os.path.isfile(program) or not os.access(program, os.X_OK):
            raise _temporary(name, reason, "The gateway's Apicrypt programs are not available",
                             f"program not found or not executable at {program!r}", "4.3.5")
        if not (self.timeout > 0 and math.isfinite(self.timeout)):
            raise _temporary(name, reason, "The gateway's Apicrypt programs are misconfigured",
                             f"timeout {self.timeout!r} is not a positive number of seconds",
                             "4.3.5")
        base = self.work_directory or tempfile.gettempdir()
        problem = _unsafe_base(base)
        if problem:
            raise _temporary(name, reason, "The gateway cannot run its Apicrypt programs safely",
                             f"temporary directory refused: {problem}", "4.3.5")
        try:
            directory = Path(tempfile.mkdtemp(prefix="apicrypt-", dir=base))
        except OSError as error:
            raise _temporary(name, reason, "The gateway cannot run its Apicrypt programs now",
                             f"cannot create a private directory in {base}: {error}") from None
        left = "The gateway could not remove the Apicrypt program's temporary files"
        try:
            output = self._execute(name, reason, os.path.abspath(program), directory, data,
                                   extra, sealing=sealing)
        except Exception as error:
            if not _wipe(directory):
                raise _temporary(name, reason, left,
                                 f"files left in {directory} after {error!r}") from error
            raise
        except BaseException:
            _wipe(directory)  # cancellation and exit go on as they are, never as a failure
            raise
        if not _wipe(directory):
            raise _temporary(name, reason, left, f"files left in {directory}")
        return output

    def _execute(self, name: str, reason: Reason, program: str, directory: Path, data: bytes,
                 extra: list[str], *, sealing: bool) -> bytes:
        source, target, log = directory / "source", directory / "target", directory / "messages"
        handle = os.open(source, _NEW_FILE, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(handle, view):]
        finally:
            os.close(handle)
        messages = os.open(log, _NEW_FILE, 0o600)
        try:
            process = subprocess.Popen(
                [program, "-s", str(source), "-o", str(target), *extra],
                stdin=subprocess.DEVNULL, stdout=messages, stderr=messages,
                env={"PATH": "/usr/bin:/bin", "LC_ALL": "C", "TMPDIR": str(directory)},
                cwd=directory, start_new_session=True, umask=0o077, close_fds=True,
            )
        except OSError as error:
            raise _temporary(name, reason, "The gateway's Apicrypt programs could not be "
                             "started", str(error), "4.3.5") from None
        finally:
            os.close(messages)
        try:
            exited = _exited_within(process.pid, self.timeout)
        finally:
            _kill_group(process)  # whatever it left running goes, before anything is read
            _kill_strays(directory)
        if not exited:
            raise _temporary(name, reason, "The Apicrypt program did not answer in time",
                             f"timed out after {self.timeout}s; its process group was killed")
        code = process.returncode
        if code is None or code < 0:
            raise _temporary(name, reason, "The Apicrypt program stopped unexpectedly",
                             f"killed by signal {-(code or 0)}: {_messages(log)}")
        output = _read_output(target) if code == 0 else None  # never read after a failure
        if output is None:
            raise PermanentFailure(
                "The Apicrypt program could not encrypt the message for this recipient"
                if sealing else
                "The Apicrypt message could not be decrypted with the gateway's key",
                enhanced="5.7.5", reason=reason,
                detail=f"apicrypt external: {name} exit {code}"
                       f"{'' if code else ' without output'}: {_messages(log)}",
            )
        if len(output) > _MAX_OUTPUT:
            raise PermanentFailure(
                "The Apicrypt program produced an output that is too large",
                enhanced="5.3.4", reason=reason,
                detail=f"apicrypt external: {name} output over {_MAX_OUTPUT} octets",
            )
        return output
