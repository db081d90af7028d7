"""The `apicrypt` adapter: layout, HPRIM byte fidelity, options, both codecs.

The `external` codec runs a stand-in program (written here) with the documented APICEM
command lines; it "encrypts" by a reversible transform and marks bodies with `$APICRYPT`,
which is enough to test the layout, the plumbing and the failure paths, never the cipher.
"""

from __future__ import annotations

import base64
import os
import stat
import sys
from datetime import UTC, datetime
from pathlib import Path

import pysequoia
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
from adapters.pgpmime import canonical_crlf
from gateway.errors import PermanentFailure, Reason, TemporaryFailure

NOW = datetime(2026, 11, 23, 10, 0, tzinfo=UTC)
ADAPTER = ApicryptAdapter()
LAB = "labo@biologie.apicrypt.org"
DOCTOR = "dr.martin@medecin.apicrypt.org"

# An HPRIM Santé report: 12-line header, free text, ****LAB**** with RES|/TEX| lines,
# ****FIN****, two patients, ****FINFICHIER****; ISO-8859-1 accents, bare LF line ends.
HPRIM = (
    "123456\nDUPONT\nJean\n12 rue des \xc9coles\n\n75001 PARIS\n01/02/1960\n"
    "1234567890123\nDOSS42\n23/11/2026\nLABO BIOLOGIE\nDr MARTIN\n"
    "Compte rendu d'analyses, r\xe9sultats valid\xe9s.\n"
    "****LAB****\nTEX|Num\xe9ration formule sanguine\n"
    "RES|H\xe9moglobine|HB|N|13.5|g/dl|12|16|N||F|\nRES|Glyc\xe9mie|GLY|N|5.2|mmol/l|4.1|6.1|N||F|\n"
    "****FIN****\n"
    "654321\nDURAND\nMarie\n\n\n69000 LYON\n02/03/1970\n\nDOSS43\n23/11/2026\nLABO\nDr MARTIN\n"
    "****LAB****\nRES|Cr\xe9atinine|CREA|N|80|\xb5mol/l|45|90|N||F|\n****FIN****\n"
    "****FINFICHIER****\n"
).encode("latin-1")
PDF = b"%PDF-1.4\n\x00\xff\xfe binary attachment" * 10


@pytest.fixture(scope="module")
def keys() -> dict[str, bytes]:
    gateway = generate_identity("Passerelle <gw@passerelle.test>", created=NOW)
    doctor = generate_identity(f"Dr Martin <{DOCTOR}>", created=NOW)
    return {
        "gateway": gateway,
        "doctor": doctor,
        "gateway_pub": str(pysequoia.Tsk.from_bytes(gateway).extract_certificate()).encode(),
        "doctor_pub": str(pysequoia.Tsk.from_bytes(doctor).extract_certificate()).encode(),
    }


def hospital_message(text: bytes, charset: str = "iso-8859-1") -> bytes:
    return (
        b"From: <secretariat@chu.test>\r\nTo: <" + DOCTOR.encode() + b">\r\n"
        b"Subject: Resultats DUPONT\r\nMIME-Version: 1.0\r\n"
        b'Content-Type: multipart/mixed; boundary="M"\r\n\r\n'
        b"--M\r\nContent-Type: text/plain; charset=" + charset.encode() + b"\r\n"
        b"Content-Transfer-Encoding: base64\r\n\r\n"
        + __import__("base64").encodebytes(text) + b"\r\n"
        b"--M\r\nContent-Type: application/pdf; name=cr.pdf\r\n"
        b"Content-Disposition: attachment; filename=cr.pdf\r\nContent-Transfer-Encoding: base64\r\n\r\n"
        + __import__("base64").encodebytes(PDF) + b"\r\n--M--\r\n"
    )


def leaves(raw: bytes) -> list[tuple[str | None, bytes]]:
    entity = parse_entity(raw)
    media_type, params = entity.content_type()
    if media_type.startswith("multipart/"):
        _, parts, _ = multipart_parts(entity.body, params["boundary"])
        return [leaf for part in parts for leaf in leaves(part)]
    disposition = entity.get("content-disposition") or ""
    name = disposition.split('filename="')[1].rstrip('"') if 'filename="' in disposition else None
    return [(name, decode_body(entity))]


def test_option_problems() -> None:
    assert ADAPTER.option_problems({"codec": "openpgp", "version": 1}) == []
    problems = ADAPTER.option_problems({"codec": "rot13", "version": 3, "colour": "x",
                                        "timeout": -1})
    assert len(problems) == 4
    external = ADAPTER.option_problems({"codec": "external", "programs": {"apicrypt": "/x"}})
    assert any("apiuncrypt" in p for p in external)
    assert any("'user'" in p for p in external) and any("key_directory" in p for p in external)
    assert any("not an APICEM" in p for p in ADAPTER.option_problems(
        {"programs": {"decrypt": "/x"}}))


def test_openpgp_codec_round_trip_hprim_v1(keys: dict[str, bytes]) -> None:
    wrap_context = WrapContext(
        "apicrypt", Identity("gw", openpgp_secret=keys["gateway"]), TrustStore(),
        Directory(openpgp=(keys["doctor_pub"],)), NOW, "secretariat@chu.test",
        (DOCTOR, "unknown@apicrypt.org"), options={"codec": "openpgp", "version": 1},
    )
    wrapped = ADAPTER.wrap(Unwrapped(hospital_message(HPRIM), Verdict.unsigned(), "mime"),
                           wrap_context)
    assert wrapped.refused["unknown@apicrypt.org"].reason == Reason.NO_RECIPIENT_KEY
    assert b"Subject: Resultats DUPONT" in wrapped.content  # subject in clear
    assert b"DUPONT\n" not in wrapped.content and b"%PDF" not in wrapped.content
    names = [name for name, _ in leaves(wrapped.content)]
    assert names == [None, "cr.pdf.apz"]

    # The doctor's side (same layout, the doctor's key) gets the original bytes back.
    unwrap_context = UnwrapContext(
        "apicrypt", Identity("doctor", openpgp_secret=keys["doctor"]), TrustStore(),
        Directory(openpgp=(keys["gateway_pub"],)), NOW, options={"version": 1},
    )
    relabelled = wrapped.content.replace(b"<secretariat@chu.test>", b"<gw@passerelle.test>")
    unwrapped = ADAPTER.unwrap(relabelled, unwrap_context)
    assert unwrapped.encrypted
    assert unwrapped.signature.result == "pass", unwrapped.signature
    assert leaves(unwrapped.content) == [(None, HPRIM), ("cr.pdf", PDF)]
    assert b"charset=iso-8859-1" in unwrapped.content


def test_v1_refuses_text_not_representable_in_latin1(keys: dict[str, bytes]) -> None:
    context = WrapContext(
        "apicrypt", Identity("gw", openpgp_secret=keys["gateway"]), TrustStore(),
        Directory(openpgp=(keys["doctor_pub"],)), NOW, "a@chu.test", (DOCTOR,),
        options={"version": 1},
    )
    with pytest.raises(PermanentFailure) as caught:
        ADAPTER.wrap(Unwrapped(hospital_message("Ω €".encode(), "utf-8"), Verdict.unsigned(),
                               "mime"), context)
    assert "version 2" in caught.value.advice


def test_v1_marker_needs_external_codec(keys: dict[str, bytes]) -> None:
    raw = (b"From: <" + LAB.encode() + b">\r\nSubject: x\r\n\r\n$APICRYPT\r\nABCDEF\r\n")
    context = UnwrapContext("apicrypt", Identity("gw", openpgp_secret=keys["gateway"]),
                            TrustStore(), Directory(), NOW)
    with pytest.raises(PermanentFailure) as caught:
        ADAPTER.unwrap(raw, context)
    assert caught.value.reason == Reason.DECRYPTION_FAILED


# -- external codec with a stand-in program -------------------------------------------------

STAND_IN = '''#!{python}
"""Stand-in for the APICEM programs: same command line, reversible transform, no cipher."""
import base64, os, sys, time
args = sys.argv[1:]
opts = dict(zip(args[::2], args[1::2]))
name = os.path.basename(sys.argv[0])
src, dst = opts["-s"], opts["-o"]
log = os.environ.get("STAND_IN_LOG") or os.path.join(os.path.dirname(sys.argv[0]), "calls.log")
with open(log, "a") as handle:
    handle.write(name + " " + " ".join(args) + "\\n")
data = open(src, "rb").read()
if b"FAIL" in data:
    sys.exit(3)
if b"SLOW" in data:
    time.sleep(5)
if name in ("apicrypt", "apicryptpj"):
    assert "-u" in opts and "-k" in opts and "-d" in opts
    out = base64.b64encode(bytes(b ^ 0x5A for b in data))
    if name == "apicrypt":
        out = b"$APICRYPT\\r\\n" + out + b"\\r\\n"
else:
    assert "-k" in opts
    body = data.replace(b"$APICRYPT", b"").strip()
    out = bytes(b ^ 0x5A for b in base64.b64decode(body))
open(dst, "wb").write(out)
'''


@pytest.fixture
def programs(tmp_path: Path) -> dict[str, str]:
    folder = tmp_path / "apicem"
    folder.mkdir()
    script = STAND_IN.replace("{python}", sys.executable)
    paths: dict[str, str] = {}
    for name in ("apicrypt", "apiuncrypt", "apicryptpj", "apiuncryptpj"):
        path = folder / name
        path.write_text(script)
        path.chmod(path.stat().st_mode | stat.S_IXUSR)
        paths[name] = str(path)
    return paths


def external_options(programs: dict[str, str], tmp_path: Path, timeout: float = 10) -> dict[str, object]:
    return {"codec": "external", "version": 1, "programs": programs, "user": "LABO01",
            "key_directory": str(tmp_path / "keys"), "timeout": timeout}


def test_external_codec_round_trip(programs: dict[str, str], tmp_path: Path,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    import tempfile
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    options = external_options(programs, tmp_path)
    assert ADAPTER.option_problems(options) == []
    wrapped = ADAPTER.wrap(
        Unwrapped(hospital_message(HPRIM), Verdict.unsigned(), "mime"),
        WrapContext("apicrypt", None, TrustStore(), Directory(), NOW, "a@chu.test", (DOCTOR,),
                    options=options),
    )
    assert b"$APICRYPT" in wrapped.content and b"cr.pdf.apz" in wrapped.content
    calls = (Path(programs["apicrypt"]).parent / "calls.log").read_text().splitlines()
    assert calls[0].startswith("apicrypt -s ") and f"-u LABO01 -k {tmp_path / 'keys'} -d {DOCTOR}" in calls[0]
    assert calls[1].startswith("apicryptpj -s ")
    unwrapped = ADAPTER.unwrap(
        wrapped.content, UnwrapContext("apicrypt", None, TrustStore(), Directory(), NOW,
                                       options=options))
    assert leaves(unwrapped.content) == [(None, HPRIM), ("cr.pdf", PDF)]
    assert unwrapped.encrypted and unwrapped.signature.result == "neutral"
    calls = (Path(programs["apicrypt"]).parent / "calls.log").read_text().splitlines()
    keydir = tmp_path / "keys"
    for line, program in zip(calls[2:], ("apiuncrypt", "apiuncryptpj"), strict=True):
        words = line.split()
        assert words[0] == program and words[1] == "-s" and words[3] == "-o"
        assert words[5:] == ["-k", str(keydir)]  # no user, no recipients when opening
    assert list((tmp_path / "tmp").iterdir()) == []  # private directories wiped


def test_external_failure_bounces_without_plaintext(programs: dict[str, str],
                                                     tmp_path: Path) -> None:
    raw = b"From: <" + LAB.encode() + b">\r\nSubject: x\r\n\r\n$APICRYPT\r\nFAIL\r\n"
    with pytest.raises(PermanentFailure) as caught:
        ADAPTER.unwrap(raw, UnwrapContext("apicrypt", None, TrustStore(), Directory(), NOW,
                                          options=external_options(programs, tmp_path)))
    assert caught.value.reason == Reason.DECRYPTION_FAILED and caught.value.enhanced == "5.7.5"


def test_external_timeout_defers(programs: dict[str, str], tmp_path: Path) -> None:
    raw = b"From: <" + LAB.encode() + b">\r\nSubject: x\r\n\r\n$APICRYPT\r\nSLOW\r\n"
    with pytest.raises(TemporaryFailure):
        ADAPTER.unwrap(raw, UnwrapContext(
            "apicrypt", None, TrustStore(), Directory(), NOW,
            options=external_options(programs, tmp_path, timeout=0.5)))


def test_external_missing_program_defers(tmp_path: Path) -> None:
    options = external_options({"apiuncrypt": str(tmp_path / "absent")}, tmp_path)
    raw = b"From: <" + LAB.encode() + b">\r\nSubject: x\r\n\r\n$APICRYPT\r\nAAAA\r\n"
    with pytest.raises(TemporaryFailure):
        ADAPTER.unwrap(raw, UnwrapContext("apicrypt", None, TrustStore(), Directory(), NOW,
                                          options=options))
    assert os.path.exists(tmp_path)


# -- charsets, line ends, and the other formats an Apicrypt network sends -----------------

def round_trip(keys: dict[str, bytes], message: bytes, version: int) -> tuple[bytes, Unwrapped]:
    """(what the wire carries, what the doctor's side unwraps) for `message` from a hospital."""
    wrapped = ADAPTER.wrap(Unwrapped(message, Verdict.unsigned(), "mime"), WrapContext(
        "apicrypt", Identity("gw", openpgp_secret=keys["gateway"]), TrustStore(),
        Directory(openpgp=(keys["doctor_pub"],)), NOW, "secretariat@chu.test", (DOCTOR,),
        options={"codec": "openpgp", "version": version},
    ))
    relabelled = wrapped.content.replace(b"<secretariat@chu.test>", b"<gw@passerelle.test>")
    return wrapped.content, ADAPTER.unwrap(relabelled, UnwrapContext(
        "apicrypt", Identity("doctor", openpgp_secret=keys["doctor"]), TrustStore(),
        Directory(openpgp=(keys["gateway_pub"],)), NOW, options={"version": version},
    ))


def test_hprim_with_crlf_line_ends_passes_byte_for_byte(keys: dict[str, bytes]) -> None:
    crlf = HPRIM.replace(b"\n", b"\r\n")
    _, unwrapped = round_trip(keys, hospital_message(crlf), 1)
    assert unwrapped.encrypted and unwrapped.signature.result == "pass"
    assert leaves(unwrapped.content) == [(None, crlf), ("cr.pdf", PDF)]


def test_v1_converts_utf8_text_to_iso_8859_1(keys: dict[str, bytes]) -> None:
    utf8 = HPRIM.decode("latin-1").encode("utf-8")
    wire, unwrapped = round_trip(keys, hospital_message(utf8, "utf-8"), 1)
    assert b"charset=iso-8859-1" in wire
    assert leaves(unwrapped.content) == [(None, HPRIM), ("cr.pdf", PDF)]


def test_v2_carries_utf8_text_unchanged(keys: dict[str, bytes]) -> None:
    text = "Résultats: créatinine 80 µmol/l, Ω noté\n".encode()
    wire, unwrapped = round_trip(keys, hospital_message(text, "utf-8"), 2)
    assert b"charset=utf-8" in wire and b"charset=iso-8859-1" not in wire
    assert unwrapped.encrypted
    assert leaves(unwrapped.content) == [(None, text), ("cr.pdf", PDF)]
    assert b"charset=utf-8" in unwrapped.content


def sealed_by_doctor(keys: dict[str, bytes], data: bytes) -> bytes:
    gateway = pysequoia.Cert.from_bytes(keys["gateway_pub"])
    signer = pysequoia.Tsk.from_bytes(keys["doctor"]).signer()
    made = pysequoia.encrypt(data, [gateway], signer=signer, armor=True)
    return made if isinstance(made, bytes) else str(made).encode()


def from_doctor(content_type: bytes, body: bytes) -> bytes:
    return (b"From: <" + DOCTOR.encode() + b">\r\nTo: <patient-file@chu.test>\r\n"
            b"Subject: Resultats\r\nMIME-Version: 1.0\r\nContent-Type: " + content_type
            + b"\r\n\r\n" + body)


def gateway_side(keys: dict[str, bytes]) -> UnwrapContext:
    return UnwrapContext("apicrypt", Identity("gw", openpgp_secret=keys["gateway"]),
                         TrustStore(), Directory(openpgp=(keys["doctor_pub"],)), NOW,
                         options={"version": 1})


def test_pgp_mime_from_the_apicrypt_network_unwraps_as_openpgp(keys: dict[str, bytes]) -> None:
    inner = b"Content-Type: text/plain; charset=iso-8859-1\r\n\r\n" + HPRIM
    body = (b"--E\r\nContent-Type: application/pgp-encrypted\r\n\r\nVersion: 1\r\n\r\n"
            b"--E\r\nContent-Type: application/octet-stream\r\n\r\n"
            + sealed_by_doctor(keys, inner) + b"\r\n--E--\r\n")
    raw = from_doctor(b'multipart/encrypted; protocol="application/pgp-encrypted"; '
                      b'boundary="E"', body)
    unwrapped = ADAPTER.unwrap(raw, gateway_side(keys))
    assert unwrapped.encrypted and unwrapped.source_format == "apicrypt"
    assert unwrapped.signature.result == "pass" and unwrapped.signature.signer == DOCTOR
    assert unwrapped.signature.method == "x-apicrypt"
    assert unwrapped.content.endswith(HPRIM)


def test_inline_openpgp_from_the_apicrypt_network_unwraps_as_openpgp(
    keys: dict[str, bytes],
) -> None:
    raw = from_doctor(b"text/plain; charset=us-ascii", sealed_by_doctor(keys, HPRIM))
    unwrapped = ADAPTER.unwrap(raw, gateway_side(keys))
    assert unwrapped.encrypted
    assert unwrapped.signature.result == "pass" and unwrapped.signature.signer == DOCTOR
    assert leaves(unwrapped.content) == [(None, HPRIM)]


# -- inline HPRIM from the Apicrypt network: the octets the sender wrote, nothing else -------
# The sender's program writes the block; SMTP then carries every line of the mail with CRLF.
# A cleartext-signed body with bare LF survives only under a transfer encoding (the sender's
# client base64-encodes it); an armored OpenPGP message is ASCII whatever its line ends, the
# text it carries keeps its own.

HPRIM_V2 = HPRIM.decode("latin-1").encode("utf-8")
_CHARSET = {1: "iso-8859-1", 2: "utf-8"}


def inline_block(keys: dict[str, bytes], form: str, text: bytes) -> bytes:
    """`text` as the doctor's OpenPGP program writes it inline (`form` as in the tests)."""
    signer = pysequoia.Tsk.from_bytes(keys["doctor"]).signer()
    if form == "cleartext":
        # As GnuPG writes it: each line with its own line break, then the signature armor.
        made = pysequoia.sign(signer, text[:-2] if text.endswith(b"\r\n") else text[:-1],
                              mode=pysequoia.SignatureMode.CLEAR)
    elif form == "signed":
        made = pysequoia.sign(signer, text, mode=pysequoia.SignatureMode.INLINE, armor=True)
    else:
        gateway = pysequoia.Cert.from_bytes(keys["gateway_pub"])
        made = pysequoia.encrypt(text, [gateway], armor=True,
                                 signer=signer if form == "signed+encrypted" else None)
    block = made if isinstance(made, bytes) else str(made).encode()
    return block.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n") if b"\r\n" in text else block


def inline_from_doctor(block: bytes, charset: bytes = b"us-ascii") -> bytes:
    if b"\r\n" not in block:
        # Bare LF in the body: only a transfer encoding carries them through SMTP.
        body = b"Content-Transfer-Encoding: base64\r\n\r\n" + base64.encodebytes(block).replace(
            b"\n", b"\r\n")
    else:
        body = b"Content-Transfer-Encoding: 8bit\r\n\r\n" + block
    return (b"From: <" + DOCTOR.encode() + b">\r\nTo: <patient-file@chu.test>\r\n"
            b"Subject: Resultats\r\nMIME-Version: 1.0\r\n"
            b"Content-Type: text/plain; charset=" + charset + b"\r\n" + body)


def text_leaf(raw: bytes) -> tuple[str, bytes]:
    """(charset label, decoded bytes) of the one text/plain entity of `raw`."""
    entity = parse_entity(raw)
    media_type, params = entity.content_type()
    assert media_type == "text/plain", media_type
    return params.get("charset", ""), decode_body(entity)


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("line_end", ["lf", "crlf"])
@pytest.mark.parametrize("form", ["cleartext", "signed", "encrypted", "signed+encrypted"])
def test_inline_hprim_from_the_network_reaches_the_recipient_byte_for_byte(
    keys: dict[str, bytes], form: str, line_end: str, version: int,
) -> None:
    written = HPRIM if version == 1 else HPRIM_V2
    if line_end == "crlf":
        written = written.replace(b"\n", b"\r\n")
    raw = inline_from_doctor(inline_block(keys, form, written))
    context = UnwrapContext("apicrypt", Identity("gw", openpgp_secret=keys["gateway"]),
                            TrustStore(), Directory(openpgp=(keys["doctor_pub"],)), NOW,
                            options={"version": version})
    unwrapped = ADAPTER.unwrap(raw, context)
    assert unwrapped.encrypted == form.endswith("encrypted")
    expected = "none" if form == "encrypted" else "pass"
    assert unwrapped.signature.result == expected, unwrapped.signature
    charset, text = text_leaf(unwrapped.content)
    # The exact octets, LF or CRLF, labelled with the network's charset...
    assert text == written
    assert charset == _CHARSET[version]
    # ...so that the text the recipient reads is the one the sender wrote.
    assert text.decode(charset) == written.decode(_CHARSET[version])
    # And the message itself can travel over SMTP: every line break CRLF.
    assert canonical_crlf(unwrapped.content) == unwrapped.content
    assert b"Subject: Resultats" in unwrapped.content


def test_v2_text_that_is_not_utf8_keeps_its_octets_under_the_latin1_label(
    keys: dict[str, bytes],
) -> None:
    """A v1 client on a v2 network: its Latin-1 text is not UTF-8, and labelling it so would
    turn every accent into U+FFFD. The octets stay; the label says what they can only be."""
    raw = inline_from_doctor(inline_block(keys, "signed+encrypted", HPRIM))
    context = UnwrapContext("apicrypt", Identity("gw", openpgp_secret=keys["gateway"]),
                            TrustStore(), Directory(openpgp=(keys["doctor_pub"],)), NOW,
                            options={"version": 2})
    charset, text = text_leaf(ADAPTER.unwrap(raw, context).content)
    assert (charset, text) == ("iso-8859-1", HPRIM)


def test_text_in_an_unknown_charset_is_refused_with_advice_that_fits(
    keys: dict[str, bytes],
) -> None:
    """Text an OpenPGP peer sent that is neither in its label's charset nor UTF-8 arrives as
    `unknown-8bit`: converting it to Latin-1 would be a guess, and v2 would not help."""
    context = WrapContext(
        "apicrypt", Identity("gw", openpgp_secret=keys["gateway"]), TrustStore(),
        Directory(openpgp=(keys["doctor_pub"],)), NOW, "a@chu.test", (DOCTOR,),
        options={"version": 1},
    )
    message = hospital_message(b"Glyc\xe9mie\r\n", "unknown-8bit")
    with pytest.raises(PermanentFailure) as caught:
        ADAPTER.wrap(Unwrapped(message, Verdict.unsigned(), "openpgp"), context)
    assert caught.value.enhanced == "5.6.3" and "version 2" not in caught.value.advice
    assert "unknown-8bit" in caught.value.advice
