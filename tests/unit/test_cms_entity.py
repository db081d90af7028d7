"""adapters/cms/entity.py: the byte scans give exactly what the plain regular expressions give.

The scans over bodies use bytes methods (find, count, isascii, translate, replace) so that a
MiB body costs no Python loop per octet. Each is checked here against the straightforward
regular-expression form of the same rule (the oracles below), on the tricky cases by hand and
on random inputs made of the characters that matter (line breaks, dashes, spaces, the
boundary, 8-bit octets and NUL).
"""

from __future__ import annotations

import base64
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from adapters.cms.entity import (
    _is_seven_bit_clean,
    base64_lines,
    crlf,
    decode_body,
    multipart_parts,
    parse_entity,
    seven_bit,
)

EXAMPLES = settings(max_examples=300, deadline=None, derandomize=True)


# -- oracles: each rule written as one regular expression -------------------------------------

def oracle_multipart(body: bytes, boundary: str) -> tuple[bytes, list[bytes], bytes]:
    delimiter = b"--" + boundary.encode("ascii")
    pattern = re.compile(
        rb"(?:^|\r\n|\n)" + re.escape(delimiter) + rb"(--)?[ \t]*(?:\r\n|\n|$)"
    )
    parts: list[bytes] = []
    preamble = b""
    start: int | None = None
    for match in pattern.finditer(body):
        if start is None:
            preamble = body[: match.start()]
        else:
            parts.append(body[start: match.start()])
        if match.group(1):
            return preamble, parts, body[match.end():]
        start = match.end()
    raise ValueError("multipart body has no closing delimiter")


def oracle_crlf(data: bytes) -> bytes:
    return re.sub(rb"\r\n|\r|\n", b"\r\n", data)


def oracle_clean(body: bytes) -> bool:
    if re.search(rb"[\x80-\xff\x00]|\r(?!\n)|(?<!\r)\n", body):
        return False
    return all(len(line) <= 998 for line in body.split(b"\r\n"))


def oracle_base64_lines(data: bytes) -> bytes:
    encoded = base64.b64encode(data)
    return b"".join(encoded[i: i + 76] + b"\r\n" for i in range(0, len(encoded), 76))


def outcome(function: object, *args: object) -> object:
    try:
        return function(*args)  # type: ignore[operator]
    except ValueError as error:
        return ("ValueError", str(error))


# -- multipart_parts --------------------------------------------------------------------------

@pytest.mark.parametrize("body", [
    b"--b\r\none\r\n--b--\r\n",
    b"--b\r\none\r\n--b--",
    b"preamble\r\n--b\r\none\r\n--b\r\ntwo\r\n--b--\r\nepilogue",
    b"--b\r\n--b\r\n--b--\r\n",  # the line break ending a delimiter never starts the next
    b"--b\r\n\r\n--b--\r\n",  # an empty part
    b"--b \t\r\none\n--b-- \t\nrest",  # transport padding, bare LF
    b"--bX\r\n--b\r\nx\r\n--b--\r\n",  # a longer boundary is not this one
    b"--b\r\nx\r\n--b--x\r\n--b--\r\n",  # "--b--x" is no delimiter
    b"--b\r\nx\r--b--\r\n",  # a bare CR does not start a delimiter line
    b"--b\r\nx\r\n--b--\r",  # nor end one
    b"--b\r\nx\r\n--b--\n",
    b"x--b\r\n--b--",
    b"\n--b\r\n--b--",
    b"\r\n--b\r\nx\r\n--b--",
    b"----b\r\n--b--",
    b"--b\r\nno end",
    b"",
])
def test_multipart_parts_matches_the_delimiter_rule(body: bytes) -> None:
    assert outcome(multipart_parts, body, "b") == outcome(oracle_multipart, body, "b")


def test_multipart_parts_with_a_boundary_of_dashes() -> None:
    # Overlapping occurrences of the delimiter itself.
    for body in (b"-----\r\nx\r\n-------\r\n", b"---\r\n----\r\n-----\r\n", b"\n------"):
        assert outcome(multipart_parts, body, "-") == outcome(oracle_multipart, body, "-")
        assert outcome(multipart_parts, body, "--") == outcome(oracle_multipart, body, "--")


@EXAMPLES
@given(st.lists(st.sampled_from(
    [b"--b", b"--", b"-", b"b", b"\r\n", b"\r", b"\n", b" ", b"\t", b"x", b"--b--"]
), max_size=40))
def test_multipart_parts_matches_the_delimiter_rule_on_random_bodies(
    pieces: list[bytes],
) -> None:
    body = b"".join(pieces)
    assert outcome(multipart_parts, body, "b") == outcome(oracle_multipart, body, "b")


# -- line breaks and 7-bit cleanliness --------------------------------------------------------

LINE_PIECES = st.lists(st.sampled_from(
    [b"\r\n", b"\r", b"\n", b"a", b"\x00", b"\xe9", b"\x7f", b" " * 500]
), max_size=30)


@EXAMPLES
@given(LINE_PIECES)
def test_crlf_matches_the_line_break_rule(pieces: list[bytes]) -> None:
    data = b"".join(pieces)
    assert crlf(data) == oracle_crlf(data)


def test_crlf_returns_canonical_data_itself() -> None:
    data = b"a\r\nb\r\n" * 1000
    assert crlf(data) is data


@EXAMPLES
@given(LINE_PIECES)
def test_seven_bit_clean_matches_the_rule(pieces: list[bytes]) -> None:
    body = b"".join(pieces)
    assert _is_seven_bit_clean(body) == oracle_clean(body)


@pytest.mark.parametrize("body", [
    b"a" * 998, b"a" * 999, b"a" * 998 + b"\r\n" + b"b" * 998, b"a\r\n" + b"b" * 999,
    b"b" * 999 + b"\r\n", b"", b"\r\n", b"a\rb", b"a\nb", b"\x00", b"\xe9",
])
def test_seven_bit_clean_line_lengths(body: bytes) -> None:
    assert _is_seven_bit_clean(body) == oracle_clean(body)


# -- base64 -----------------------------------------------------------------------------------

@pytest.mark.parametrize("size", [0, 1, 56, 57, 58, 113, 114, 115, 4000])
def test_base64_lines_are_76_characters_and_crlf(size: int) -> None:
    data = bytes(range(256)) * (size // 256 + 1)
    assert base64_lines(data[:size]) == oracle_base64_lines(data[:size])


@EXAMPLES
@given(st.binary(max_size=600), st.lists(st.sampled_from(
    [b"\r\n", b"\n", b" ", b"\t", b"\x00", b"*", b"\xff"]), max_size=5))
def test_decode_body_ignores_what_is_not_base64(data: bytes, noise: list[bytes]) -> None:
    encoded = base64_lines(data)
    cut = len(encoded) // 2
    body = encoded[:cut] + b"".join(noise) + encoded[cut:]
    entity = parse_entity(b"Content-Transfer-Encoding: base64\r\n\r\n" + body)
    expected = base64.b64decode(re.sub(rb"[^A-Za-z0-9+/=]", b"", entity.body), validate=True)
    assert decode_body(entity) == expected == data


def test_decode_body_still_refuses_bad_padding() -> None:
    entity = parse_entity(b"Content-Transfer-Encoding: base64\r\n\r\nQUJD=A==\r\n")
    with pytest.raises(ValueError, match="bad base64 body"):
        decode_body(entity)


# -- seven_bit as a whole ---------------------------------------------------------------------

def test_seven_bit_output_for_a_clean_message_is_the_message() -> None:
    raw = (b"From: a@b.fr\r\nContent-Type: text/plain\r\n\r\n"
           + b"RES|Hemoglobine|13.5|g/dl\r\n" * 5000)
    assert seven_bit(raw) == raw


def test_seven_bit_reencodes_a_body_with_a_bare_line_feed() -> None:
    raw = b"Content-Type: text/plain\r\nContent-Transfer-Encoding: 8bit\r\n\r\nun\ndeux\r\n"
    out = parse_entity(seven_bit(raw))
    assert out.transfer_encoding() == "base64"
    assert decode_body(out) == b"un\ndeux\r\n"
