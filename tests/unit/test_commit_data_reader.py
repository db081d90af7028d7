"""The DATA reader before the 250: whatever the chunking, it agrees with a plain line-by-line
reading of RFC 5321 (end at the first <CRLF>.<CRLF>, refuse bare CR/LF, NUL and lines over 998
octets, undo dot-stuffing), and it holds the message once, not twice, once it has read it."""

from __future__ import annotations

import itertools
import tracemalloc

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.smtp_data import MAX_LINE, DataReader

LIMIT = 1 << 20


def reference(stream: bytes, limit: int = LIMIT) -> tuple[bytes | None, bytes]:
    """(the message, or None when it is refused; what follows the terminator), one line at a
    time. The CRLF of the DATA command counts as the start of the terminator."""
    framed = b"\r\n" + stream
    end = framed.find(b"\r\n.\r\n")
    assert end >= 0, "the generated stream always ends DATA"
    rest = framed[end + 5:]
    raw = framed[2:end + 2]  # complete lines, each with its CRLF
    lines = raw.split(b"\r\n")[:-1] if raw else []
    body = []
    for line in lines:
        unstuffed = line[1:] if line.startswith(b".") else line
        # The dot added for transparency does not count in the length (RFC 5321 §4.5.3.1.6).
        if b"\r" in line or b"\n" in line or b"\x00" in line or len(unstuffed) > MAX_LINE:
            return None, rest
        body.append(unstuffed)
    message = b"".join(line + b"\r\n" for line in body)
    return (None if len(message) > limit else message), rest


LINE_PIECES = st.sampled_from([b"x", b".", b"..", b"\r", b"\n", b"\x00", b"\r\n", b" ",
                               b"Subject: test", b"x" * 500, b"y" * 997, b"z" * 998])
LINES = st.lists(st.lists(LINE_PIECES, max_size=4).map(b"".join), max_size=12)


@settings(max_examples=300, deadline=None)
@given(lines=LINES, cuts=st.lists(st.integers(min_value=0, max_value=6000), max_size=6),
       after=st.sampled_from([b"", b"QUIT\r\n", b"MAIL FROM:<a@b>\r\n.\r\n"]))
def test_data_reader_agrees_with_a_line_by_line_reading(
    lines: list[bytes], cuts: list[int], after: bytes,
) -> None:
    stream = b"".join(line + b"\r\n" for line in lines) + b".\r\n" + after
    expected, expected_rest = reference(stream)
    points = sorted({min(c, len(stream)) for c in cuts} | {0, len(stream)})
    chunks = [stream[a:b] for a, b in itertools.pairwise(points) if b > a]
    reader = DataReader(LIMIT)
    for index, chunk in enumerate(chunks):
        end = reader.feed(chunk)
        if end is not None:
            rest = chunk[end:] + b"".join(chunks[index + 1:])
            break
    else:
        raise AssertionError("the reader did not find the end of DATA")
    assert rest == expected_rest
    if expected is None:
        assert reader.error is not None
        assert reader.error.smtp_code in (500, 550, 552)
    else:
        assert reader.error is None, reader.error
        assert reader.content() == expected


@given(size=st.integers(min_value=0, max_value=3000), limit=st.integers(min_value=0,
                                                                        max_value=3000))
def test_data_reader_size_limit_agrees_with_the_reference(size: int, limit: int) -> None:
    line = b"a" * 78
    stream = (line + b"\r\n") * (size // 80) + b".\r\n"
    expected, _ = reference(stream, limit)
    reader = DataReader(limit)
    assert reader.feed(stream) == len(stream)
    assert (reader.error is None) == (expected is not None)
    if expected is not None:
        assert reader.content() == expected


def test_a_longest_line_that_was_dot_stuffed_is_accepted() -> None:
    longest = b"." + b"x" * (MAX_LINE - 1)  # 998 octets, sent as 999 with its stuffed dot
    for stream in (b"." + longest + b"\r\n.\r\n", b"a\r\n." + longest + b"\r\n.\r\n"):
        for cut in (0, 1, 500, len(stream) - 3):
            reader = DataReader(LIMIT)
            assert reader.feed(stream[:cut]) is None
            assert reader.feed(stream[cut:]) == len(stream) - cut
            assert reader.error is None and reader.content().endswith(longest + b"\r\n")
    reader = DataReader(LIMIT)
    reader.feed(b".." + b"x" * MAX_LINE + b"\r\n.\r\n")  # 999 octets once de-stuffed
    assert reader.error is not None and reader.error.smtp_code == 500


def test_data_reader_holds_the_message_once_after_reading_it() -> None:
    """The reader's copy and the message it returns are the same bytes: nothing is held twice
    while the spool writes it and the audit record is made durable."""
    line = b"Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod te\r\n"
    size = 4 << 20
    stream = line * (size // len(line)) + b".\r\n"
    chunks = [stream[i:i + 65536] for i in range(0, len(stream), 65536)]
    del stream
    tracemalloc.start()
    try:
        start = tracemalloc.get_traced_memory()[0]
        reader = DataReader(8 << 20)
        for chunk in chunks:
            if reader.feed(chunk) is not None:
                break
        message = reader.content()
        assert reader.content() is message
        held, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert reader.error is None and len(message) == size // len(line) * len(line)
    assert held - start < 1.05 * len(message)  # the message once (the reader keeps no copy)
    assert peak - start < 2.05 * len(message)  # its blocks, and the message they are joined to
