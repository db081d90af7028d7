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
from tests.support.gpg import Gpg
from tests.unit.test_apicrypt import HPRIM, PDF, hospital_message

pytestmark = [
    pytest.mark.interop,
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


GPG_FORMS = {
    "cleartext": ("--clearsign",),
    "signed": ("--armor", "--sign"),
    "encrypted": ("--armor", "--encrypt", "-r", GATEWAY),
    "signed+encrypted": ("--armor", "--sign", "--encrypt", "-r", GATEWAY),
}


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("line_end", ["lf", "crlf"])
@pytest.mark.parametrize("form", list(GPG_FORMS))
def test_gpg_inline_hprim_reaches_the_hospital_as_gpg_decrypts_it(
    world: tuple[Gpg, bytes, str], form: str, line_end: str, version: int,
) -> None:
    """Every inline form gpg writes, with its defaults: the text part the hospital gets holds
    exactly what `gpg --decrypt` prints for the block (the GP's text), under the network's
    charset label."""
    gpg, secret, user = world
    written = HPRIM if version == 1 else HPRIM.decode("latin-1").encode("utf-8")
    if line_end == "crlf":
        written = written.replace(b"\n", b"\r\n")
    block = gpg.run(*GPG_FORMS[form], "-u", user, input=written, check=True).output
    # The body as the GP's client sends it: base64 when its lines end in bare LF.
    body = (b"Content-Transfer-Encoding: base64\r\n\r\n" + base64.encodebytes(block)
            if line_end == "lf" else b"Content-Transfer-Encoding: 8bit\r\n\r\n"
            + block.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n"))
    raw = (b"From: <" + USER.encode() + b">\r\nTo: <patient-file@chu.test>\r\n"
           b"Subject: Resultats\r\nMIME-Version: 1.0\r\n"
           b"Content-Type: text/plain; charset=us-ascii\r\n" + body)
    context = UnwrapContext(
        "apicrypt", Identity("gw", openpgp_secret=secret), TrustStore(),
        Directory(openpgp=(gpg.export_public(user),)), NOW, options={"version": version},
    )
    unwrapped = ADAPTER.unwrap(raw, context)
    assert unwrapped.encrypted == form.endswith("encrypted")
    assert unwrapped.signature.result == ("none" if form == "encrypted" else "pass")
    entity = parse_entity(unwrapped.content)
    assert entity.content_type() == (
        "text/plain", {"charset": "iso-8859-1" if version == 1 else "utf-8"})
    assert decode_body(entity) == written
    assert gpg.run("--decrypt", input=block).output == written
