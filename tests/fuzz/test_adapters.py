"""Each adapter's unwrap on mutated and random input (the untrusted side of every network).

Properties:
- only `GatewayError` escapes `unwrap` (the pipeline turns anything else into a bounce, but an
  adapter that crashes on hostile input is a bug, and a crash deep in a parser is where memory
  and time blow up);
- a mutated signed message never verifies as `pass` with content other than what was signed:
  when the verdict is still `pass`, the unwrapped content must equal the original's (modulo
  line endings and trailing blanks, which the signature formats canonicalise), i.e. the
  mutation only touched bytes outside the signature's scope (an unsigned preamble, a line
  break inside base64).

Seed corpus: tests/vectors/smime (made by openssl), the Thunderbird S/MIME and OpenPGP
messages in ../shared/data (read-only), an Apicrypt message made here by the adapter, and what
GnuPG makes for the interop tests (PGP/MIME signed, encrypted and both with its compressed
defaults, inline signed, clearsigned and encrypted), made here by gpg for the gateway's key.
Mutations touch the body only (after the first blank line): outer headers are not covered by
any of these signatures, so changing them is not a forgery.
"""

from __future__ import annotations

import datetime as dt
import functools
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pysequoia
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from hypothesis import assume, given
from hypothesis import strategies as st

from adapters.apicrypt import ApicryptAdapter
from adapters.base import (
    Adapter,
    Directory,
    Identity,
    TrustStore,
    UnwrapContext,
    Unwrapped,
    Verdict,
    WrapContext,
)
from adapters.mime import MimeAdapter
from adapters.openpgp import OpenPgpAdapter
from adapters.pgpkeys import generate_identity
from adapters.smime import SmimeAdapter
from gateway.errors import GatewayError
from tests.fuzz.conftest import FUZZ
from tests.support.gpg import Gpg

ROOT = Path(__file__).resolve().parents[2]
VECTORS = ROOT / "tests" / "vectors" / "smime"
SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"
NOW = dt.datetime(2026, 11, 23, 12, 0, tzinfo=dt.UTC)



@dataclass(frozen=True, eq=False)  # hashed by identity: the baseline is cached per seed
class Seed:
    name: str
    raw: bytes
    adapter: Adapter
    context: UnwrapContext


# -- seeds ---------------------------------------------------------------------------------


def smime_seeds() -> list[Seed]:
    anchor = x509.load_pem_x509_certificate((VECTORS / "ca.pem").read_bytes())
    gateway = x509.load_pem_x509_certificate((VECTORS / "gateway.pem").read_bytes())
    key = load_pem_private_key((VECTORS / "gateway.key").read_bytes(), password=None)
    context = UnwrapContext(
        network="medecin",
        identity=Identity(name="medecin-smime", certificate=gateway, private_key=key),
        trust=TrustStore(anchors=(anchor,)), directory=Directory(),
        now=gateway.not_valid_before_utc + dt.timedelta(hours=1),
    )
    seeds = [Seed(p.name, p.read_bytes(), SmimeAdapter(), context)
             for p in sorted(VECTORS.glob("*.eml"))]
    thunderbird = SHARED / "thunderbird-smime"
    if thunderbird.is_dir():
        test_ca = x509.load_pem_x509_certificate((thunderbird / "TestCA.pem").read_bytes())
        tb_context = UnwrapContext(network="medecin", identity=None,
                                   trust=TrustStore(anchors=(test_ca,)), directory=Directory(),
                                   now=NOW)
        seeds += [Seed(p.name, p.read_bytes(), SmimeAdapter(), tb_context)
                  for p in sorted(thunderbird.glob("*.eml"))]
    return seeds


def openpgp_seeds() -> list[Seed]:
    folder = SHARED / "thunderbird-openpgp"
    if not folder.is_dir():
        return []
    keys = folder / "keys"
    bob = (keys / "bob@openpgp.example-0xfbfcc82a015e7330-secret.asc").read_bytes()
    bob_pub = (keys / "bob@openpgp.example-0xfbfcc82a015e7330-pub.asc").read_bytes()
    carol_pub = (keys / "carol@example.com-0x3099ff1238852b9f-pub.asc").read_bytes()
    context = UnwrapContext("openpgp-net", Identity("bob", openpgp_secret=bob), TrustStore(),
                            Directory(openpgp=(bob_pub, carol_pub)), NOW)
    return [Seed(p.name, p.read_bytes(), OpenPgpAdapter(), context)
            for p in sorted((folder / "eml").glob("*.eml"))]


def apicrypt_seeds() -> list[Seed]:
    gateway = generate_identity("Passerelle <gw@passerelle.test>", created=NOW)
    doctor = generate_identity("Dr Martin <dr.martin@cabinet.apicrypt.org>", created=NOW)

    def public(secret: bytes) -> bytes:
        return str(pysequoia.Tsk.from_bytes(secret).extract_certificate()).encode()

    text = ("123456\nDUPONT\nJean\n\n\n75001 PARIS\n01/02/1960\n\nDOSS42\n23/11/2026\nLABO\n"
            "Dr MARTIN\n****LAB****\nRES|Glyc\xe9mie|GLY|N|5.2|mmol/l|4.1|6.1|N||F|\n"
            "****FIN****\n****FINFICHIER****\n").encode("latin-1")
    plain = (b"From: <dr.martin@cabinet.apicrypt.org>\r\nTo: <gw@passerelle.test>\r\n"
             b"Subject: Resultats\r\nMIME-Version: 1.0\r\n"
             b"Content-Type: text/plain; charset=iso-8859-1\r\n"
             b"Content-Transfer-Encoding: 8bit\r\n\r\n" + text.replace(b"\n", b"\r\n"))
    # The doctor's side wraps for the gateway (same layout, the doctor's key signs).
    wrapped = ApicryptAdapter().wrap(
        Unwrapped(plain, Verdict.unsigned(), "mime"),
        WrapContext("apicrypt", Identity("doctor", openpgp_secret=doctor), TrustStore(),
                    Directory(openpgp=(public(gateway),)), NOW,
                    "dr.martin@cabinet.apicrypt.org", ("gw@passerelle.test",),
                    options={"codec": "openpgp", "version": 1}),
    )
    context = UnwrapContext("apicrypt", Identity("gw", openpgp_secret=gateway), TrustStore(),
                            Directory(openpgp=(public(doctor),)), NOW,
                            options={"codec": "openpgp", "version": 1})
    return [Seed("apicrypt-v1-signed-encrypted", wrapped.content, ApicryptAdapter(), context)]


def gnupg_seeds() -> list[Seed]:
    """The messages the interop tests get from GnuPG 2.2, made here by gpg (`make test`
    installs it): each kind of envelope a GnuPG-based client sends."""
    gateway_secret = generate_identity("Passerelle <gw@passerelle.test>", created=NOW)
    gateway_public = str(pysequoia.Tsk.from_bytes(gateway_secret).extract_certificate()).encode()
    peer = Gpg()
    try:
        peer.import_key(gateway_public)
        doctor = peer.generate("Dr Martin <dr.martin@cabinet.apicrypt.org>")
        doctor_public = peer.export_public(doctor)
        head = (b"From: <dr.martin@cabinet.apicrypt.org>\r\nTo: <gw@passerelle.test>\r\n"
                b"Subject: CR\r\nMIME-Version: 1.0\r\n")
        entity = (b"Content-Type: text/plain; charset=utf-8\r\n\r\n"
                  b"Compte rendu de consultation.\r\n")

        def gpg(*args: str, data: bytes) -> bytes:
            return peer.run("--armor", "--local-user", doctor, *args, input=data,
                            check=True).output

        def encrypted(armored: bytes) -> bytes:
            return head + (b'Content-Type: multipart/encrypted; '
                           b'protocol="application/pgp-encrypted"; boundary="E"\r\n\r\n'
                           b"--E\r\nContent-Type: application/pgp-encrypted\r\n\r\n"
                           b"Version: 1\r\n\r\n--E\r\nContent-Type: application/octet-stream"
                           b"\r\n\r\n" + armored.replace(b"\n", b"\r\n") + b"\r\n--E--\r\n")

        def inline(armored: bytes) -> bytes:
            return head + b"Content-Type: text/plain\r\n\r\n" + armored.replace(b"\n", b"\r\n")

        signature = gpg("--detach-sign", data=entity)
        signed = head + (b'Content-Type: multipart/signed; micalg=pgp-sha256; '
                         b'protocol="application/pgp-signature"; boundary="S"\r\n\r\n'
                         b"--S\r\n" + entity + b"\r\n--S\r\n"
                         b"Content-Type: application/pgp-signature\r\n\r\n"
                         + signature.replace(b"\n", b"\r\n") + b"\r\n--S--\r\n")
        text = b"Compte rendu de consultation.\n"
        made = {
            "gpg-pgp-mime-signed": signed,
            "gpg-pgp-mime-signed-encrypted": encrypted(gpg(
                "--sign", "--encrypt", "--recipient", "gw@passerelle.test", data=entity)),
            "gpg-pgp-mime-encrypted": encrypted(gpg(
                "--encrypt", "--recipient", "gw@passerelle.test", data=signed[len(head):])),
            "gpg-inline-signed": inline(gpg("--sign", data=text)),
            "gpg-clearsigned": inline(gpg("--clearsign", data=text)),
            "gpg-inline-signed-encrypted": inline(gpg(
                "--sign", "--encrypt", "--recipient", "gw@passerelle.test", data=text)),
        }
    finally:
        peer.close()
    context = UnwrapContext("openpgp-net", Identity("gw", openpgp_secret=gateway_secret),
                            TrustStore(), Directory(openpgp=(doctor_public,)), NOW,
                            options={"codec": "openpgp", "version": 2})
    seeds = [Seed(name, raw, OpenPgpAdapter(), context) for name, raw in made.items()]
    seeds += [Seed(f"{name} (apicrypt)", raw, ApicryptAdapter(), context)
              for name, raw in made.items()]
    return seeds


def mime_seeds() -> list[Seed]:
    context = UnwrapContext("hospital", None, TrustStore(), Directory(), NOW)
    plain = (b"From: <a@chu-test.fr>\r\nTo: <b@clinique-test.fr>\r\nSubject: CR\r\n"
             b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"B\"\r\n\r\n"
             b"--B\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nBonjour.\r\n"
             b"--B\r\nContent-Type: application/pdf\r\nContent-Transfer-Encoding: base64\r\n\r\n"
             b"JVBERi0xLjQK\r\n--B--\r\n")
    return [Seed("mime-multipart", plain, MimeAdapter(), context)]


@functools.cache
def corpus(kind: str) -> tuple[Seed, ...]:
    makers: dict[str, Callable[[], list[Seed]]] = {
        "smime": smime_seeds, "openpgp": openpgp_seeds, "apicrypt": apicrypt_seeds,
        "gnupg": gnupg_seeds, "mime": mime_seeds,
    }
    return tuple(makers[kind]())


@functools.cache
def baseline(seed: Seed) -> Unwrapped | None:
    try:
        return seed.adapter.unwrap(seed.raw, seed.context)
    except GatewayError:
        return None


# -- mutations -----------------------------------------------------------------------------

_CHUNKS = st.sampled_from([
    b"\r\n", b"\n", b"\r", b"--", b"=", b"\x00", b"\xff", b"-----BEGIN PGP MESSAGE-----",
    b"Content-Type: multipart/signed; boundary=x\r\n", b"\r\n\r\n", b"A" * 1000, b"0",
    b"Content-Transfer-Encoding: base64\r\n", b"\x30\x82\xff\xff", b"\xa0\x80",
])


@st.composite
def mutated(draw: st.DrawFn, seeds: tuple[Seed, ...]) -> tuple[Seed, bytes]:
    """A seed and its body with 1 to 4 byte-level mutations (flip, delete, insert, repeat)."""
    seed = draw(st.sampled_from(seeds))
    raw = seed.raw
    start = raw.find(b"\r\n\r\n")
    start = start + 4 if start >= 0 else raw.find(b"\n\n") + 2
    head, body = raw[:start], bytearray(raw[start:])
    for _ in range(draw(st.integers(1, 4))):
        if not body:
            break
        at = draw(st.integers(0, len(body) - 1))
        action = draw(st.sampled_from(["flip", "delete", "insert", "repeat", "truncate"]))
        if action == "flip":
            body[at] ^= draw(st.integers(1, 255))
        elif action == "delete":
            del body[at:at + draw(st.integers(1, 64))]
        elif action == "insert":
            body[at:at] = draw(st.one_of(_CHUNKS, st.binary(min_size=1, max_size=32)))
        elif action == "repeat":
            body[at:at] = body[at:at + draw(st.integers(1, 256))]
        else:
            del body[at:]
    return seed, head + bytes(body)


def canonical(content: bytes) -> bytes:
    lines = re.split(rb"\r\n|\n", content)
    return b"\n".join(line.rstrip(b" \t") for line in lines).rstrip(b"\n")


def check(seed: Seed, raw: bytes) -> None:
    try:
        result = seed.adapter.unwrap(raw, seed.context)
    except GatewayError:
        return
    original = baseline(seed)
    if result.signature.result == "pass":
        assert original is not None and original.signature.result == "pass", (
            f"{seed.name}: a mutation of a message that did not verify now verifies")
        assert canonical(result.content) == canonical(original.content), (
            f"{seed.name}: mutated content verified as pass ({result.signature.reason})")


# -- properties ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["smime", "openpgp", "apicrypt", "gnupg", "mime"])
@FUZZ
@given(data=st.data())
def test_mutated_input_only_raises_gateway_errors_and_never_passes(
    kind: str, data: st.DataObject,
) -> None:
    seeds = corpus(kind)
    assume(seeds)
    seed, raw = data.draw(mutated(seeds))
    assume(raw != seed.raw)
    check(seed, raw)


@pytest.mark.parametrize("kind", ["smime", "openpgp", "apicrypt", "gnupg", "mime"])
@FUZZ
@given(data=st.data(), junk=st.binary(max_size=2048))
def test_random_bodies_only_raise_gateway_errors(kind: str, data: st.DataObject,
                                                 junk: bytes) -> None:
    seeds = corpus(kind)
    assume(seeds)
    seed = data.draw(st.sampled_from(seeds))
    # The seed's own headers (so the adapter takes its format's path) over a random body.
    end = seed.raw.find(b"\r\n\r\n")
    head = seed.raw[:end + 4] if end >= 0 else b""
    check(seed, head + junk)
