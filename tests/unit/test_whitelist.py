"""The MSSanté whitelist: the real published files, their quirks, malformed lists, lookups,
the checksum file, `gateway check`, `gateway whitelist show`, and keeping the last good list."""

from __future__ import annotations

import hashlib
import logging
import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from gateway import cli
from gateway.check import run_check
from gateway.dn import parse_dn
from gateway.runtime import ConfigurationRefused, Runtime
from gateway.whitelist import (
    WhitelistError,
    checksum_path,
    load_whitelist,
    parse_whitelist,
    verify_checksum,
)
from tests.support import testpki

DATA = Path(__file__).resolve().parents[3] / "shared" / "data" / "mssante"  # beside the repo
SMALL = DATA / "listeblanchemssante.xml"
LARGE = DATA / "listeblanchemssante-large.xml"
DEDALUS = "CN=smtp-1.sante.santnet.com,OU=341459958900028,O=DEDALUS HEALTHCARE FRANCE," \
          "ST=Gironde (33),C=FR"


def document(*entries: tuple[str, str], closed: bool = True, head: str = "") -> bytes:
    body = "".join(
        f"<Domaine><Nom>{name}</Nom><Description>d</Description>"
        f"<DNCertificatOperateur>{dn}</DNCertificatOperateur>"
        f"<DateMAJ>2025-03-13T14:54:10Z</DateMAJ></Domaine>"
        for name, dn in entries
    )
    text = (
        f'<?xml version="1.0" encoding="UTF-8"?>{head}'
        '<ListeBlancheMSSante xmlns="https://listeblanche.mssante.fr/schema">'
        "<DateDeGeneration>2025-03-13T14:54:10Z</DateDeGeneration>"
        f"<ListeDomaines>{body}</ListeDomaines>\n"
        + ("</ListeBlancheMSSante>\n" if closed else "")
    )
    return text.encode()


# -- the real files ---------------------------------------------------------------------------


class NoWalk(dict):  # type: ignore[type-arg]
    """A dict that refuses to be iterated: only keyed access is allowed."""

    def __iter__(self):  # type: ignore[no-untyped-def]
        raise AssertionError("the whitelist was walked for a lookup")

    def keys(self):  # type: ignore[no-untyped-def]
        raise AssertionError("the whitelist was walked for a lookup")

    def values(self):  # type: ignore[no-untyped-def]
        raise AssertionError("the whitelist was walked for a lookup")

    def items(self):  # type: ignore[no-untyped-def]
        raise AssertionError("the whitelist was walked for a lookup")


class _Unwalkable(tuple):  # type: ignore[type-arg]
    def __iter__(self):  # type: ignore[no-untyped-def]
        raise AssertionError("the whitelist entries were walked for a lookup")


def test_small_real_list_loads_as_published() -> None:
    whitelist = load_whitelist(SMALL)
    assert len(whitelist) == 619  # data/mssante/SOURCE.md
    assert len(whitelist.entries) == 516
    assert len(whitelist.by_operator) == 35
    assert whitelist.complete is False  # the missing </ListeBlancheMSSante>
    assert whitelist.problems == ()
    assert whitelist.generated == "2025-03-13T14:54:10Z"


def test_large_real_list_loads_fast_and_lookups_cost_nothing() -> None:
    # Load time is measured in bench/, not asserted here (machines are noisy).
    whitelist = load_whitelist(LARGE)
    # 6,554 entries (SOURCE.md); one names `sessad@ase.ditepbeziers.mssante.fr`, which is not a
    # domain: it is skipped and reported rather than guessed at.
    assert len(whitelist) == 6553
    [problem] = whitelist.problems
    assert "sessad@ase.ditepbeziers.mssante.fr" in problem
    # 392 distinct DN strings; some differ only in insignificant spaces (RFC 4518).
    assert len(whitelist.by_operator) <= 392
    # A lookup is one dictionary access, whatever the size of the list: it never walks the
    # entries (both would fail here if it did).
    dn = parse_dn(DEDALUS)
    indexed = replace(whitelist, entries=NoWalk(whitelist.entries),
                      details=_Unwalkable(), by_operator=NoWalk(whitelist.by_operator))
    assert dn in indexed.operators("15-20.mssante.fr")
    assert indexed.listed("15-20.MSSANTE.FR.", dn)
    assert "15-20.mssante.fr" in indexed.domains_for(dn)
    assert not indexed.operators("absent.mssante.fr")


def test_several_operators_for_one_domain() -> None:
    operators = load_whitelist(SMALL).operators("15-20.mssante.fr")
    assert len(operators) == 5
    assert parse_dn(DEDALUS) in operators


def test_domains_compare_case_insensitively_and_without_trailing_dot() -> None:
    whitelist = load_whitelist(SMALL)
    listed = whitelist.operators("uc-cmp.mssante.fr")
    assert listed  # written `UC-CMP.mssante.fr` in the list
    assert whitelist.operators("UC-CMP.MSSANTE.FR.") == listed
    assert whitelist.operators("unknown.mssante.fr") == frozenset()
    assert whitelist.operators("") == frozenset()


def test_idna_domains_match_in_either_form() -> None:
    dn = "CN=mx.op.test,OU=1750000001,O=OP,ST=Paris (75),C=FR"
    whitelist = parse_whitelist(document(("hôpital-sud.mssante.fr", dn)))
    assert whitelist.operators("xn--hpital-sud-rbb.mssante.fr") == {parse_dn(dn)}
    assert whitelist.operators("HÔPITAL-SUD.mssante.fr") == {parse_dn(dn)}


def test_dns_compare_by_rfc4518_not_as_strings() -> None:
    whitelist = parse_whitelist(document(
        ("a.mssante.fr", "CN=mx.op.test, OU=1750000001, O=Centre  Hospitalier, ST=Paris (75), C=FR"),
    ))
    certificate_like = parse_dn("cn=MX.OP.TEST,ou=1750000001,o=centre hospitalier,"
                                "stateOrProvinceName=paris (75),c=fr")
    assert whitelist.listed("a.mssante.fr", certificate_like)
    # The same attributes in another order name someone else (RDN order is significant).
    reordered = parse_dn("OU=1750000001,CN=mx.op.test,O=Centre Hospitalier,ST=Paris (75),C=FR")
    assert not whitelist.listed("a.mssante.fr", reordered)
    # Same CN, another organisation: not listed (never the CN alone).
    twin = parse_dn("CN=mx.op.test,OU=1990000000,O=AUTRE,ST=Paris (75),C=FR")
    assert not whitelist.listed("a.mssante.fr", twin)


def test_reverse_index_for_the_null_sender() -> None:
    whitelist = load_whitelist(SMALL)
    domains = whitelist.domains_for(parse_dn(DEDALUS))
    assert "15-20.mssante.fr" in domains
    assert "apta78.mssante.fr" in domains


def test_show_gives_the_entries_of_a_domain() -> None:
    entries = load_whitelist(SMALL).show("15-20.MSSANTE.FR")
    assert len(entries) == 5
    assert all(e.domain == "15-20.mssante.fr" and e.updated for e in entries)


# -- malformed lists --------------------------------------------------------------------------


def test_tidy_list_with_its_closing_tag_is_complete() -> None:
    whitelist = parse_whitelist(document(("a.mssante.fr", DEDALUS)))
    assert whitelist.complete is True


@pytest.mark.parametrize(("data", "words"), [
    (SMALL.read_bytes()[:200_000], "cut short"),  # an interrupted download
    (b"<nope", "not well-formed"),
    (b"", "not well-formed"),
    (document(("a.mssante.fr", DEDALUS)).replace(b"ListeBlancheMSSante", b"Autre"),
     "not an MSSanté whitelist"),
    (document(("a.mssante.fr", DEDALUS)).replace(b'xmlns="https://listeblanche.mssante.fr/schema"',
                                                 b""), "not an MSSanté whitelist"),
    (document(("a.mssante.fr", DEDALUS), closed=False) + b"<Domaine/>", "after </ListeDomaines>"),
    (document(("a.mssante.fr", DEDALUS), closed=False) + b"garbage <", "not well-formed"),
    (document(), "no usable Domaine"),
    (document(("a.mssante.fr", DEDALUS),
              head='<!DOCTYPE l [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;">]>'), "DTD"),
])
def test_broken_lists_are_refused_with_a_reason(data: bytes, words: str) -> None:
    with pytest.raises(WhitelistError, match=words):
        parse_whitelist(data)


def _with_entity(encoding: str) -> bytes:
    """A list whose domain name comes from an internal entity, in `encoding`."""
    text = document(("&evil;", DEDALUS), head='<!DOCTYPE l [<!ENTITY evil "evil.mssante.fr">]>')
    return text.decode().replace('encoding="UTF-8"', f'encoding="{encoding}"').encode(encoding)


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "utf-16-be", "utf-32"])
def test_a_dtd_is_refused_whatever_the_encoding(encoding: str) -> None:
    # Not only the bytes `<!DOCTYPE` in UTF-8: the same declaration in UTF-16 must not reach
    # the XML parser either (entity expansion is how XML bombs work).
    with pytest.raises(WhitelistError, match="UTF-8"):
        parse_whitelist(_with_entity(encoding))


def test_declared_encodings_other_than_utf8_and_its_subsets_are_refused() -> None:
    tidy = document(("a.mssante.fr", DEDALUS))
    for encoding in (b"us-ascii", b"ISO-8859-1", b"utf-8"):
        assert parse_whitelist(tidy.replace(b'encoding="UTF-8"', b'encoding="%s"' % encoding))
    with pytest.raises(WhitelistError, match="UTF-8"):
        parse_whitelist(tidy.replace(b'encoding="UTF-8"', b'encoding="UTF-16"'))


def test_entries_that_cannot_be_read_are_skipped_and_reported() -> None:
    whitelist = parse_whitelist(document(
        ("a.mssante.fr", DEDALUS), ("b.mssante.fr", "CN=x,NOPE=y"), ("", DEDALUS),
        ("c..mssante.fr" * 30, DEDALUS),
    ))
    assert set(whitelist.entries) == {"a.mssante.fr"}
    assert len(whitelist.problems) == 3
    assert "b.mssante.fr" in whitelist.problems[0]


def test_domaine_outside_liste_domaines_is_ignored() -> None:
    data = document(("a.mssante.fr", DEDALUS)).replace(
        b"<ListeDomaines>",
        b"<Autre><Domaine><Nom>evil.mssante.fr</Nom><DNCertificatOperateur>CN=evil"
        b"</DNCertificatOperateur></Domaine></Autre><ListeDomaines>",
    )
    assert set(parse_whitelist(data).entries) == {"a.mssante.fr"}


# -- checksum ---------------------------------------------------------------------------------


def test_official_checksum_file_verifies(tmp_path: Path) -> None:
    shutil.copyfile(SMALL, tmp_path / "listeblanchemssante.xml")
    shutil.copyfile(DATA / "checksum", tmp_path / "checksum")
    result = verify_checksum(tmp_path / "listeblanchemssante.xml")
    assert result.ok and result.path == tmp_path / "checksum"


def test_checksum_is_of_the_octets_that_were_loaded(tmp_path: Path) -> None:
    listing = tmp_path / "liste.xml"
    listing.write_bytes(document(("a.mssante.fr", DEDALUS)))
    loaded = load_whitelist(listing)
    # The file is replaced after loading by one that matches its published digest.
    other = document(("evil.mssante.fr", DEDALUS))
    listing.write_bytes(other)
    (tmp_path / "liste.xml.sha256").write_text(hashlib.sha256(other).hexdigest())
    assert verify_checksum(listing).ok  # the file as it is now
    refused = verify_checksum(listing, loaded)  # what the gateway actually serves with
    assert not refused.ok and "liste.xml.sha256" in refused.message


def test_sha256_file_beside_any_list_name(tmp_path: Path) -> None:
    listing = tmp_path / "liste.xml"
    listing.write_bytes(document(("a.mssante.fr", DEDALUS)))
    assert checksum_path(listing) is None
    assert verify_checksum(listing).ok  # optional
    (tmp_path / "checksum").write_text("0" * 64)  # only for the official name
    assert checksum_path(listing) is None
    digest = hashlib.sha256(listing.read_bytes()).hexdigest()
    (tmp_path / "liste.xml.sha256").write_text(f"{digest.upper()}  liste.xml\n")
    assert verify_checksum(listing).ok
    listing.write_bytes(listing.read_bytes() + b" ")
    result = verify_checksum(listing)
    assert not result.ok and "says" in result.message
    (tmp_path / "liste.xml.sha256").write_text("not a digest")
    assert "no SHA-256" in verify_checksum(listing).message


# -- gateway check, whitelist show, reload -----------------------------------------------------


ROUTING = """\
version: 1
gateway:
  hostname: passerelle.test
  listen:
    - {address: 127.0.0.1, port: 2525, tls: none}
  spool: {path: var/spool}
trust:
  mssante_whitelist: data/listeblanchemssante.xml
networks:
  mssante:
    adapter: mime
    domains: ["*.mssante.fr"]
    peers: {whitelist: mssante}
  local:
    adapter: mime
    domains: [local.test]
    peers: {addresses: [127.0.0.1]}
    relay: {host: 127.0.0.1, port: 2601, tls: none}
routes:
  - {from: mssante, to: [local]}
"""


def site(tmp_path: Path, checksum: bool = True) -> Path:
    (tmp_path / "data").mkdir()
    shutil.copyfile(SMALL, tmp_path / "data" / "listeblanchemssante.xml")
    if checksum:
        shutil.copyfile(DATA / "checksum", tmp_path / "data" / "checksum")
    config = tmp_path / "routing.yaml"
    config.write_text(ROUTING)
    return config


def whitelist_messages(config: Path) -> list[str]:
    report = run_check(config, testpki.NOW)
    return [f"{p.severity}: {p.message}" for p in report.problems
            if "mssante_whitelist" in p.message]


def test_check_warns_about_the_missing_closing_tag_only(tmp_path: Path) -> None:
    config = site(tmp_path)
    [message] = whitelist_messages(config)
    assert message.startswith("warning: trust.mssante_whitelist: the list ends without its "
                              "closing </ListeBlancheMSSante> tag")
    assert run_check(config, testpki.NOW).ok


def test_check_refuses_a_list_that_does_not_match_its_checksum(tmp_path: Path) -> None:
    config = site(tmp_path)
    listing = tmp_path / "data" / "listeblanchemssante.xml"
    listing.write_bytes(listing.read_bytes().replace(b"adsea29", b"adsea99"))
    messages = whitelist_messages(config)
    assert any(m.startswith("error:") and "SHA-256" in m for m in messages), messages
    assert not run_check(config, testpki.NOW).ok


def test_check_refuses_a_list_that_does_not_parse(tmp_path: Path) -> None:
    config = site(tmp_path, checksum=False)
    (tmp_path / "data" / "listeblanchemssante.xml").write_bytes(SMALL.read_bytes()[:1000])
    [message] = whitelist_messages(config)
    assert message.startswith("error: trust.mssante_whitelist: the list is cut short")
    assert "download it again" in message


def test_whitelist_show_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = site(tmp_path)
    assert cli.main(["whitelist", "show", "15-20.MSSANTE.fr", "-c", str(config)]) == 0
    out = capsys.readouterr().out
    assert "network:   mssante (checks the list)" in out
    assert out.count("operator:  ") == 5
    assert f"operator:  {parse_dn(DEDALUS)}" in out
    assert "checksum: matches checksum" in out
    assert cli.main(["whitelist", "show", "absent.mssante.fr", "-c", str(config)]) == 1
    assert "is not in the MSSanté list" in capsys.readouterr().err


def test_reload_keeps_the_last_good_list_loudly(
    tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    config = site(tmp_path, checksum=False)
    listing = tmp_path / "data" / "listeblanchemssante.xml"
    first = Runtime.load(config, testpki.NOW)
    assert first.whitelist is not None and first.whitelist.operators("15-20.mssante.fr")
    # A new, good list is taken on reload.
    listing.write_bytes(document(("nouveau.mssante.fr", DEDALUS), closed=False))
    second = Runtime.load(config, testpki.NOW)
    assert second.whitelist is not None
    assert second.whitelist.operators("nouveau.mssante.fr")
    assert not second.whitelist.operators("15-20.mssante.fr")
    # A broken one: the last good list stays in service, and the log says so at ERROR.
    listing.write_bytes(b"<ListeBlancheMSSante")
    with caplog.at_level(logging.ERROR, logger="gateway.runtime"):
        third = Runtime.load(config, testpki.NOW)
    assert third.whitelist is second.whitelist
    assert any("keeping the last good list" in r.message for r in caplog.records)
    # Other errors are not excused by it: the reload is refused as a whole.
    config.write_text(ROUTING.replace("to: [local]", "to: [nowhere]"))
    with pytest.raises(ConfigurationRefused):
        Runtime.load(config, testpki.NOW)


def test_first_start_with_a_broken_list_is_refused(tmp_path: Path) -> None:
    config = site(tmp_path, checksum=False)
    (tmp_path / "data" / "listeblanchemssante.xml").write_bytes(b"<nope")
    with pytest.raises(ConfigurationRefused, match="mssante_whitelist"):
        Runtime.load(config, testpki.NOW)
