"""The per-message command-line filter: the architecture of the Python mail-encryption gateways
in use today (an SMTP content filter that runs `openssl cms` / `gpg` as one process per step
and per message). It is the translation routes' baseline: same load generator, same sink.

`python -m bench.filter ROUTE SITE LISTEN_PORT SINK_PORT`, ROUTE being
- smime-to-apicrypt: openssl cms -decrypt, openssl cms -verify, gpg --sign --encrypt;
- apicrypt-to-smime: gpg --decrypt (verifies), openssl cms -sign, openssl cms -encrypt.
The result is relayed to the sink before the 250 (an in-line filter keeps no queue), so its
acceptance rate is its end-to-end rate. Like the gateway, it refuses what does not verify.
"""

from __future__ import annotations

import asyncio
import os
import re
import sys
from pathlib import Path

import aiosmtplib
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session

_PGP = re.compile(rb"-----BEGIN PGP MESSAGE-----.*?-----END PGP MESSAGE-----", re.DOTALL)


async def run(*command: str | Path, data: bytes, env: dict[str, str] | None = None) -> bytes:
    process = await asyncio.create_subprocess_exec(
        *map(str, command), stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, env=env)
    out, err = await process.communicate(data)
    if process.returncode != 0:
        raise RuntimeError(f"{command[0]} {command[1]}: {err.decode(errors='replace')[:200]}")
    return out


class Filter:
    def __init__(self, route: str, site: Path, sink_port: int) -> None:
        self.route = route
        self.pki, self.work = site / "pki", site / "work"
        self.sink_port = sink_port
        self.gpg = ["gpg", "--homedir", str(site / "work" / "gnupg"), "--batch", "--yes",
                    "--no-tty", "--trust-model", "always"]
        self.env = {**os.environ, "LC_ALL": "C"}

    async def smime_to_apicrypt(self, raw: bytes, recipients: list[str]) -> bytes:
        signed = await run("openssl", "cms", "-decrypt", "-recip", self.pki / "medecin.pem",
                           "-inkey", self.pki / "medecin.key", data=raw)
        content = await run("openssl", "cms", "-verify", "-CAfile", self.pki / "ca.pem",
                            data=signed)
        head, _, body = content.replace(b"\r\n", b"\n").partition(b"\n\n")
        targets = [arg for r in recipients for arg in ("-r", r)]
        sealed = await run(*self.gpg, "--armor", "--sign", "--encrypt", "-u",
                           "passerelle@apicrypt-test.org", *targets, data=body, env=self.env)
        return head.replace(b"\n", b"\r\n") + b"\r\n\r\n" + sealed.replace(b"\n", b"\r\n")

    async def apicrypt_to_smime(self, raw: bytes, recipients: list[str]) -> bytes:
        block = _PGP.search(raw)
        if block is None:
            raise RuntimeError("no OpenPGP block")
        plain = await run(*self.gpg, "--decrypt", data=block.group(0), env=self.env)
        entity = (b"Content-Type: text/plain; charset=iso-8859-1\r\n"
                  b"Content-Transfer-Encoding: quoted-printable\r\n\r\n" + plain)
        signed = await run("openssl", "cms", "-sign", "-signer", self.pki / "medecin.pem",
                           "-inkey", self.pki / "medecin.key", "-md", "sha256", data=entity)
        certificates = [self.work / f"{r.split('@')[0]}.pem" for r in recipients]
        return await run("openssl", "cms", "-encrypt", "-aes-256-cbc", *certificates,
                         data=signed)

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        raw = envelope.original_content or b""
        try:
            if self.route == "smime-to-apicrypt":
                out = await self.smime_to_apicrypt(raw, list(envelope.rcpt_tos))
            else:
                out = await self.apicrypt_to_smime(raw, list(envelope.rcpt_tos))
            await aiosmtplib.send(out, sender=envelope.mail_from,
                                  recipients=list(envelope.rcpt_tos), hostname="127.0.0.1",
                                  port=self.sink_port, start_tls=False, use_tls=False,
                                  timeout=300)
        except Exception as error:  # refused, never passed on unverified
            return f"554 5.7.0 filter failed: {str(error)[:100]}"
        return "250 2.0.0 OK filtered"


def main() -> None:
    route, site, listen, sink = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    controller = Controller(Filter(route, site, sink), hostname="127.0.0.1", port=listen,
                            decode_data=False, data_size_limit=64 * 1024 * 1024)
    controller.start()
    print("ready", flush=True)
    try:
        sys.stdin.read()  # runs until the benchmark closes our stdin
    finally:
        controller.stop()


if __name__ == "__main__":
    main()
