"""The `external` Apicrypt codec: the licensed APICEM programs, run as they are documented.

    apicrypt     -s SRC -o DST -u USER -k KEYDIR -d RECIPIENTS   text body
    apiuncrypt   -s SRC -o DST -k KEYDIR                         text body
    apicryptpj   -s SRC -o DST -u USER -k KEYDIR -d RECIPIENTS   attachment (.apz)
    apiuncryptpj -s SRC -o DST -k KEYDIR                         attachment

The proprietary cipher is never re-implemented: this module only runs the configured programs.
It is the one part of the adapters that does I/O, kept here behind `ExternalCodec` so the
rest stays sans-I/O. Each run: a private directory (mode 0700) for SRC and DST, no shell, a
minimal environment, stdin closed, a timeout; the directory is overwritten and removed
whatever happens, and no output is returned unless the program exited 0 and wrote DST.
Recipients are passed as one argument, comma-separated.

The programs work on files, so plaintext exists on disk while one runs: point TMPDIR at a
memory file system (tmpfs) on the gateway host to keep it off persistent storage.

Untrusted input: the data handed in (from peers) and whatever the programs write.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from gateway.errors import PermanentFailure, Reason, TemporaryFailure

__all__ = ["PROGRAMS", "ExternalCodec"]

PROGRAMS = ("apicrypt", "apiuncrypt", "apicryptpj", "apiuncryptpj")
_MAX_OUTPUT = 64 * 1024 * 1024


def _wipe(directory: Path) -> None:
    # Overwrite before unlinking: a best effort, as journaling file systems may keep copies.
    for path in directory.rglob("*"):
        with contextlib.suppress(OSError):
            if path.is_file():
                size = path.stat().st_size
                with path.open("r+b") as handle:
                    handle.write(b"\0" * size)
    shutil.rmtree(directory, ignore_errors=True)


@dataclass(frozen=True)
class ExternalCodec:
    programs: Mapping[str, str]
    user: str
    key_directory: str
    timeout: float = 30.0

    def seal_text(self, data: bytes, recipients: Sequence[str]) -> bytes:
        return self._run("apicrypt", data, self._sealing(recipients), sealing=True)

    def open_text(self, data: bytes) -> bytes:
        return self._run("apiuncrypt", data, ["-k", self.key_directory], sealing=False)

    def seal_attachment(self, data: bytes, recipients: Sequence[str]) -> bytes:
        return self._run("apicryptpj", data, self._sealing(recipients), sealing=True)

    def open_attachment(self, data: bytes) -> bytes:
        return self._run("apiuncryptpj", data, ["-k", self.key_directory], sealing=False)

    def _sealing(self, recipients: Sequence[str]) -> list[str]:
        return ["-u", self.user, "-k", self.key_directory, "-d", ",".join(recipients)]

    def _run(self, name: str, data: bytes, extra: list[str], *, sealing: bool) -> bytes:
        program = self.programs.get(name)
        reason = Reason.WRAP_FAILED if sealing else Reason.DECRYPTION_FAILED
        if not program or not os.path.isfile(program):
            raise TemporaryFailure(
                "The gateway's Apicrypt programs are not available; the message will be "
                "retried", enhanced="4.3.5", reason=reason,
                detail=f"apicrypt external: program {name!r} not found at {program!r}",
            )
        directory = Path(tempfile.mkdtemp(prefix="apicrypt-"))
        try:
            directory.chmod(0o700)
            source, target = directory / "source", directory / "target"
            source.write_bytes(data)
            try:
                done = subprocess.run(
                    [program, "-s", str(source), "-o", str(target), *extra],
                    stdin=subprocess.DEVNULL, capture_output=True, timeout=self.timeout,
                    env={"PATH": "/usr/bin:/bin", "LC_ALL": "C"}, cwd=directory, check=False,
                )
            except subprocess.TimeoutExpired:
                raise TemporaryFailure(
                    "The Apicrypt program did not answer in time; the message will be retried",
                    enhanced="4.3.0", reason=reason,
                    detail=f"apicrypt external: {name} timed out after {self.timeout}s",
                ) from None
            except OSError as error:
                raise TemporaryFailure(
                    "The gateway's Apicrypt programs could not be started; the message will "
                    "be retried", enhanced="4.3.5", reason=reason,
                    detail=f"apicrypt external: {name}: {error}",
                ) from None
            if done.returncode != 0 or not target.is_file():
                stderr = done.stderr[:300].decode("utf-8", "replace").strip()
                raise PermanentFailure(
                    "The Apicrypt program could not encrypt the message for this recipient"
                    if sealing else
                    "The Apicrypt message could not be decrypted with the gateway's key",
                    enhanced="5.7.5", reason=reason,
                    detail=f"apicrypt external: {name} exit {done.returncode}: {stderr}",
                )
            if target.stat().st_size > _MAX_OUTPUT:
                raise PermanentFailure(
                    "The Apicrypt program produced an output that is too large",
                    enhanced="5.3.4", reason=reason,
                    detail=f"apicrypt external: {name} output over {_MAX_OUTPUT} octets",
                )
            return target.read_bytes()
        finally:
            _wipe(directory)
