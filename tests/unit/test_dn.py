"""Distinguished names: RFC 4514 parsing, RFC 4518 comparison, certificate names vs whitelist."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID

from gateway.dn import dn_from_name, parse_dn
from tests.support import testpki

MSSANTE = Path(__file__).resolve().parents[3] / "shared" / "data" / "mssante"  # beside the repo
WHITELIST = MSSANTE / "listeblanchemssante.xml"
LARGE_WHITELIST = MSSANTE / "listeblanchemssante-large.xml"
DEDALUS = ("CN=smtp-1.sante.santnet.com,OU=341459958900028,O=DEDALUS HEALTHCARE FRANCE,"
           "ST=Gironde (33),C=FR")


def whitelist_dns(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8")
    return sorted(set(re.findall(r"<DNCertificatOperateur>([^<]*)</DNCertificatOperateur>", text)))


def certificate_name(cn: str, ou: str, o: str, st: str, c: str = "FR") -> x509.Name:
    """A subject in DER order, as a real IGC-Santé certificate carries it: C first, CN last."""
    return x509.Name([
        x509.NameAttribute(NameOID.COUNTRY_NAME, c),
        x509.NameAttribute(NameOID.STATE_OR_PROVINCE_NAME, st),
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, o),
        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, ou),
        x509.NameAttribute(NameOID.COMMON_NAME, cn),
    ])


@pytest.mark.parametrize("other", [
    "cn=SMTP-1.sante.santnet.com,ou=341459958900028,o=dedalus healthcare france,"
    "st=gironde (33),c=fr",
    "CN=smtp-1.sante.santnet.com, OU=341459958900028, O=DEDALUS  HEALTHCARE FRANCE, "
    "ST=Gironde (33), C=FR",
    "CN=smtp-1.sante.santnet.com;OU=341459958900028;O=DEDALUS HEALTHCARE FRANCE;"
    "ST=Gironde (33);C=FR",
    "commonName=smtp-1.sante.santnet.com,organizationalUnitName=341459958900028,"
    "organizationName=DEDALUS HEALTHCARE FRANCE,stateOrProvinceName=Gironde (33),countryName=FR",
    "2.5.4.3=smtp-1.sante.santnet.com,OID.2.5.4.11=341459958900028,O=DEDALUS HEALTHCARE FRANCE,"
    "S=Gironde (33),C=FR",
    'CN=smtp-1.sante.santnet.com,OU=341459958900028,O=" DEDALUS HEALTHCARE FRANCE",'
    "ST=Gironde (33),C=FR",
    "CN=smtp-1.sante.santnet.com,OU=#130f333431343539393538393030303238,"
    "O=DEDALUS HEALTHCARE FRANCE,ST=Gironde (33),C=FR",
    "CN=smtp-1.sante.santnet.com,OU=341459958900028,O=DEDALUS\\20HEALTHCARE FRANCE,"
    "ST=Gironde \\2833\\29,C=FR",
])
def test_equal_spellings(other: str) -> None:
    assert parse_dn(other) == parse_dn(DEDALUS)
    assert hash(parse_dn(other)) == hash(parse_dn(DEDALUS))


@pytest.mark.parametrize("other", [
    "C=FR,ST=Gironde (33),O=DEDALUS HEALTHCARE FRANCE,OU=341459958900028,"
    "CN=smtp-1.sante.santnet.com",  # reversed order is another name
    "CN=smtp-2.sante.santnet.com,OU=341459958900028,O=DEDALUS HEALTHCARE FRANCE,"
    "ST=Gironde (33),C=FR",
    "CN=smtp-1.sante.santnet.com,O=DEDALUS HEALTHCARE FRANCE,ST=Gironde (33),C=FR",
    "CN=smtp-1.sante.santnet.com",  # the CN alone never matches a full DN
    "CN=smtp-1.sante.santnet.com,OU=341459958900028,O=DEDALUS HEALTHCARE FRANCE,"
    "L=Gironde (33),C=FR",
    "CN=smtp-1.sante.santnet.com+OU=341459958900028,O=DEDALUS HEALTHCARE FRANCE,"
    "ST=Gironde (33),C=FR",
])
def test_different_names(other: str) -> None:
    assert parse_dn(other) != parse_dn(DEDALUS)


def test_aliases_for_email_and_state() -> None:
    base = parse_dn("CN=Dr X,emailAddress=dr.x@medecin.fr,ST=Paris (75),C=FR")
    for alias in ("E", "EMAIL", "emailaddress", "1.2.840.113549.1.9.1"):
        assert parse_dn(f"CN=Dr X,{alias}=Dr.X@Medecin.fr,ST=Paris (75),C=FR") == base
    assert parse_dn("CN=Dr X,E=dr.x@medecin.fr,S=Paris (75),C=FR") == base


def test_multi_valued_rdn_is_order_insensitive() -> None:
    assert parse_dn("CN=a+UID=b,O=c") == parse_dn("UID=b+CN=A,O=c")
    assert parse_dn("CN=a+UID=b,O=c") != parse_dn("CN=a,UID=b,O=c")


def test_unicode_and_spaces_are_prepared() -> None:
    assert parse_dn("O=Puy-de-Dôme (63)") == parse_dn("O=PUY-DE-DÔME (63)")
    # NFKC: a composed and a decomposed ô are the same letter; no-break space is a space.
    assert parse_dn("O=Puy-de-Do\u0302me\u00a0(63)") == parse_dn("O=Puy-de-Dôme (63)")
    assert parse_dn("O=  a   b  ") == parse_dn("O=a b")


def test_str_is_canonical_rfc4514_and_round_trips() -> None:
    dn = parse_dn('cn=x, E=A@B.fr ; o="C.H. DE  CADILLAC",st=Gironde (33),c=FR')
    assert str(dn) == "CN=x,emailAddress=A@B.fr,O=C.H. DE  CADILLAC,ST=Gironde (33),C=FR"
    tricky = parse_dn("CN=\\ lead\\, comma\\+plus\\;semi\\\"q\\\\ \\ ,O=\\#x=y,C=FR")
    assert str(tricky) == "CN=\\ lead\\, comma\\+plus\\;semi\\\"q\\\\ \\ ,O=\\#x\\=y,C=FR"
    assert parse_dn(str(tricky)) == tricky
    assert tricky.get("CN") == (' lead, comma+plus;semi"q\\  ',)


@pytest.mark.parametrize(("text", "words"), [
    ("", "empty"),
    ("   ", "empty"),
    ("CN", "no '='"),
    ("CN=", "empty"),
    ("CN=x,", "no '='"),
    ("=x", "missing"),
    ("XYZ=1", "unknown attribute type 'XYZ'"),
    ("CN=a\\q", "backslash"),
    ("CN=\"open", "not closed"),
    ("CN=\"a\" b", "after a quoted value"),
    ("CN=#zz", "hexadecimal"),
    ("CN=\\c3\\28", "UTF-8"),
    ("C N=x", "not an attribute type"),
])
def test_parse_errors_say_what_is_wrong(text: str, words: str) -> None:
    with pytest.raises(ValueError, match=re.escape(words)):
        parse_dn(text)


def test_every_whitelist_dn_round_trips() -> None:
    dns = whitelist_dns(WHITELIST)
    assert len(dns) == 35  # as documented in data/mssante/SOURCE.md
    for text in dns:
        dn = parse_dn(text)
        assert parse_dn(str(dn)) == dn
        assert str(dn) == text  # these are already canonical


def test_certificate_subject_equals_whitelist_string() -> None:
    for text in whitelist_dns(WHITELIST):
        values = dict(part.split("=", 1) for part in text.split(","))
        name = certificate_name(values["CN"], values["OU"], values["O"], values["ST"])
        # cryptography prints the DER sequence reversed: CN first, like the whitelist.
        assert name.rfc4514_string() == text
        assert dn_from_name(name) == parse_dn(text)
        assert str(dn_from_name(name)) == text
        # And in the other direction, through cryptography's own parser.
        assert dn_from_name(x509.Name.from_rfc4514_string(text)) == parse_dn(text)


def test_der_order_matters_for_certificates() -> None:
    wrong_way = x509.Name(list(reversed(list(certificate_name(
        "smtp-1.sante.santnet.com", "341459958900028", "DEDALUS HEALTHCARE FRANCE",
        "Gironde (33)",
    )))))
    assert dn_from_name(wrong_way) != parse_dn(DEDALUS)


def test_issued_certificate_matches_its_own_rfc4514_string() -> None:
    pki = testpki.IgcSante.create()
    leaf = pki.organisations.issue(certificate_name(
        "mss.ch-cadillac.fr", "1330781295", "C.H. DE  CADILLAC", "Gironde (33)"))
    subject = dn_from_name(leaf.certificate.subject)
    assert subject == parse_dn(leaf.certificate.subject.rfc4514_string())
    # The large list writes this operator with quotes; the certificate has none.
    assert subject == parse_dn(
        'CN=mss.ch-cadillac.fr,OU=1330781295,O="C.H. DE  CADILLAC",ST=Gironde (33),C=FR')
    assert subject == parse_dn(
        "CN=mss.ch-cadillac.fr,OU=1330781295,O=C.H. DE CADILLAC,ST=Gironde (33),C=FR")


def test_multi_valued_certificate_name() -> None:
    name = x509.Name([
        x509.RelativeDistinguishedName([x509.NameAttribute(NameOID.COUNTRY_NAME, "FR")]),
        x509.RelativeDistinguishedName([
            x509.NameAttribute(NameOID.COMMON_NAME, "Dr X"),
            x509.NameAttribute(NameOID.EMAIL_ADDRESS, "dr.x@medecin.fr"),
        ]),
    ])
    assert dn_from_name(name) == parse_dn("E=dr.x@medecin.fr+CN=Dr X,C=FR")
    assert dn_from_name(name) == parse_dn(name.rfc4514_string())


def test_large_whitelist_quirks_parse() -> None:
    # Spaces after separators, quoted values, a stray quote inside a value, L= instead of ST=.
    dns = whitelist_dns(LARGE_WHITELIST)
    parsed = {parse_dn(text) for text in dns}
    assert len(parsed) <= len(dns)
    spaced = parse_dn("CN=mailin.interop-mssante.apicrypt.org, OU=343975235300037, O=APICEM, "
                      "ST=Nord (59), C=FR")
    assert spaced == parse_dn("CN=mailin.interop-mssante.apicrypt.org,OU=343975235300037,"
                              "O=APICEM,ST=Nord (59),C=FR")
    stray = parse_dn('CN=mss.strasbourg.unicancer.fr,OU=1670000033,O=CRLCC "PAUL STRAUSS",'
                     "ST=Bas-Rhin (67),C=FR")
    assert stray.get("O") == ('CRLCC "PAUL STRAUSS"',)


def test_dn_is_usable_in_sets() -> None:
    listed = {parse_dn(text) for text in whitelist_dns(WHITELIST)}
    name = certificate_name("smtp-1.sante.santnet.com", "341459958900028",
                            "Dedalus Healthcare France", "GIRONDE (33)")
    assert dn_from_name(name) in listed
