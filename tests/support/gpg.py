"""Drive GnuPG (the independent OpenPGP peer in interop tests) in a throw-away home directory.

Each `Gpg` owns a private GNUPGHOME (mode 0700) under a temporary directory; nothing touches
the user's keyring. Every call runs gpg with --batch and no shell; `--status-fd` lines are
returned so tests look at DECRYPTION_OKAY / GOODSIG / VALIDSIG, never at whether output exists
(gpg writes plaintext before it reports a failed integrity check).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

__all__ = ["GPG", "Gpg", "GpgResult", "gpg_available"]

GPG = shutil.which("gpg") or "/usr/bin/gpg"


def gpg_available() -> bool:
    return os.path.exists(GPG)


@dataclass(frozen=True)
class GpgResult:
    returncode: int
    output: bytes
    status: tuple[str, ...]  # "[GNUPG:] " lines without the prefix
    stderr: str

    def has(self, keyword: str) -> bool:
        return any(line.split(" ", 1)[0] == keyword for line in self.status)

    def line(self, keyword: str) -> str | None:
        for line in self.status:
            if line.split(" ", 1)[0] == keyword:
                return line
        return None


class Gpg:
    def __init__(self, root: Path | None = None) -> None:
        self._owned = root is None
        base = Path(root) if root is not None else Path(tempfile.mkdtemp(prefix="gpgtest-"))
        self.home = base / "gnupg"
        self.home.mkdir(mode=0o700, parents=True, exist_ok=True)
        (self.home / "gpg.conf").write_text("no-auto-key-retrieve\n")
        self.base = base

    def run(
        self, *args: str, input: bytes | None = None, passphrase: str | None = None,
        check: bool = False,
    ) -> GpgResult:
        command = [GPG, "--homedir", str(self.home), "--batch", "--yes", "--no-tty",
                   "--trust-model", "always", "--status-fd", "2"]
        if passphrase is not None:
            command += ["--pinentry-mode", "loopback", "--passphrase", passphrase]
        command += list(args)
        done = subprocess.run(
            command, input=input, capture_output=True, timeout=60,
            env={**os.environ, "GNUPGHOME": str(self.home), "LC_ALL": "C"},
        )
        text = done.stderr.decode("utf-8", "replace")
        status = tuple(
            line[len("[GNUPG:] "):] for line in text.splitlines() if line.startswith("[GNUPG:] ")
        )
        result = GpgResult(done.returncode, done.stdout, status, text)
        if check and done.returncode != 0:
            raise AssertionError(f"gpg {' '.join(args)} failed: {text}")
        return result

    def import_key(self, data: bytes, passphrase: str | None = None) -> GpgResult:
        return self.run("--import", input=data, passphrase=passphrase, check=True)

    def export_public(self, who: str) -> bytes:
        return self.run("--armor", "--export", who, check=True).output

    def export_secret(self, who: str, passphrase: str | None = None) -> bytes:
        return self.run("--armor", "--export-secret-keys", who, passphrase=passphrase,
                        check=True).output

    def generate(self, user_id: str, algo: str = "future-default") -> str:
        """A new key without passphrase (ed25519 + cv25519 by default, or "rsa3072"); its fpr."""
        self.run("--passphrase", "", "--pinentry-mode", "loopback", "--quick-gen-key",
                 user_id, algo, "default", "never", check=True)
        listing = self.run("--with-colons", "--list-keys", user_id, check=True)
        for line in listing.output.decode().splitlines():
            if line.startswith("fpr:"):
                fingerprint = line.split(":")[9]
                if algo.startswith("rsa"):
                    # An RSA primary key alone only signs: add the encryption subkey.
                    self.run("--passphrase", "", "--pinentry-mode", "loopback",
                             "--quick-add-key", fingerprint, algo, "encr", "never", check=True)
                return fingerprint
        raise AssertionError("no fingerprint for the generated key")

    def unprotect(self, who: str, passphrase: str) -> None:
        """Remove the passphrase of an imported secret key (for tests that need it clear)."""
        self.run(
            "--pinentry-mode", "loopback", "--command-fd", "0", "--passwd", who,
            input=f"{passphrase}\n\n\n".encode(), check=False,
        )

    def close(self) -> None:
        """Stop this home's gpg-agent (started on demand) and remove the home."""
        gpgconf = shutil.which("gpgconf")
        if gpgconf:
            subprocess.run([gpgconf, "--homedir", str(self.home), "--kill", "gpg-agent"],
                           capture_output=True, timeout=30, check=False)
        if self._owned:
            shutil.rmtree(self.base, ignore_errors=True)
