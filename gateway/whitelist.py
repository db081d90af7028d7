"""The MSSanté whitelist (`listeblanchemssante.xml`): which operator certificates may send for
which domain (DESIGN.md §1, the MSSanté trust space published by the ANS).

Format: XML in the namespace `https://listeblanche.mssante.fr/schema`, root
`ListeBlancheMSSante` → `DateDeGeneration`, `ListeDomaines` → one `Domaine` per (domain,
operator certificate): `Nom`, `Description`, `DNCertificatOperateur` (an RFC 4514 DN),
`ResponsableContact`, `SupportContact`, `DateMAJ`. A domain served by several operator servers
appears once per certificate.

Lookups are dictionary lookups both ways (domain → DNs, DN → domains), so a check per message
costs nothing whatever the size of the list. Domains compare lower-cased, without a trailing
dot, IDNA-encoded (the form `gateway.config` keeps network domains in); DNs compare by RFC
4514/4518 rules (`gateway.dn`), never as raw strings.

Untrusted input: the XML file an operator downloaded from the trust space, and its checksum
file. The official files end without their closing root tag (they stop after
`</ListeDomaines>`): that list is loaded as published and flagged `complete=False`, which
`gateway check` shows as a warning. Anything else malformed is refused with the reason: a
document cut before `</ListeDomaines>` (an interrupted download), another root element,
elements after the list, a DTD (entity declarations are how XML bombs work, and the real list
has none), a document in an encoding whose markup is not ASCII bytes (in UTF-16 a DTD would
not show as the bytes `<!DOCTYPE`). An entry whose DN cannot be read is skipped and
reported, never guessed at.
"""

from __future__ import annotations

import hashlib
import logging
import re
import xml.etree.ElementTree as ET
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from gateway.config import normalize_domain
from gateway.dn import DistinguishedName, parse_dn

__all__ = [
    "Checksum",
    "Entry",
    "MssanteWhitelist",
    "WhitelistError",
    "checksum_path",
    "last_good",
    "load_whitelist",
    "normalise_domain",
    "parse_whitelist",
    "remember",
    "verify_checksum",
]

log = logging.getLogger("gateway.whitelist")

NAMESPACE = "{https://listeblanche.mssante.fr/schema}"
_ROOT = "ListeBlancheMSSante"
_LIST = "ListeDomaines"
_ENTRY = "Domaine"
# The real list is 3.7 MB for 6,554 entries; a file a hundred times larger is not a list.
MAX_SIZE = 256 * 1024 * 1024
_NO_ELEMENTS = 3  # expat XML_ERROR_NO_ELEMENTS: the document ended with elements open
_HEX64 = re.compile(rb"\b[0-9a-fA-F]{64}\b")
_DECLARED_ENCODING = re.compile(rb"""\s*<\?xml\s[^>]*?\bencoding\s*=\s*["']([A-Za-z0-9._-]+)["']""")
# UTF-8 and the encodings whose documents are also ASCII in their markup.
_READABLE = frozenset({"utf-8", "utf8", "us-ascii", "ascii", "iso-8859-1", "latin-1", "latin1"})


class WhitelistError(ValueError):
    """The list cannot be read; the message says where and why."""


@dataclass(frozen=True)
class Entry:
    """One `Domaine` element: a domain and one operator certificate allowed to send for it."""

    domain: str  # normalised (lower case, IDNA)
    name: str  # `Nom` as written in the list
    operator: DistinguishedName
    description: str = ""
    updated: str = ""  # `DateMAJ`


@dataclass(frozen=True)
class MssanteWhitelist:
    entries: dict[str, frozenset[DistinguishedName]]
    generated: str | None = None
    complete: bool = True  # False when the closing root tag was missing (the official quirk)
    problems: tuple[str, ...] = field(default=())
    details: tuple[Entry, ...] = field(default=(), repr=False)
    by_operator: dict[DistinguishedName, frozenset[str]] = field(default_factory=dict,
                                                                 repr=False)
    sha256: str = ""  # of the octets parsed: the checksum is verified over what was loaded

    def operators(self, domain: str) -> Collection[DistinguishedName]:
        """Operator certificate DNs listed for `domain` (empty when the domain is not listed)."""
        normalised = normalise_domain(domain)
        if normalised is None:
            return frozenset()
        return self.entries.get(normalised, frozenset())

    def listed(self, domain: str, operator: DistinguishedName) -> bool:
        return operator in self.operators(domain)

    def domains_for(self, operator: DistinguishedName) -> Collection[str]:
        """Domains for which the certificate `operator` is listed (normalised)."""
        return self.by_operator.get(operator, frozenset())

    def domains(self) -> Iterator[str]:
        return iter(self.entries)

    def show(self, domain: str) -> list[Entry]:
        """The entries of one domain, for `gateway whitelist show`."""
        normalised = normalise_domain(domain)
        return [entry for entry in self.details if entry.domain == normalised]

    def __len__(self) -> int:
        return len(self.details) if self.details else sum(len(v) for v in self.entries.values())


def normalise_domain(domain: str) -> str | None:
    """`domain` as the gateway compares it (lower case, no trailing dot, IDNA-encoded, the
    rules of `gateway.config.normalize_domain`), or None when it is not a domain name."""
    if "*" in domain:
        return None  # the list names domains, never patterns
    try:
        return normalize_domain(domain)
    except ValueError:
        return None


class _Reader:
    """Streams the XML (start/end events) and keeps only what the gateway needs."""

    def __init__(self) -> None:
        self.parser: ET.XMLPullParser[ET.Element] = ET.XMLPullParser(events=("start", "end"))
        self.stack: list[str] = []
        self.generated: str | None = None
        self.list_closed = False
        self.root_closed = False
        self.entries: list[Entry] = []
        self.problems: list[str] = []
        self.dn_cache: dict[str, DistinguishedName | str] = {}  # text → DN or why not

    def feed(self, data: bytes) -> None:
        self.parser.feed(data)
        self.drain()

    def close(self) -> None:
        self.parser.close()
        self.drain()

    def drain(self) -> None:
        for item in self.parser.read_events():
            if not isinstance(item, tuple):
                continue  # only start/end events are asked for; anything else is not ours
            event, element = item[0], item[-1]
            if not isinstance(element, ET.Element):
                continue
            tag = element.tag.removeprefix(NAMESPACE)
            if event == "start":
                self.start(tag, element)
            else:
                self.end(tag, element)

    def start(self, tag: str, element: ET.Element) -> None:
        if not self.stack:
            if element.tag != NAMESPACE + _ROOT:
                raise WhitelistError(
                    f"this is not an MSSanté whitelist: its root element is {element.tag!r}, "
                    f"not {_ROOT} in the namespace {NAMESPACE[1:-1]}"
                )
        elif self.list_closed and len(self.stack) == 1:
            raise WhitelistError(f"unexpected element {tag} after </{_LIST}>")
        self.stack.append(tag)

    def end(self, tag: str, element: ET.Element) -> None:
        depth = len(self.stack)
        self.stack.pop()
        if depth == 1:
            self.root_closed = True
        elif depth == 2 and tag == "DateDeGeneration":
            self.generated = (element.text or "").strip()
        elif depth == 2 and tag == _LIST:
            self.list_closed = True
            element.clear()
        elif depth == 3 and tag == _ENTRY and self.stack[-1] == _LIST:
            self.entry(element)
            element.clear()  # keeps memory flat whatever the size of the list

    def entry(self, element: ET.Element) -> None:
        def text(name: str) -> str:
            return (element.findtext(NAMESPACE + name) or "").strip()

        name, dn_text = text("Nom"), text("DNCertificatOperateur")
        number = len(self.entries) + len(self.problems) + 1
        if not name or not dn_text:
            self.problems.append(f"entry {number} lacks Nom or DNCertificatOperateur")
            return
        domain = normalise_domain(name)
        if domain is None:
            self.problems.append(f"entry {number}: {name!r} is not a domain name")
            return
        operator = self.dn_cache.get(dn_text)
        if operator is None:
            try:
                operator = parse_dn(dn_text)
            except ValueError as error:
                operator = str(error)
            self.dn_cache[dn_text] = operator
        if isinstance(operator, str):
            self.problems.append(f"domain {name}: DNCertificatOperateur {operator}")
            return
        self.entries.append(Entry(domain, name, operator, text("Description"), text("DateMAJ")))


def parse_whitelist(data: bytes) -> MssanteWhitelist:
    """Read the list from its bytes; WhitelistError says why it cannot be used."""
    if len(data) > MAX_SIZE:
        raise WhitelistError(f"the file is {len(data)} bytes, too large for an MSSanté whitelist")
    # The list is published in UTF-8. In UTF-16 or UTF-32 every ASCII character carries NUL
    # bytes, so the DTD check below would not see `<!DOCTYPE`: such documents, and any other
    # declared encoding than UTF-8 or an ASCII-compatible one, are refused first.
    declared = _DECLARED_ENCODING.match(data.removeprefix(b"\xef\xbb\xbf"))
    if b"\x00" in data or data.startswith((b"\xff\xfe", b"\xfe\xff")) or (
        declared is not None and declared.group(1).decode("ascii").lower() not in _READABLE
    ):
        raise WhitelistError("the file is not in UTF-8, the encoding the MSSanté list is "
                             "published in")
    # The list never has a DTD; refusing one rules out entity expansion attacks (billion
    # laughs) before the XML parser sees the document.
    if b"<!DOCTYPE" in data or b"<!ENTITY" in data:
        raise WhitelistError("the file declares a DTD, which an MSSanté whitelist never does")
    reader = _Reader()
    complete = True
    try:
        reader.feed(data)
        reader.close()
    except ET.ParseError as error:
        # The official quirk: the document stops right after </ListeDomaines>, with only the
        # root element still open and nothing but spaces after it (expat: "no element found",
        # code 3, at close). Anything cut earlier is an incomplete download.
        quirk = reader.list_closed and reader.stack == [_ROOT] and error.code == _NO_ELEMENTS
        if not quirk:
            line = error.position[0]
            if reader.stack and not reader.list_closed:
                raise WhitelistError(
                    f"the list is cut short at line {line} (inside {'/'.join(reader.stack)}): "
                    "the download was probably interrupted"
                ) from None
            raise WhitelistError(f"the whitelist is not well-formed XML: {error}") from None
        complete = False
    if not reader.list_closed:
        raise WhitelistError(f"the whitelist has no {_LIST} element")
    if not reader.entries:
        raise WhitelistError(f"the whitelist contains no usable {_ENTRY} entry")
    by_domain: dict[str, set[DistinguishedName]] = {}
    by_operator: dict[DistinguishedName, set[str]] = {}
    for entry in reader.entries:
        by_domain.setdefault(entry.domain, set()).add(entry.operator)
        by_operator.setdefault(entry.operator, set()).add(entry.domain)
    return MssanteWhitelist(
        {domain: frozenset(dns) for domain, dns in by_domain.items()},
        generated=reader.generated,
        complete=complete,
        problems=tuple(reader.problems),
        details=tuple(reader.entries),
        by_operator={dn: frozenset(domains) for dn, domains in by_operator.items()},
        sha256=hashlib.sha256(data).hexdigest(),
    )


def load_whitelist(path: Path) -> MssanteWhitelist:
    try:
        data = path.read_bytes()
    except OSError as error:
        raise WhitelistError(f"cannot read {path}: {error.strerror}") from None
    return parse_whitelist(data)


# -- checksum -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Checksum:
    """The outcome of checking the list against its published SHA-256."""

    path: Path | None  # the checksum file found, None when there is none (it is optional)
    ok: bool
    message: str


def checksum_path(path: Path) -> Path | None:
    """The checksum file of a list: `<list>.sha256`, or `checksum` beside a list named
    `listeblanchemssante.xml` (the layout of the ANS repository)."""
    candidates = [path.with_name(path.name + ".sha256")]
    if path.name == "listeblanchemssante.xml":
        candidates.append(path.with_name("checksum"))
    return next((c for c in candidates if c.exists()), None)


def verify_checksum(path: Path, loaded: MssanteWhitelist | None = None) -> Checksum:
    """Compare the list with its published digest: the digest of the octets `loaded` was
    parsed from when given (so a list replaced between loading and checking cannot pass on
    the new file's digest), otherwise of the file as it is now."""
    found = checksum_path(path)
    if found is None:
        return Checksum(None, True, "no checksum file")
    try:
        expected_text = found.read_bytes()
        actual = loaded.sha256 if loaded is not None and loaded.sha256 else (
            hashlib.sha256(path.read_bytes()).hexdigest())
    except OSError as error:
        return Checksum(found, False, f"cannot read {error.filename}: {error.strerror}")
    # `sha256sum` writes "<hex>  <name>"; the ANS file holds the bare hex digest.
    match = _HEX64.search(expected_text)
    if match is None:
        return Checksum(found, False, f"{found.name} holds no SHA-256 digest")
    expected = match.group(0).decode("ascii").lower()
    if actual != expected:
        return Checksum(found, False, f"the SHA-256 of {path.name} is {actual}, but {found.name} "
                        f"says {expected}")
    return Checksum(found, True, f"matches {found.name}")


# -- the last good list ---------------------------------------------------------------------

# Path → the last list that loaded at that path in this process. A reload whose new list is
# broken keeps serving with this one (and says so loudly) instead of either serving with no
# list, which would refuse every MSSanté peer, or silently serving a list nobody checked.
_LAST_GOOD: dict[Path, MssanteWhitelist] = {}


def remember(path: Path, whitelist: MssanteWhitelist) -> None:
    _LAST_GOOD[path.resolve()] = whitelist


def last_good(path: Path) -> MssanteWhitelist | None:
    return _LAST_GOOD.get(path.resolve())
