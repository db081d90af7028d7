"""Writing the DER of the few CMS structures the gateway makes, as pieces joined once.

Followed: X.690 §8 and §10 (DER: definite lengths in the fewest octets, INTEGER in the fewest
two's-complement octets, OBJECT IDENTIFIER arcs in base 128, §11.6 SET OF components sorted
by their encodings), RFC 5280 §4.1.2.5 (UTCTime until 2049, GeneralizedTime from 2050).

Every writer returns a list of octet strings whose concatenation is the encoding, so that a
MiB of content or ciphertext is referenced, not copied, at each level of nesting: the caller
joins the outermost list once. Small elements that must be compared (SET OF members) are
joined where they are made.

Untrusted input: none (values come from the gateway's own keys, certificates and content).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable

__all__ = [
    "NULL",
    "Pieces",
    "element",
    "integer",
    "joined",
    "length_octets",
    "object_identifier",
    "octet_string",
    "sequence",
    "set_of",
    "signing_time",
]

# Pieces of one encoding, in order; `b"".join(pieces)` is the DER.
Pieces = list[bytes]

NULL = b"\x05\x00"


def length_octets(length: int) -> bytes:
    """X.690 §10.1: the definite length in its shortest form."""
    if length < 0x80:
        return bytes([length])
    size = length.to_bytes((length.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(size)]) + size


def element(tag: int, content: Iterable[bytes]) -> Pieces:
    """One element with identifier octet `tag` around `content` (pieces, not copied)."""
    pieces = list(content)
    return [bytes([tag]) + length_octets(sum(map(len, pieces))), *pieces]


def joined(pieces: Pieces) -> bytes:
    return b"".join(pieces)


def sequence(*members: Pieces) -> Pieces:
    return element(0x30, [piece for member in members for piece in member])


def set_of(members: Iterable[bytes]) -> Pieces:
    """X.690 §11.6: the members (each a whole encoding) in ascending order of their octets."""
    return element(0x31, sorted(members))


def integer(value: int) -> Pieces:
    """X.690 §8.3: two's complement in the fewest octets."""
    magnitude = value if value >= 0 else ~value
    size = magnitude.bit_length() // 8 + 1  # one more bit for the sign
    return element(0x02, [value.to_bytes(size, "big", signed=True)])


def octet_string(data: bytes) -> Pieces:
    return element(0x04, [data])


def object_identifier(dotted: str) -> bytes:
    """X.690 §8.19: the first two arcs as 40·a + b, each arc in base 128."""
    arcs = [int(arc) for arc in dotted.split(".")]
    if len(arcs) < 2 or arcs[0] > 2 or (arcs[0] < 2 and arcs[1] >= 40):
        raise ValueError(f"not an object identifier: {dotted}")
    body = bytearray()
    for arc in [40 * arcs[0] + arcs[1], *arcs[2:]]:
        chunk = [arc & 0x7F]
        arc >>= 7
        while arc:
            chunk.append(0x80 | (arc & 0x7F))
            arc >>= 7
        body.extend(reversed(chunk))
    return joined(element(0x06, [bytes(body)]))


def signing_time(moment: dt.datetime) -> bytes:
    """RFC 5652 §11.3 Time: UTCTime for 1950-2049, GeneralizedTime otherwise (RFC 5280)."""
    moment = moment.astimezone(dt.UTC)
    if 1950 <= moment.year < 2050:
        return joined(element(0x17, [moment.strftime("%y%m%d%H%M%SZ").encode("ascii")]))
    fraction = ("." + str(moment.microsecond).zfill(6).rstrip("0")) if moment.microsecond else ""
    text = moment.strftime("%Y%m%d%H%M%S") + fraction + "Z"
    return joined(element(0x18, [text.encode("ascii")]))
