"""Real Thunderbird/NSS S/MIME messages (../shared/data/thunderbird-smime): the expected verdicts.

The messages are BER with indefinite lengths, signed by NSS; expected.tsv gives the verdict a
gateway must reach (column `gateway_verdict`). `now` is pinned inside the certificates'
validity so the test keeps its meaning after they expire in 2031.
"""

from __future__ import annotations

import csv
import datetime as dt
from pathlib import Path

import pytest
from cryptography import x509

from adapters.base import Directory, TrustStore, UnwrapContext
from adapters.smime import SmimeAdapter
from gateway.errors import Reason

pytestmark = pytest.mark.interop

DATA = Path(__file__).resolve().parents[3] / "shared" / "data" / "thunderbird-smime"
if not DATA.is_dir():
    DATA = Path(__file__).resolve().parents[3] / "shared" / "data" / "thunderbird-smime"
NOW = dt.datetime(2026, 11, 23, 12, 0, tzinfo=dt.UTC)
ADAPTER = SmimeAdapter()


def rows() -> list[dict[str, str]]:
    if not DATA.is_dir():
        return []
    with (DATA / "expected.tsv").open(newline="") as handle:
        return list(csv.DictReader(handle, delimiter="\t"))


def context(
    now: dt.datetime = NOW, anchors: tuple[x509.Certificate, ...] | None = None
) -> UnwrapContext:
    if anchors is None:
        anchors = (x509.load_pem_x509_certificate((DATA / "TestCA.pem").read_bytes()),)
    return UnwrapContext(
        network="medecin", identity=None, trust=TrustStore(anchors=anchors),
        directory=Directory(), now=now,
    )


EXPECTED: dict[str, tuple[str, Reason | None, str]] = {
    # gateway_verdict prefix -> (result, failure, phrase in the reason)
    "pass": ("pass", None, "signature verified"),
    "fail: weak digest SHA-1": ("fail", Reason.WEAK_ALGORITHM, "weak digest SHA-1"),
    "fail: message-digest mismatch": ("fail", Reason.SIGNATURE_INVALID, "message-digest mismatch"),
    "fail: time mismatch": ("fail", Reason.SIGNATURE_INVALID, "time mismatch"),
}


def expectation(text: str) -> tuple[str, Reason | None, str]:
    if text.startswith("pass"):
        return EXPECTED["pass"]
    for prefix, value in EXPECTED.items():
        if text.startswith(prefix):
            return value
    raise AssertionError(f"no expectation for {text!r}")


@pytest.mark.parametrize("row", rows(), ids=lambda row: row["file"])
def test_each_message_gets_the_expected_verdict(row: dict[str, str]) -> None:
    result, failure, phrase = expectation(row["gateway_verdict"])
    out = ADAPTER.unwrap((DATA / row["file"]).read_bytes(), context())
    verdict = out.signature
    assert verdict.method == "smime"
    assert verdict.result == result, verdict
    assert verdict.failure is failure, verdict
    assert phrase in verdict.reason, verdict
    # The reported signer is always the outer signer named in expected.tsv, never an inner one.
    assert verdict.signer == row["signer_email"].lower()
    assert out.encrypted is False
    if result == "pass":
        assert out.signed_entity is not None
        assert verdict.signer_subject and "CN=" in verdict.signer_subject
        assert verdict.algorithm and verdict.algorithm.endswith("WithRSAEncryption")
    else:
        assert out.signed_entity is None


def test_nested_messages_are_dave_and_note_the_inner_alice_layer() -> None:
    for name in ("alice.plain.sig.SHA256.opaque.dave.sig.SHA256.opaque.eml",
                 "alice.plain.dsig.SHA256.multipart.dave.dsig.SHA256.multipart.eml"):
        out = ADAPTER.unwrap((DATA / name).read_bytes(), context())
        assert out.signature.result == "pass" and out.signature.signer == "dave@example.com"
        assert "alice" not in (out.signature.signer_subject or "").lower()
        assert any("alice@example.com" in note and "does not match From" in note
                   for note in out.notes)
        assert b"This is a test message from Alice to Bob." in out.content
        assert out.content.startswith(b"MIME-Version: 1.0\r\nDate:")
        assert b"From: Dave@example.com" in out.content


def test_mismatched_econtent_is_never_shown_in_place_of_the_first_part() -> None:
    out = ADAPTER.unwrap(
        (DATA / "alice.dsig.SHA256.multipart.mismatch-econtent.eml").read_bytes(), context()
    )
    assert out.signature.result == "fail"
    assert b"FAKE message NOT from Alice" in out.content


def test_opaque_content_keeps_its_exact_bytes() -> None:
    out = ADAPTER.unwrap((DATA / "alice.html.sig.SHA256.opaque.eml").read_bytes(), context())
    assert out.signature.result == "pass"
    assert out.content.endswith(b"\r") and not out.content.endswith(b"\n")
    assert b"Content-Type: text/html" in out.content
    assert b"Subject:" in out.content and b"smime.p7m" not in out.content


@pytest.mark.parametrize(("now", "phrase"), [
    (dt.datetime(2031, 7, 9, tzinfo=dt.UTC), "expired at now"),
    (dt.datetime(2026, 7, 8, 11, 0, tzinfo=dt.UTC), "not yet valid at now"),
])
def test_outside_the_validity_window(now: dt.datetime, phrase: str) -> None:
    out = ADAPTER.unwrap((DATA / "alice.sig.SHA256.opaque.eml").read_bytes(), context(now))
    assert out.signature.result == "fail" and out.signature.failure is Reason.EXPIRED
    assert phrase in out.signature.reason


def test_without_the_nss_test_ca_the_signer_is_untrusted() -> None:
    from tests.support.testpki import root

    out = ADAPTER.unwrap(
        (DATA / "alice.dsig.SHA256.multipart.eml").read_bytes(),
        context(anchors=(root().certificate,)),
    )
    assert out.signature.result == "fail" and out.signature.failure is Reason.UNTRUSTED_SIGNER
