"""routing.yaml → Config: the DESIGN.md §3 example, defaults, and every mistake with its line."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from gateway.config import (
    ConfigError,
    Limits,
    Listener,
    MetricsSettings,
    PeerRule,
    Problem,
    RelaySettings,
    Requirements,
    RetrySettings,
    Route,
    WorkerSettings,
    load,
    normalize_domain,
    parse,
    parse_duration,
    parse_size,
)
from tests.support.routing_site import BROKEN, build_site


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "routing.yaml"
    path.write_text(text)
    return path


MINIMAL = """\
version: 1
gateway:
  hostname: gw.test
  listen: [{address: 127.0.0.1, port: 2525, tls: none, client_certificate: none}]
networks:
  a:
    adapter: mime
    domains: [a.test]
    relay: {host: 127.0.0.1}
routes:
  - {from: a, to: a}
"""


def errors_of(path: Path) -> list[Problem]:
    _config, problems = parse(path)
    return [p for p in problems if p.severity == "error"]


# -- the complete example ---------------------------------------------------------------------


def test_design_example_loads_into_expected_objects(tmp_path: Path) -> None:
    site = build_site(tmp_path)
    config = load(site.config)
    root = tmp_path

    assert config.version == 1
    gateway = config.gateway
    assert gateway.hostname == "passerelle.example.org"
    assert gateway.listen == (Listener("127.0.0.1", 2525, "starttls", "optional"),)
    assert gateway.tls is not None
    assert gateway.tls.certificate == root / "pki" / "gateway.pem"
    assert gateway.tls.key == root / "pki" / "gateway.key"
    assert gateway.spool.path == root / "var" / "spool"
    assert gateway.spool.encryption_key == root / "pki" / "spool.key"
    assert gateway.audit.path == root / "var" / "audit"
    assert gateway.audit.retention == 183 * 86400
    assert gateway.metrics == MetricsSettings("127.0.0.1", 9464)
    assert gateway.max_message_size == 25 * 1024 * 1024
    assert gateway.retry == RetrySettings((60, 300, 900, 3600, 14400), 5 * 86400)

    assert config.trust.anchors == (root / "pki" / "ca.pem",)
    assert config.trust.crls == (root / "pki" / "ca.crl", root / "pki" / "organisations.crl")
    assert config.trust.mssante_whitelist == root / "data" / "listeblanchemssante.xml"
    assert set(config.keys) == {"medecin-smime", "apicrypt-pgp"}
    assert config.keys["medecin-smime"].certificate == root / "pki" / "medecin.pem"
    assert config.keys["medecin-smime"].key == root / "pki" / "medecin.key"
    assert config.keys["apicrypt-pgp"].secret_key == root / "pki" / "apicrypt.asc"
    assert config.keys["apicrypt-pgp"].certificate is None
    assert config.directory == (root / "pki" / "directory",)

    hospital, medecin, apicrypt = (config.networks[n] for n in ("hospital", "medecin", "apicrypt"))
    assert hospital.adapter == "mime"
    assert hospital.domains == ("chu-exemple.fr", "*.mssante.fr")
    assert hospital.peers == PeerRule(whitelist="mssante")
    assert hospital.relay == RelaySettings("127.0.0.1", 2601, "required")
    assert hospital.options == {}
    assert medecin.identity == "medecin-smime"
    assert medecin.require == Requirements(signature=True, encryption=True)
    assert medecin.peers.subjects == (
        "CN=mx.medecin.fr,OU=1750000000,O=CHU TEST,ST=Paris (75),C=FR",)
    assert apicrypt.options == {"codec": "openpgp"}
    assert apicrypt.peers.addresses == (ipaddress.ip_network("127.0.0.1/32"),)
    assert apicrypt.relay == RelaySettings("127.0.0.1", 2603, "opportunistic")
    assert apicrypt.require == Requirements(encryption=True)
    assert apicrypt.limits == Limits()
    assert medecin.line == site.line_of("  medecin:")

    assert config.routes == (
        Route("hospital", ("medecin", "apicrypt")),
        Route("medecin", ("hospital", "apicrypt")),
        Route("apicrypt", ("hospital", "medecin")),
    )
    assert config.route_allowed("hospital", "apicrypt")
    assert not config.route_allowed("hospital", "hospital")
    assert config.network_for_domain("CHU-Exemple.fr.") is hospital
    assert config.network_for_domain("cabinet.apicrypt.org") is apicrypt
    assert config.network_for_domain("apicrypt.org") is None
    assert config.line("keys.medecin-smime.certificate") == site.line_of("medecin-smime: {")
    assert config.line("trust.crls.1") == site.line_of("crls:")


def test_minimal_file_gets_documented_defaults(tmp_path: Path) -> None:
    config = load(write(tmp_path, MINIMAL))
    assert config.gateway.metrics is None
    assert config.gateway.audit.path == tmp_path / "var" / "audit"
    assert config.gateway.audit.retention == 183 * 86400
    assert config.gateway.spool.path == tmp_path / "var" / "spool"
    assert config.gateway.spool.encryption_key is None
    assert config.gateway.tls is None
    assert config.gateway.max_message_size == 25 * 1024 * 1024
    assert config.gateway.retry == RetrySettings()
    assert config.trust.anchors == () and config.keys == {} and config.directory == ()
    network = config.networks["a"]
    assert network.relay == RelaySettings("127.0.0.1", 25, "required")
    assert network.peers == PeerRule()
    assert config.route_allowed("a", "a")  # a route to self is allowed


def test_relative_paths_resolve_against_the_file_folder(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    text = MINIMAL + "trust: {anchors: [ca.pem, /abs/ca.pem]}\n"
    config = load(write(tmp_path / "etc", text))
    assert config.trust.anchors == (tmp_path / "etc" / "ca.pem", Path("/abs/ca.pem"))


def test_domains_are_normalized(tmp_path: Path) -> None:
    text = MINIMAL.replace("[a.test]", '[A.Test., "Médecin.FR", "*.MSSante.fr"]')
    config = load(write(tmp_path, text))
    assert config.networks["a"].domains == ("a.test", "xn--mdecin-bva.fr", "*.mssante.fr")
    assert config.network_for_domain("médecin.fr") is config.networks["a"]
    assert config.network_for_domain("x.mssante.fr") is config.networks["a"]


def test_adapter_options_and_their_paths(tmp_path: Path) -> None:
    text = MINIMAL.replace("adapter: mime", (
        "adapter: apicrypt\n"
        "    codec: external\n"
        "    version: 2\n"
        "    user: cabinet\n"
        "    key_directory: keys/apicrypt\n"
        "    programs: {apicrypt: bin/apicrypt, apiuncrypt: /opt/apiuncrypt,\n"
        "               apicryptpj: bin/apicryptpj, apiuncryptpj: bin/apiuncryptpj}"))
    config = load(write(tmp_path, text))
    options = config.networks["a"].options
    assert options["codec"] == "external" and options["version"] == 2
    assert options["key_directory"] == str(tmp_path / "keys" / "apicrypt")
    assert options["programs"] == {
        "apicrypt": str(tmp_path / "bin" / "apicrypt"), "apiuncrypt": "/opt/apiuncrypt",
        "apicryptpj": str(tmp_path / "bin" / "apicryptpj"),
        "apiuncryptpj": str(tmp_path / "bin" / "apiuncryptpj"),
    }


def test_yaml_merge_keys_are_understood(tmp_path: Path) -> None:
    text = MINIMAL + "x-relay: &relay {host: 127.0.0.1, port: 2601}\n"
    # x-relay is not a known top-level key: anchors have to live inside a known section.
    assert [p.message for p in errors_of(write(tmp_path, text))] == [
        "the file: unknown key 'x-relay' (known: directory, gateway, keys, networks, routes, "
        "trust, version)"]
    text = MINIMAL.replace("relay: {host: 127.0.0.1}", "relay: &relay {host: 127.0.0.1, port: 26}")
    text = text.replace("routes:", "  b: {adapter: mime, domains: [b.test], "
                        "relay: {<<: *relay, port: 27}}\nroutes:")
    config = load(write(tmp_path, text))
    assert config.networks["b"].relay == RelaySettings("127.0.0.1", 27, "required")


# -- formats ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "seconds"), [
    ("30", 30), ("30s", 30), ("5m", 300), ("1h", 3600), ("5d", 432000), ("1h30m", 5400),
    ("183d", 183 * 86400), ("1.5h", 5400), (" 2m ", 120),
])
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "5x", "m5", "-5s", "5 m", "1:30", "5w", "five"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration(text)


@pytest.mark.parametrize(("text", "size"), [
    ("1048576", 1048576), ("25MiB", 25 * 1024**2), ("25mib", 25 * 1024**2),
    ("512KiB", 512 * 1024), ("1GiB", 1024**3), ("25MB", 25_000_000), ("10KB", 10_000),
    ("1GB", 10**9), ("100B", 100), ("1.5MiB", 1572864), ("2 MiB", 2 * 1024**2),
])
def test_sizes(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "25XB", "MiB", "-1", "25 Mio", "1.5", "1e6"])
def test_bad_sizes(text: str) -> None:
    with pytest.raises(ValueError, match="not a"):
        parse_size(text)


@pytest.mark.parametrize("text", ["a..b", "*", "a.*.b", "*.", "-a.fr", "a_b.fr", "x" * 64 + ".fr",
                                  "é" * 60 + ".fr", "h\u00f4pital\u200d.fr", "\u0661\u0031.fr"])
def test_bad_domains(text: str) -> None:
    with pytest.raises(ValueError):
        normalize_domain(text)


@pytest.mark.parametrize(("text", "ascii_form"), [
    # IDNA 2008 (UTS 46, non-transitional), as registries apply it; Python's IDNA 2003 codec
    # maps the first two to other domains (strasse.de; the final sigma to a medial one). The
    # A-labels are Punycode (RFC 3492) of the U-labels, computed by Python's own codec.
    ("straße.de", "xn--strae-oqa.de"),
    ("σίσυφος.gr", "xn--kxa6ajbbmh.gr"),
    ("Hôpital-Nord.FR", "xn--hpital-nord-2eb.fr"),
    ("*.médecin.fr", "*.xn--mdecin-bva.fr"),
    ("CHU-Test.FR.", "chu-test.fr"),
])
def test_internationalised_domains_take_their_idna_2008_form(text: str, ascii_form: str) -> None:
    assert normalize_domain(text) == ascii_form


# -- mistakes ---------------------------------------------------------------------------------


def test_broken_file_reports_every_mistake_with_its_line(tmp_path: Path) -> None:
    site = build_site(tmp_path)
    site.write(BROKEN)

    def line(needle: str) -> int:
        return site.line_of(needle, BROKEN)

    expected = [
        (line("max_message_size"), "gateway.max_message_size: '25 megabytes' is not a size"),
        (line("give_up_after"), "gateway.retry.give_up_after: '5x' is not a duration"),
        (line("metrics:"), "gateway.metrics.port must be a whole number from 1 to 65535"),
        (line("half:"), "keys.half: key is missing"),
        (line("whitelist: mssante"), "whitelist: mssante needs the list"),
        (line("signatur:"), "option 'signatur' is not known to the smime adapter"),
        (line("XX=1"), "unknown attribute type 'XX'"),
        (line("XX=1"), "did you mean 10.0.0.0/8?"),
        (line("medecin-smim "), "identity 'medecin-smim' is not defined under keys: "
                                "(did you mean 'medecin-smime'?)"),
        (line("mandatory"), "relay.tls must be one of required, opportunistic, none"),
        (line("smtp"), "unknown adapter 'smtp'"),
        (line("Medecin.fr."), "domain medecin.fr is already claimed by network 'medecin'"),
        (line("relai:"), "unknown key 'relai' (did you mean 'relay'?)"),
        (line("medcin"), "unknown network 'medcin' (did you mean 'medecin'?); define it under "
                         "networks: or fix the name"),
        (line("via: x"), "unknown key 'via'"),
    ]
    _config, problems = parse(site.config)
    errors = [p for p in problems if p.severity == "error"]
    text = "\n".join(str(p) for p in errors)
    for number, words in expected:
        assert any(p.line == number and words in p.message for p in errors), (
            f"expected line {number}: {words}\ngot:\n{text}")
    assert [p.line for p in problems] == sorted(p.line for p in problems)
    assert all(str(p).startswith(f"{site.config}:{p.line}: ") for p in errors)

    with pytest.raises(ConfigError) as raised:
        load(site.config)
    assert raised.value.problems == problems
    assert "more error(s)" in str(raised.value)


def test_file_problems_of_the_broken_file_come_from_check(tmp_path: Path) -> None:
    # The missing file and the mismatched key are found by `gateway check` (test_check.py);
    # parse() reports only what the YAML itself gets wrong.
    site = build_site(tmp_path)
    site.write(BROKEN)
    messages = [p.message for p in errors_of(site.config)]
    assert not any("missing.pem" in m or "does not match" in m for m in messages)


def test_yaml_syntax_error_reports_its_line(tmp_path: Path) -> None:
    path = write(tmp_path, """\
        version: 1
        gateway:
          hostname: gw.test
          listen: [{address: 127.0.0.1, port: 2525}
        networks: {}
        """)
    config, problems = parse(path)
    assert config is None
    assert len(problems) == 1
    assert problems[0].line == 5
    assert problems[0].message.startswith("YAML syntax:")
    assert str(problems[0]).startswith(f"{path}:5: YAML syntax:")


def test_unquoted_wildcard_is_a_syntax_error_with_a_hint(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL.replace("[a.test]", "[*.a.test]"))
    _config, problems = parse(path)
    assert problems[0].line == 8
    assert "quoted" in problems[0].message


def test_unreadable_or_empty_file(tmp_path: Path) -> None:
    config, problems = parse(tmp_path / "nowhere.yaml")
    assert config is None and problems[0].line == 0
    assert "cannot read the file" in str(problems[0])
    assert str(problems[0]).startswith(f"{tmp_path / 'nowhere.yaml'}: ")
    _config, problems = parse(write(tmp_path, ""))
    assert "empty" in problems[0].message


@pytest.mark.parametrize(("edit", "line", "words"), [
    (("version: 1", "version: 2"), 1, "version 2 is not supported"),
    (("tls: none, client_certificate: none", "tls: starttls"), 4, "needs the gateway's "
                                                                  "certificate"),
    (("tls: none, client_certificate: none", "tls: sometimes"), 4, "must be one of none, "
                                                                  "starttls, implicit"),
    (("tls: none, client_certificate: none", "tls: none, client_certificate: always"), 4,
     "client_certificate must be one of none, optional, required"),
    (("port: 2525", "port: http"), 4, "must be a whole number"),
    (("  hostname: gw.test\n", "  hostname: gw.test\n  hostnam: x\n"), 4,
     "unknown key 'hostnam' (did you mean 'hostname'?)"),
    (("  hostname: gw.test\n", "  hostname: gw.test\n  hostname: x\n"), 4, "appears twice"),
    (("relay: {host: 127.0.0.1}", "relay: {host: 127.0.0.1, whitelist: mssante}"), 9,
     "needs the list"),
    (("relay: {host: 127.0.0.1}", "relay: {port: 25}"), 9, "host is missing"),
    (("to: a}", "to: b}"), 11, "unknown network 'b'"),
    (("from: a", "from: z"), 11, "from: names unknown network 'z'"),
    (("domains: [a.test]", "domains: []"), 8, "domains is empty"),
    (("domains: [a.test]", "domains: [a..test]"), 8, "not a valid domain"),
    (("adapter: mime", "adapter: mime\n    x_mss_nil: true\n    colour: red"), 9,
     "option 'colour' is not known to the mime adapter"),
    (("adapter: mime", "adapter: mime\n    require: {signature: maybe}"), 8,
     "require.signature must be true or false"),
    (("adapter: mime", "adapter: mime\n    limits: {concurrency: 0}"), 8,
     "limits.concurrency must be a whole number from 1"),
    (("  - {from: a, to: a}\n", "  - {from: a, to: a}\nkeys: {k: {certificate: c.pem}}\n"),
     12, "keys.k: key is missing"),
])
def test_single_mistakes(tmp_path: Path, edit: tuple[str, str], line: int, words: str) -> None:
    old, new = edit
    assert old in MINIMAL
    errors = errors_of(write(tmp_path, MINIMAL.replace(old, new)))
    assert any(p.line == line and words in p.message for p in errors), errors


def test_route_to_a_network_without_relay(tmp_path: Path) -> None:
    text = MINIMAL.replace("    relay: {host: 127.0.0.1}\n", "")
    errors = errors_of(write(tmp_path, text))
    assert [(p.line, "has no relay" in p.message) for p in errors] == [(10, True)]


def test_signing_networks_need_an_identity_of_the_right_kind(tmp_path: Path) -> None:
    text = MINIMAL.replace("adapter: mime", "adapter: smime\n    identity: pgp") + (
        "keys: {pgp: {secret_key: pgp.asc}}\n")
    errors = errors_of(write(tmp_path, text))
    assert any("identity 'pgp' has no X.509 certificate and key" in p.message
               for p in errors), errors
    text = MINIMAL.replace("adapter: mime", "adapter: smime")
    errors = errors_of(write(tmp_path, text))
    assert any("add identity:" in p.message for p in errors), errors


def test_missing_routes_is_a_warning_not_an_error(tmp_path: Path) -> None:
    text = MINIMAL.split("routes:")[0]
    config, problems = parse(write(tmp_path, text))
    assert config is not None
    assert [p.severity for p in problems] == ["warning"]
    assert "every message will be refused" in problems[0].message
    assert str(problems[0]).endswith(problems[0].message)
    assert ": warning: " in str(problems[0])
    load(tmp_path / "routing.yaml")  # warnings do not fail


def test_problem_text_shape() -> None:
    problem = Problem(Path("routing.yaml"), 42, "network 'medecin': route names unknown "
                      "network 'medcin'; define it under networks: or fix the name")
    assert str(problem) == ("routing.yaml:42: network 'medecin': route names unknown network "
                            "'medcin'; define it under networks: or fix the name")


def test_workers_setting_and_its_mistakes(tmp_path: Path) -> None:
    assert load(write(tmp_path, MINIMAL)).gateway.workers == WorkerSettings("auto", None)
    text = MINIMAL.replace("  listen:", "  workers: {kind: process, count: 3}\n  listen:")
    assert load(write(tmp_path, text)).gateway.workers == WorkerSettings("process", 3)
    text = MINIMAL.replace("  listen:", "  workers: {kind: fork, count: 0}\n  listen:")
    found = [(p.line, p.message) for p in errors_of(write(tmp_path, text))]
    assert len(found) == 2 and all(line == 4 for line, _ in found)  # the workers line
    assert "gateway.workers.kind" in found[0][1] and "auto" in found[0][1]
    assert "gateway.workers.count" in found[1][1]
