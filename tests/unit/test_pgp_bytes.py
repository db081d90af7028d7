"""The byte-level readers of the OpenPGP adapters against a line-by-line oracle of each rule.

`adapters.pgppackets.dearmor` and the `adapters.pgpmime` helpers read whole bodies (up to the
largest message accepted) with bytes methods that run in C. Each rule is also written here the
plain way, one line at a time or as one regular expression (the oracles below); hypothesis
checks that both agree on inputs built from the characters that matter (line breaks, blanks,
`=`, `- `, armor lines), and a few named cases pin the edges down. The hostile inputs at the
end are sized so that a reader that is not linear hangs for minutes instead of passing.
"""

from __future__ import annotations

import base64
import binascii
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from adapters.pgpmime import (
    base64_body,
    canonical_crlf,
    cleartext,
    same_signed_text,
    text_part,
    whole_armored,
)
from adapters.pgppackets import PacketError, dearmor

EXAMPLES = settings(max_examples=300, deadline=None, derandomize=True)
BEGIN = b"-----BEGIN PGP MESSAGE-----"
END = b"-----END PGP MESSAGE-----"
SIGNED = b"-----BEGIN PGP SIGNED MESSAGE-----"
SIGNATURE = b"-----BEGIN PGP SIGNATURE-----"


# -- oracles ------------------------------------------------------------------------------------

def oracle_crlf(data: bytes) -> bytes:
    return re.sub(rb"\r\n|\r|\n", b"\r\n", data)


def oracle_armor_base64(text: bytes) -> bytes:
    """Armor lines (ended by CRLF, CR or LF) stripped, up to the checksum line."""
    payload: list[bytes] = []
    checksum_seen = False
    for line in re.split(rb"\r\n|\r|\n", text):
        line = line.strip()
        if not line:
            continue
        if checksum_seen:
            raise PacketError("armored data after the checksum line")
        if line.startswith(b"="):
            checksum_seen = True
            continue
        payload.append(line)
    return b"".join(payload)


def oracle_dearmor(data: bytes) -> bytes:
    begin = data.index(BEGIN)
    end = data.index(END, begin)
    lines = data[begin + len(BEGIN): end].split(b"\n")
    if lines[0].strip():
        raise PacketError("text after the armor header line")
    position = 1
    while position < len(lines) and b":" in lines[position]:
        position += 1
    encoded = oracle_armor_base64(b"\n".join(lines[position:]))
    try:
        return base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise PacketError("armored OpenPGP message is not valid base64") from None


def oracle_cleartext(block: bytes) -> bytes | None:
    lines = iter(block.splitlines(keepends=True))
    if next(lines, b"").rstrip() != SIGNED:
        return None
    for line in lines:
        if not line.strip():
            break
    else:
        return None
    text: list[bytes] = []
    for line in lines:
        if line.startswith(SIGNATURE):
            return b"".join(text)
        text.append(line[2:] if line.startswith(b"- ") else line)
    return None


def oracle_signed_form(text: bytes) -> bytes:
    return b"\r\n".join(line.rstrip(b" \t") for line in oracle_crlf(text).split(b"\r\n"))


def oracle_same_signed_text(printed: bytes, verified: bytes) -> bool:
    for ending in (b"\r\n", b"\n", b"\r"):
        if printed.endswith(ending):
            printed = printed[: -len(ending)]
            break
    return oracle_signed_form(printed) == oracle_signed_form(verified)


def oracle_smtp_lines(text: bytes) -> bool:
    return ((not text or text.endswith(b"\r\n")) and oracle_crlf(text) == text
            and b"\x00" not in text and all(len(line) <= 998 for line in text.split(b"\r\n")))


def oracle_line_starts(text: bytes, marker: bytes) -> int:
    return sum(1 for line in re.split(rb"\r\n|\r|\n", text) if line.startswith(marker))


def outcome(reader, data: bytes) -> bytes | str | None:  # type: ignore[no-untyped-def]
    try:
        return reader(data)  # type: ignore[no-any-return]
    except PacketError:
        return "refused"


# -- strategies ---------------------------------------------------------------------------------

BREAKS = st.sampled_from([b"\r\n", b"\n", b"\r"])
PIECES = st.sampled_from([
    b"\r\n", b"\n", b"\r", b" ", b"\t", b"=", b"==", b"- ", b"-", b"A", b"QUJD", b"a+/9",
    b"\x00", b"\xe9", b"x" * 999, SIGNATURE, b"Hash: SHA256",
])
TEXT = st.lists(PIECES, max_size=30).map(b"".join)


@st.composite
def armored(draw: st.DrawFn) -> bytes:
    """An armored message as encoders write it, with line breaks of one kind or mixed, then
    perhaps blanks, stray `=` or text spliced in somewhere."""
    data = draw(st.binary(max_size=300))
    encoded = base64.b64encode(data)
    width = draw(st.sampled_from([4, 64, 76]))
    lines = [encoded[i: i + width] for i in range(0, len(encoded), width)]
    headers = draw(st.lists(st.sampled_from([b"Version: x", b"Comment: y z"]), max_size=2))
    checksum = draw(st.sampled_from([[b"=abcd"], [], [b"=abcd", b""], [b"", b"=ab"]]))
    body = [BEGIN, *headers, b"", *lines, *checksum]
    out = b""
    for line in body:
        out += line + draw(BREAKS)
    if draw(st.booleans()):
        at = draw(st.integers(len(BEGIN) + 1, len(out)))
        out = out[:at] + draw(TEXT) + out[at:]
    return out + END + b"\r\n"


@st.composite
def cleartext_blocks(draw: st.DrawFn) -> bytes:
    text = draw(st.lists(st.sampled_from([
        b"RES|HB|13.5", b"- dash escaped", b"- - twice", b"-", b"", b"  trailing \t",
        b"- " + SIGNATURE, b"x" + SIGNATURE, SIGNATURE,
    ]), max_size=8))
    headers = draw(st.lists(st.sampled_from([b"Hash: SHA256", b" "]), max_size=2))
    out = b""
    for line in [SIGNED, *headers, b"", *text, SIGNATURE, b"", b"iQ==", b"-----END PGP SIGNATURE-----"]:
        out += line + draw(BREAKS)
    return out


# -- canonical_crlf ------------------------------------------------------------------------------

@EXAMPLES
@given(TEXT)
def test_canonical_crlf_makes_every_line_break_crlf(data: bytes) -> None:
    assert canonical_crlf(data) == oracle_crlf(data)


def test_canonical_crlf_hands_back_canonical_text_itself() -> None:
    text = b"RES|Hemoglobine|13.5|g/dl\r\n" * 1000
    assert canonical_crlf(text) is text
    assert canonical_crlf(b"") == b""
    assert canonical_crlf(b"\r\r\n\n\r") == b"\r\n\r\n\r\n\r\n"


# -- dearmor -------------------------------------------------------------------------------------

@EXAMPLES
@given(armored())
def test_dearmor_reads_armor_as_the_line_by_line_oracle_does(data: bytes) -> None:
    assert outcome(dearmor, data) == outcome(oracle_dearmor, data)


@pytest.mark.parametrize("payload, expected", [
    (b"QUJD\r\nREVG\r\n=abcd\r\n", b"ABCDEF"),  # CRLF
    (b"QUJD\nREVG\n=abcd\n", b"ABCDEF"),  # LF
    (b"QUJD\rREVG\r=abcd\r", b"ABCDEF"),  # lone CR: a line break, as in canonical_crlf
    (b"QUJD  \r\n\tREVG\r\n\r\n=abcd  \r\n\r\n", b"ABCDEF"),  # blanks at line ends
    (b"QUI=\r\n=abcd\r\n", b"AB"),  # padding, then the checksum line
    (b"QUI=\r\n", b"AB"),  # no checksum line
    (b"", b""),
])
def test_dearmor_accepts(payload: bytes, expected: bytes) -> None:
    assert dearmor(BEGIN + b"\r\n\r\n" + payload + END) == expected


@pytest.mark.parametrize("payload", [
    b"QUJD\r\n=abcd\r\nREVG\r\n",  # data after the checksum line
    b"QUJD\r\n=abcd\r\n=efgh\r\n",  # two checksum lines
    b"QU JD\r\n",  # a blank inside a line
    b"QUI=\r\nREVG\r\n",  # data after the padding
    b"QUI=REVG\r\n",
    b"QUJD*\r\n",
])
def test_dearmor_refuses(payload: bytes) -> None:
    with pytest.raises(PacketError):
        dearmor(BEGIN + b"\r\n\r\n" + payload + END)
    assert outcome(oracle_dearmor, BEGIN + b"\r\n\r\n" + payload + END) == "refused"


# -- text_part -----------------------------------------------------------------------------------

@EXAMPLES
@given(TEXT)
def test_text_part_sends_text_as_it_is_exactly_when_smtp_carries_it(text: bytes) -> None:
    part = text_part(text, "iso-8859-1")
    head, body = part.split(b"\r\n\r\n", 1)
    if oracle_smtp_lines(text):
        assert body == text and b"base64" not in head
    else:
        assert head.endswith(b"Content-Transfer-Encoding: base64")
        assert base64.b64decode(body, validate=False) == text


@pytest.mark.parametrize("size", [0, 1, 56, 57, 58, 113, 114, 4000])
def test_base64_body_is_lines_of_76_characters_ended_by_crlf(size: int) -> None:
    data = bytes(range(256)) * 16
    encoded = base64.b64encode(data[:size])
    expected = b"".join(encoded[i: i + 76] + b"\r\n" for i in range(0, len(encoded), 76))
    assert base64_body(data[:size]) == expected


# -- inline blocks -------------------------------------------------------------------------------

@EXAMPLES
@given(cleartext_blocks())
def test_cleartext_reads_the_block_as_the_line_by_line_oracle_does(block: bytes) -> None:
    assert cleartext(block) == oracle_cleartext(block)


@EXAMPLES
@given(TEXT, st.sampled_from([
    (b"", b""), (b"\n", b" \n"), (b"\r\n", b"\n"), (b"\n", b"\t\r"), (b"A", b"B"), (b"=", b""),
]))
def test_same_signed_text_agrees_with_the_oracle(
    printed: bytes, change: tuple[bytes, bytes]
) -> None:
    verified = printed.replace(*change)
    assert same_signed_text(printed, verified) == oracle_same_signed_text(printed, verified)


@EXAMPLES
@given(st.lists(st.sampled_from([
    BEGIN, END, SIGNED, SIGNATURE, b"-----END PGP SIGNATURE-----", b"-----BEGIN PGP",
    b"-----END PGP", b"x", b"QUJD", b"-", b"\r\n", b"\n", b"\r", b" ", b"\t",
]), max_size=12).map(b"".join))
def test_whole_armored_counts_armor_lines_as_the_oracle_does(text: bytes) -> None:
    stripped = text.strip(b" \t\r\n")
    message = (
        stripped.startswith(BEGIN) and stripped.endswith(END)
        and oracle_line_starts(stripped, b"-----BEGIN PGP") == 1
        and oracle_line_starts(stripped, b"-----END PGP") == 1
    )
    signed = (
        stripped.startswith(SIGNED) and stripped.endswith(b"-----END PGP SIGNATURE-----")
        and oracle_line_starts(stripped, b"-----BEGIN PGP") == 2
        and oracle_line_starts(stripped, SIGNATURE) == 1
        and oracle_line_starts(stripped, b"-----END PGP") == 1
    )
    found = whole_armored(text)
    if message or signed:
        assert found is not None and found.block == stripped + b"\n"
        assert found.kind == ("message" if message else "cleartext")
    else:
        assert found is None


def test_whole_armored_strips_a_long_run_of_blanks_in_one_pass() -> None:
    block = BEGIN + b"\r\n\r\nQUJD\r\n" + END
    found = whole_armored(b" \t\r\n" * 500_000 + block + b" \t\r\n" * 500_000)
    assert found is not None and found.block == block + b"\n"


# -- hostile inputs: one pass each -----------------------------------------------------------------

def test_armor_of_many_short_lines_and_blanks_is_read_in_one_pass() -> None:
    body = b"QUJD \r\n\r\n" * 400_000  # blanks: the line-by-line reading
    assert dearmor(BEGIN + b"\r\n\r\n" + body + END) == b"ABC" * 400_000
    body = b"QUJD\r" * 600_000  # lone CRs: the bytes-method reading
    assert dearmor(BEGIN + b"\r\n\r\n" + body + END) == b"ABC" * 600_000


def test_armor_of_many_padding_characters_is_refused_in_one_pass() -> None:
    with pytest.raises(PacketError):
        dearmor(BEGIN + b"\n\nQUI" + b"=\n" * 1_000_000 + END)
    with pytest.raises(PacketError):
        dearmor(BEGIN + b"\n\nQU" + b"=A" * 1_000_000 + END)


@pytest.mark.parametrize("line_break", [b"\n", b"\r", b"\r\n"])
def test_cleartext_with_many_armor_header_lines_is_read_in_one_pass(line_break: bytes) -> None:
    block = SIGNED + line_break + (b"Hash: SHA256" + line_break) * 300_000
    assert cleartext(block) is None  # no blank line, no text
    block += line_break + (b"x" + SIGNATURE + line_break) * 100_000 + SIGNATURE
    assert cleartext(block) == (b"x" + SIGNATURE + line_break) * 100_000
