"""Distinguished names: RFC 4514 strings and X.509 names, compared the RFC 4518 way.

Peers are authorized by their certificate's full subject DN (DESIGN.md §10 "Peers"), as the
operator wrote it in routing.yaml or as the MSSanté whitelist lists it. Two spellings of the same
name must compare equal, two different names never:

- attribute types compare by OID, whatever the alias (`E`, `EMAIL`, `emailAddress`,
  `1.2.840.113549.1.9.1`; `ST`, `S`, `stateOrProvinceName`; `OID.2.5.4.3`);
- values compare after RFC 4518 preparation: compatibility normalisation (NFKC), case folding,
  and insignificant space handling (leading and trailing spaces dropped, inner runs collapsed);
- the attributes of a multi-valued RDN (`CN=a+UID=b`) compare as a set;
- RDNs compare in the order written. RFC 4514 writes the most specific RDN first, that is the
  reverse of the DER sequence: `dn_from_name` reverses `x509.Name.rdns` so that a certificate's
  subject compares equal to `CN=...,OU=...,O=...,ST=...,C=FR` as the whitelist writes it.

Untrusted input: DN strings from routing.yaml and from the downloaded MSSanté whitelist, and the
subject names of certificates presented by TLS peers. The parser is lenient where real files
are (spaces after separators, `;` as a separator, RFC 2253 quoted values such as
`O="C.H. DE  CADILLAC"`, a stray `"` inside a value) and strict where leniency would make two
names ambiguous: a bad escape, a missing `=`, an unknown attribute name or an empty value
raise ValueError saying where.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, field

from cryptography import x509

__all__ = ["DistinguishedName", "dn_from_name", "parse_dn"]

# Attribute type names (upper-cased) → OID. The short names are those of RFC 4514 §3 and
# RFC 4519, plus the spellings OpenSSL, Windows and Java print (E, EMAIL, S, SERIALNUMBER).
_NAMES: dict[str, str] = {
    "CN": "2.5.4.3",
    "COMMONNAME": "2.5.4.3",
    "SN": "2.5.4.4",
    "SURNAME": "2.5.4.4",
    "SERIALNUMBER": "2.5.4.5",
    "C": "2.5.4.6",
    "COUNTRYNAME": "2.5.4.6",
    "L": "2.5.4.7",
    "LOCALITYNAME": "2.5.4.7",
    "ST": "2.5.4.8",
    "S": "2.5.4.8",
    "STATEORPROVINCENAME": "2.5.4.8",
    "STREET": "2.5.4.9",
    "STREETADDRESS": "2.5.4.9",
    "O": "2.5.4.10",
    "ORGANIZATIONNAME": "2.5.4.10",
    "OU": "2.5.4.11",
    "ORGANIZATIONALUNITNAME": "2.5.4.11",
    "T": "2.5.4.12",
    "TITLE": "2.5.4.12",
    "BUSINESSCATEGORY": "2.5.4.15",
    "POSTALCODE": "2.5.4.17",
    "NAME": "2.5.4.41",
    "GN": "2.5.4.42",
    "G": "2.5.4.42",
    "GIVENNAME": "2.5.4.42",
    "INITIALS": "2.5.4.43",
    "GENERATIONQUALIFIER": "2.5.4.44",
    "X500UNIQUEIDENTIFIER": "2.5.4.45",
    "DNQUALIFIER": "2.5.4.46",
    "PSEUDONYM": "2.5.4.65",
    "ORGANIZATIONIDENTIFIER": "2.5.4.97",
    "DC": "0.9.2342.19200300.100.1.25",
    "DOMAINCOMPONENT": "0.9.2342.19200300.100.1.25",
    "UID": "0.9.2342.19200300.100.1.1",
    "USERID": "0.9.2342.19200300.100.1.1",
    "E": "1.2.840.113549.1.9.1",
    "EMAIL": "1.2.840.113549.1.9.1",
    "EMAILADDRESS": "1.2.840.113549.1.9.1",
}

# OID → the name printed by `str()`: RFC 4514's short names, and the OpenSSL spellings for the
# others, which operators meet in `openssl x509 -subject` output.
_DISPLAY: dict[str, str] = {
    "2.5.4.3": "CN",
    "2.5.4.4": "SN",
    "2.5.4.5": "serialNumber",
    "2.5.4.6": "C",
    "2.5.4.7": "L",
    "2.5.4.8": "ST",
    "2.5.4.9": "STREET",
    "2.5.4.10": "O",
    "2.5.4.11": "OU",
    "2.5.4.12": "title",
    "2.5.4.15": "businessCategory",
    "2.5.4.17": "postalCode",
    "2.5.4.41": "name",
    "2.5.4.42": "GN",
    "2.5.4.43": "initials",
    "2.5.4.44": "generationQualifier",
    "2.5.4.45": "x500UniqueIdentifier",
    "2.5.4.46": "dnQualifier",
    "2.5.4.65": "pseudonym",
    "2.5.4.97": "organizationIdentifier",
    "0.9.2342.19200300.100.1.25": "DC",
    "0.9.2342.19200300.100.1.1": "UID",
    "1.2.840.113549.1.9.1": "emailAddress",
}

_KEYSTRING = re.compile(r"[A-Za-z][A-Za-z0-9-]*\Z")
_NUMERICOID = re.compile(r"(?:0|[1-9][0-9]*)(?:\.(?:0|[1-9][0-9]*))+\Z")
_HEX = re.compile(r"(?:[0-9A-Fa-f]{2})+\Z")

# RFC 4518 §2.2: characters mapped to SPACE, and characters mapped to nothing.
_SPACES = frozenset("\t\n\x0b\x0c\r\x85\xa0\u1680\u2028\u2029\u202f\u205f\u3000") | frozenset(
    chr(c) for c in range(0x2000, 0x200B)
)
_IGNORED = (
    frozenset("\xad\u180e\u200b\u200c\u200d\u2060\ufeff")
    | frozenset(chr(c) for c in range(0xFE00, 0xFE10))
    | frozenset(chr(c) for c in (*range(0x00, 0x09), *range(0x0E, 0x20), *range(0x7F, 0x85)))
    | frozenset(chr(c) for c in range(0x86, 0xA0))
)

_ESCAPED = frozenset('"+,;<>\\=')  # `=` is escaped on output too, for readers stricter than us


# A value is a string, or bytes when it is not a character string (RFC 4514 `#hex` form).
Value = str | bytes


@dataclass(frozen=True)
class _Attribute:
    oid: str
    value: Value  # as written or as in the certificate; only `key` takes part in comparisons

    @property
    def key(self) -> tuple[str, str]:
        return self.oid, _prepare(self.value)

    def __str__(self) -> str:
        name = _DISPLAY.get(self.oid, self.oid)
        if isinstance(self.value, bytes):
            return f"{name}=#{self.value.hex()}"
        return f"{name}={_escape(self.value)}"


@dataclass(frozen=True)
class DistinguishedName:
    """A DN in RFC 4514 order (most specific RDN first).

    Equality and hashing use the RFC 4518-prepared form only, so a DN read from routing.yaml,
    from the whitelist and from a certificate can be looked up in one set. `str()` gives an RFC
    4514 string with canonical attribute names and the values' own case, which `parse_dn` reads
    back to an equal DN.
    """

    rdns: tuple[tuple[_Attribute, ...], ...] = field(compare=False)
    key: tuple[frozenset[tuple[str, str]], ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "key", tuple(frozenset(a.key for a in rdn) for rdn in self.rdns)
        )

    def __str__(self) -> str:
        return ",".join(
            "+".join(str(a) for a in sorted(rdn, key=lambda a: a.key)) for rdn in self.rdns
        )

    def get(self, attribute: str) -> tuple[str, ...]:
        """Values of one attribute type (`"CN"`, `"OU"`, an OID...), in the order written."""
        oid = _oid_of(attribute)
        return tuple(
            a.value if isinstance(a.value, str) else "#" + a.value.hex()
            for rdn in self.rdns
            for a in rdn
            if a.oid == oid
        )


def _oid_of(name: str) -> str:
    text = name.strip()
    if text[:4].upper() == "OID.":
        text = text[4:]
    if _NUMERICOID.match(text):
        return text
    oid = _NAMES.get(text.upper())
    if oid is None:
        raise ValueError(f"unknown attribute type {name.strip()!r}")
    return oid


def _prepare(value: Value) -> str:
    """RFC 4518 string preparation for caseIgnoreMatch, in the order §2 gives."""
    if isinstance(value, bytes):
        return "#" + value.hex()
    mapped = "".join(
        " " if ch in _SPACES else ch for ch in value if ch not in _IGNORED
    )
    folded = unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", mapped).casefold())
    return " ".join(part for part in folded.split(" ") if part)


def _escape(value: str) -> str:
    """RFC 4514 §2.4 escaping of an attribute value."""
    out: list[str] = []
    for index, ch in enumerate(value):
        if ch in _ESCAPED:
            out.append("\\" + ch)
        elif ch == "\x00":
            out.append("\\00")
        elif (index == 0 and ch in " #") or (index == len(value) - 1 and ch == " "):
            out.append("\\" + ch)
        else:
            out.append(ch)
    return "".join(out)


# -- reading RFC 4514 strings -----------------------------------------------------------------


class _Parser:
    """A one-pass reader of an RFC 4514 string (with the RFC 2253/1779 leniencies above)."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def fail(self, message: str) -> ValueError:
        return ValueError(f"{message} at character {self.pos + 1} of {self.text!r}")

    def peek(self) -> str:
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def skip_spaces(self) -> None:
        while self.peek() == " ":
            self.pos += 1

    def parse(self) -> DistinguishedName:
        rdns: list[tuple[_Attribute, ...]] = []
        current: list[_Attribute] = []
        while True:
            current.append(self.attribute())
            separator = self.peek()
            if separator == "":
                break
            self.pos += 1
            if separator == "+":
                continue
            rdns.append(tuple(current))
            current = []
        rdns.append(tuple(current))
        return DistinguishedName(tuple(rdns))

    def attribute(self) -> _Attribute:
        self.skip_spaces()
        start = self.pos
        equals = self.text.find("=", start)
        if equals < 0:
            raise self.fail("expected TYPE=value (no '=' found)")
        type_text = self.text[start:equals].strip()
        if not type_text:
            raise self.fail("an attribute type is missing before '='")
        bare = type_text[4:] if type_text[:4].upper() == "OID." else type_text
        if not (_KEYSTRING.match(bare) or _NUMERICOID.match(bare)) or any(
            c in type_text for c in ",+;"
        ):
            raise self.fail(f"{type_text!r} is not an attribute type")
        try:
            oid = _oid_of(type_text)
        except ValueError as error:
            raise self.fail(str(error)) from None
        self.pos = equals + 1
        self.skip_spaces()
        value = self.value()
        return _Attribute(oid, value)

    def value(self) -> Value:
        first = self.peek()
        if first == "#":
            return self.hex_value()
        if first == '"':
            return self.quoted_value()
        return self.string_value()

    def at_end_of_value(self) -> bool:
        return self.peek() in ("", ",", ";", "+")

    def hex_value(self) -> Value:
        self.pos += 1
        start = self.pos
        while not self.at_end_of_value() and self.peek() != " ":
            self.pos += 1
        digits = self.text[start:self.pos]
        self.skip_spaces()
        if not self.at_end_of_value():
            raise self.fail("unexpected text after a #hex value")
        if not _HEX.match(digits):
            raise self.fail("a value starting with '#' must be hexadecimal BER (escape the '#')")
        return _decode_ber_string(bytes.fromhex(digits))

    def quoted_value(self) -> str:
        self.pos += 1
        raw = bytearray()
        while True:
            ch = self.peek()
            if ch == "":
                raise self.fail("a quoted value is not closed")
            if ch == '"':
                self.pos += 1
                break
            if ch == "\\":
                raw += self.escape()
            else:
                raw += ch.encode("utf-8")
                self.pos += 1
        self.skip_spaces()
        if not self.at_end_of_value():
            raise self.fail("unexpected text after a quoted value")
        return self.decode(raw)

    def string_value(self) -> str:
        raw = bytearray()
        # Unescaped trailing spaces are not part of the value (RFC 4514 §3); escaped ones are.
        significant = 0
        while not self.at_end_of_value():
            ch = self.peek()
            if ch == "\\":
                raw += self.escape()
                significant = len(raw)
            else:
                raw += ch.encode("utf-8")
                self.pos += 1
                if ch != " ":
                    significant = len(raw)
        del raw[significant:]
        if not raw:
            raise self.fail("an attribute value is empty")
        return self.decode(raw)

    def escape(self) -> bytes:
        """`\\` followed by a special character or by two hex digits (one UTF-8 byte)."""
        pair = self.text[self.pos + 1:self.pos + 3]
        if len(pair) == 2 and _HEX.match(pair):
            self.pos += 3
            return bytes.fromhex(pair)
        ch = self.text[self.pos + 1:self.pos + 2]
        if ch and ch in '"+,;<>\\=# ':
            self.pos += 2
            return ch.encode("utf-8")
        raise self.fail("a backslash must be followed by one of \" + , ; < > \\ = # space "
                        "or two hex digits")

    def decode(self, raw: bytearray) -> str:
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail("hex escapes do not form valid UTF-8") from None


def _decode_ber_string(data: bytes) -> Value:
    """The character string inside a BER-encoded value, or the bytes if it is not one."""
    if len(data) < 2 or data[1] >= 0x80:
        # Long-form lengths only occur for values over 127 bytes; keep those as raw bytes
        # rather than grow a BER reader here: no certificate subject we compare needs it.
        return data
    tag, length, content = data[0], data[1], data[2:]
    if length != len(content):
        return data
    codecs = {
        0x0C: "utf-8",  # UTF8String
        0x12: "ascii",  # NumericString
        0x13: "ascii",  # PrintableString
        0x14: "latin-1",  # TeletexString, as cryptography and OpenSSL treat it
        0x16: "ascii",  # IA5String
        0x1A: "ascii",  # VisibleString
        0x1C: "utf-32-be",  # UniversalString
        0x1E: "utf-16-be",  # BMPString
    }
    codec = codecs.get(tag)
    if codec is None:
        return data
    try:
        return content.decode(codec)
    except UnicodeDecodeError:
        return data


def parse_dn(text: str) -> DistinguishedName:
    """Read an RFC 4514 DN (`CN=mx.example.fr,OU=...,O=...,C=FR`, most specific first).

    Raises ValueError with a sentence saying what is wrong and where. An empty string is
    refused: it names nobody, and a peer rule or whitelist entry that names nobody is a mistake.
    """
    if not isinstance(text, str):
        raise ValueError(f"a distinguished name must be text, not {type(text).__name__}")
    if not text.strip():
        raise ValueError("a distinguished name cannot be empty")
    return _Parser(text).parse()


def dn_from_name(name: x509.Name) -> DistinguishedName:
    """The DN of a certificate's subject or issuer, in RFC 4514 order."""
    rdns = tuple(
        tuple(_Attribute(attribute.oid.dotted_string, attribute.value) for attribute in rdn)
        for rdn in reversed(name.rdns)
    )
    return DistinguishedName(rdns)
