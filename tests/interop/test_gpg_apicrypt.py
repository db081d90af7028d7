"""The Apicrypt layout with the `openpgp` codec against GnuPG 2.2 as the Apicrypt user's side.

Outbound: the user decrypts the text block and the `.apz` attachment with gpg and their own
key and finds the original bytes, with a good signature by the gateway. Inbound: a gpg user
sends an HPRIM report (ISO-8859-1, v1) as one signed+encrypted text block plus an `.apz`
attachment, gpg's defaults (compressed); the hospital gets the text and file in clear.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest

from adapters.apicrypt import ApicryptAdapter
from adapters.base import (
    Directory,
    Identity,
    TrustStore,
    UnwrapContext,
    Unwrapped,
    Verdict,
    WrapContext,
)
from adapters.cms.entity import decode_body, multipart_parts, parse_entity
from adapters.pgpkeys import generate_identity
from tests.support.gpg import Gpg, gpg_available
from tests.unit.test_apicrypt import HPRIM, PDF, hospital_message

pytestmark = [
    pytest.mark.interop,
    pytest.mark.skipif(not gpg_available(), reason="gpg is not installed"),
]

GATEWAY = "gw@passerelle.test"
USER = "dr.martin@medecin.apicrypt.org"
NOW = datetime.now(UTC)
ADAPTER = ApicryptAdapter()


@pytest.fixture(scope="module")
def world() -> Iterator[tuple[Gpg, bytes, str]]:
    gpg = Gpg()
    secret = generate_identity(f"Passerelle <{GATEWAY}>", created=NOW - timedelta(days=1))
    gpg.import_key(secret)
    user = gpg.generate(f"Dr Martin <{USER}>", algo="rsa2048")
    yield gpg, secret, user
    gpg.close()


def parts_of(raw: bytes) -> list[tuple[str | None, bytes]]:
    entity = parse_entity(raw)
    _, params = entity.content_type()
    _, parts, _ = multipart_parts(entity.body, params["boundary"])
    out: list[tuple[str | None, bytes]] = []
    for part in parts:
        leaf = parse_entity(part)
        out.append((leaf.content_type()[1].get("name"), decode_body(leaf)))
    return out


def test_user_decrypts_text_and_apz_with_gpg(world: tuple[Gpg, bytes, str]) -> None:
    gpg, secret, user = world
    context = WrapContext(
        "apicrypt", Identity("gw", openpgp_secret=secret), TrustStore(),
        Directory(openpgp=(gpg.export_public(user),)), NOW, "secretariat@chu.test", (USER,),
        options={"codec": "openpgp", "version": 1},
    )
    wrapped = ADAPTER.wrap(Unwrapped(hospital_message(HPRIM), Verdict.unsigned(), "mime"),
                           context)
    (_, text_block), (name, apz) = parts_of(wrapped.content)
    assert name == "cr.pdf.apz"
    for sealed, original in ((text_block, HPRIM), (apz, PDF)):
        done = gpg.run("--decrypt", input=sealed)
        assert done.has("DECRYPTION_OKAY") and done.has("GOODSIG"), done.stderr
        assert wrapped.signer_key and wrapped.signer_key in str(done.line("VALIDSIG"))
        assert done.output == original


def test_gpg_user_sends_hprim_report(world: tuple[Gpg, bytes, str]) -> None:
    gpg, secret, user = world
    text = gpg.run("--armor", "--sign", "--encrypt", "-r", GATEWAY, "-u", user, input=HPRIM,
                   check=True).output
    apz = gpg.run("--sign", "--encrypt", "-r", GATEWAY, "-u", user, input=PDF,
                  check=True).output
    raw = (
        b"From: <" + USER.encode() + b">\r\nTo: <patient-file@chu.test>\r\n"
        b"Subject: Resultats\r\nMIME-Version: 1.0\r\n"
        b'Content-Type: multipart/mixed; boundary="A"\r\n\r\n'
        b"--A\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n" + text + b"\r\n"
        b'--A\r\nContent-Type: application/octet-stream; name="cr.pdf.apz"\r\n'
        b'Content-Disposition: attachment; filename="cr.pdf.apz"\r\n'
        b"Content-Transfer-Encoding: base64\r\n\r\n" + base64.encodebytes(apz) + b"\r\n--A--\r\n"
    )
    context = UnwrapContext(
        "apicrypt", Identity("gw", openpgp_secret=secret), TrustStore(),
        Directory(openpgp=(gpg.export_public(user),)), NOW, options={"version": 1},
    )
    unwrapped = ADAPTER.unwrap(raw, context)
    assert unwrapped.encrypted
    assert unwrapped.signature.result == "pass" and unwrapped.signature.signer == USER
    assert parts_of(unwrapped.content) == [(None, HPRIM), ("cr.pdf", PDF)]
    assert b"Subject: Resultats" in unwrapped.content
