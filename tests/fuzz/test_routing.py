"""routing.yaml is operator input: `gateway check` (gateway.check.run_check) must answer every
document with a report, never an exception, whatever the file holds.

Three sources of documents: random YAML trees; the DESIGN.md §3 example (with every file it
names, from tests/support/routing_site.py) with one value replaced, removed or retyped at a
random place; and that example's text with byte-level damage (broken indentation, tabs, stray
quotes, NUL bytes, invalid UTF-8).
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from gateway.check import CheckReport, run_check
from tests.fuzz.conftest import FUZZ, fuzz
from tests.support.routing_site import ROUTING, Site, build_site

NOW = dt.datetime.now(dt.UTC)

SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True),
    st.text(max_size=40),
    st.sampled_from(["mime", "smime", "apicrypt", "openpgp", "hospital", "medecin", "25MiB",
                     "1m", "-5d", "0", "starttls", "implicit", "required", "none",
                     "127.0.0.1", "::1", "999.1.1.1", "*.", "*", "pki/ca.pem", "/dev/zero",
                     "/etc/passwd", "../../../etc/shadow", "pki/directory/", "CN=x,,=y"]),
)
TREES = st.recursive(
    SCALARS,
    lambda children: st.one_of(
        st.lists(children, max_size=5),
        st.dictionaries(st.one_of(st.text(max_size=12), st.sampled_from(
            ["version", "gateway", "networks", "routes", "trust", "keys", "directory",
             "listen", "relay", "peers", "domains", "adapter", "from", "to", "spool", "audit",
             "retry", "schedule", "tls", "identity", "require", "limits"])), children,
            max_size=6),
    ),
    max_leaves=40,
)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Site:
    return build_site(tmp_path_factory.mktemp("routing-fuzz"))


def check(site: Site, text: bytes) -> None:
    site.config.write_bytes(text)
    report = run_check(site.config, NOW)
    assert isinstance(report, CheckReport)
    for problem in report.problems:
        assert str(problem)  # every problem can be shown to the operator


def paths(tree: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    found = [prefix]
    if isinstance(tree, dict):
        for key, value in tree.items():
            found += paths(value, (*prefix, key))
    elif isinstance(tree, list):
        for index, value in enumerate(tree):
            found += paths(value, (*prefix, index))
    return found


def test_the_example_checks_clean(site: Site) -> None:
    site.config.write_text(ROUTING)
    assert run_check(site.config, NOW).ok, run_check(site.config, NOW).problems


@fuzz(20)
@given(tree=TREES)
def test_random_documents(site: Site, tree: Any) -> None:
    check(site, yaml.safe_dump(tree, allow_unicode=True).encode())


@fuzz(15)
@given(data=st.data())
def test_the_example_with_one_value_changed(site: Site, data: st.DataObject) -> None:
    document = yaml.safe_load(ROUTING)
    where = data.draw(st.sampled_from(paths(document)[1:]))
    parent = document
    for step in where[:-1]:
        parent = parent[step]
    if data.draw(st.booleans()):
        del parent[where[-1]]
    else:
        parent[where[-1]] = data.draw(TREES)
    check(site, yaml.safe_dump(document, allow_unicode=True).encode())


@FUZZ
@given(data=st.data())
def test_the_example_with_damaged_text(site: Site, data: st.DataObject) -> None:
    text = bytearray(ROUTING.encode())
    for _ in range(data.draw(st.integers(1, 5))):
        at = data.draw(st.integers(0, len(text) - 1))
        chunk = data.draw(st.one_of(
            st.sampled_from([b"\t", b" ", b"\n", b":", b"'", b'"', b"{", b"]", b"- ", b"&a",
                             b"*a", b"!!python/object:os.system", b"\x00", b"\xff\xfe", b"#"]),
            st.binary(max_size=8),
        ))
        if data.draw(st.booleans()):
            text[at:at + len(chunk)] = chunk
        else:
            text[at:at] = chunk
    check(site, bytes(text))
