"""Trace headers: added on top, forged Authentication-Results removed, the rest untouched."""

from __future__ import annotations

import datetime as dt

from adapters.base import Verdict
from gateway.envelope import Envelope, Peer, Recipient
from gateway.trace import add_trace, authentication_results, strip_forged_results

NOW = dt.datetime(2026, 11, 23, 10, 0, tzinfo=dt.UTC)
ENVELOPE = Envelope(
    queue_id="Q1", sender="a@chu-test.fr", recipients=(Recipient("b@clinique-test.fr", "clinic"),),
    source_network="hospital", peer=Peer("192.0.2.7", 2525, "mx.chu-test.fr", True, "CN=mx"),
    received_at=0.0, size=10,
)
BODY = b"\r\nLigne 1\r\nAuthentication-Results: passerelle.test; smime=pass\r\n"


def test_forged_results_claiming_our_name_are_removed() -> None:
    message = (
        b"Authentication-Results: passerelle.test; smime=pass\r\n"
        b"\t(forged)\r\n"
        b"Authentication-Results: PASSERELLE.TEST;\r\n smime=pass\r\n"
        b"Authentication-Results: mx.other.example; dkim=pass\r\n"
        b"Subject: x\r\n" + BODY
    )
    out = strip_forged_results(message, "passerelle.test")
    assert out == b"Authentication-Results: mx.other.example; dkim=pass\r\nSubject: x\r\n" + BODY


def test_add_trace_prepends_and_keeps_bytes() -> None:
    original = b"Subject: x\r\nFrom: a@chu-test.fr\r\n" + BODY
    verdict = Verdict(method="smime", result="pass", reason="signature verified",
                      signer="a@chu-test.fr", signer_serial="0a", signer_issuer="CN=CA")
    out = add_trace(original, ENVELOPE, verdict, "passerelle.test", ("b@clinique-test.fr",), NOW)
    assert out.endswith(original)
    head = out[: -len(original)].decode()
    assert head.startswith("Received: from mx.chu-test.fr ([192.0.2.7])")
    assert "with ESMTPS id Q1" in head and "for <b@clinique-test.fr>" in head
    assert "smime=pass (signature verified)" in head
    assert "body.smime-identifier=a@chu-test.fr" in head


def test_results_header_is_safe_from_injection() -> None:
    verdict = Verdict(method="x-openpgp", result="fail", reason="bad)\r\nBcc: evil@example")
    header = authentication_results("passerelle.test", verdict)
    assert "\r\nBcc" not in header and "\n" not in header.replace("\r\n\t", "")


def test_unsigned_source_reports_none() -> None:
    assert authentication_results("gw", Verdict.unsigned()) == "Authentication-Results: gw; none"
