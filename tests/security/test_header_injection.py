"""Header injection through trace fields, and forged verdicts hidden from a naive stripper.

Values the gateway writes into `Received` and `Authentication-Results` come from peers and
certificates (HELO, certificate subject, recipient, signer address, OpenPGP user ID, serial,
issuer, fingerprint). Each test below plants one attack in one of them and checks that the
trace block stays exactly two fields of printable US-ASCII that `email.parser` reads back as
such. The second half plants forged `Authentication-Results` (and other verdict-like fields)
in the sender's header block, spelled the ways RFC 5322 CFWS and RFC 8601 allow, and checks
that each is removed while everything else stays byte for byte.
"""

from __future__ import annotations

import base64
import datetime as dt
import re
from dataclasses import replace
from email import policy
from email.parser import BytesParser

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from adapters.base import Verdict
from adapters.cms.sign import sign_content
from adapters.smime import SmimeAdapter
from gateway.envelope import Envelope, Peer, Recipient
from gateway.trace import add_trace, authentication_results, received, strip_forged_results
from tests.support.smime_pki import SmimePki, unwrap_context
from tests.support.testpki import NOW, name

HOST = "passerelle.example.org"
FORGED = "\r\nAuthentication-Results: passerelle.example.org; smime=pass"
WHEN = dt.datetime(2026, 11, 23, 10, 0, tzinfo=dt.UTC)
ENVELOPE = Envelope(
    queue_id="Q1", sender="a@chu-test.fr", recipients=(Recipient("b@clinique-test.fr", "clinic"),),
    source_network="hospital", peer=Peer("192.0.2.7", 2525, "mx.chu-test.fr", True, "CN=mx"),
    received_at=0.0, size=10,
)
ORIGINAL = b"From: <a@chu-test.fr>\r\nSubject: CR\r\n\r\nLigne 1\r\n"
FIELDS = ["Received", "Authentication-Results", "From", "Subject"]


def trace(verdict: Verdict, envelope: Envelope = ENVELOPE,
          recipients: tuple[str, ...] = ("b@clinique-test.fr",)) -> bytes:
    """The trace block written above ORIGINAL, after checking its shape and how it parses."""
    out = add_trace(ORIGINAL, envelope, verdict, HOST, recipients, WHEN)
    assert out.endswith(ORIGINAL)
    head = out[: -len(ORIGINAL)]
    lines = head.split(b"\r\n")
    assert lines[-1] == b""
    for line in lines[:-1]:
        assert re.fullmatch(rb"[\t -~]{1,998}", line), line
    starts = [line.split(b":")[0] for line in lines[:-1] if line[:1] != b"\t"]
    assert starts == [b"Received", b"Authentication-Results"]
    # Also the way a reader that decodes first and splits on every Unicode line break sees it.
    assert head.decode("ascii").splitlines() == [line.decode() for line in lines[:-1]]
    for each in (policy.compat32, policy.default):
        parsed = BytesParser(policy=each).parsebytes(out)
        assert list(parsed.keys()) == FIELDS
        assert parsed.get_payload() == "Ligne 1\r\n"
    return head


def results_outside_quotes_and_comments(head: bytes) -> list[str]:
    """The method=result pairs a reader finds in our Authentication-Results (RFC 8601 §2.2)."""
    value = head.decode("ascii").split("Authentication-Results:", 1)[1]
    value = re.sub(r'"(?:[^"\\]|\\.)*"', '""', value)
    value = re.sub(r"\((?:[^()\\]|\\.)*\)", " ", value)
    return re.findall(r";\s*([\w-]+)=(\w+)", value)


def failed(**fields: object) -> Verdict:
    return replace(Verdict("smime", "fail", "certificate not trusted"), **fields)  # type: ignore[arg-type]


# -- the signer's address (X.509 rfc822Name / emailAddress, OpenPGP user ID) -------------------


def test_crlf_in_signer_address_adds_no_field() -> None:
    head = trace(failed(signer="x" + FORGED + "@medecin.fr"))
    assert b"smime=pass" not in head
    assert results_outside_quotes_and_comments(head) == [("smime", "fail")]


def test_bare_lf_in_signer_address_adds_no_field() -> None:
    head = trace(failed(signer="x" + FORGED.replace("\r\n", "\n") + "@medecin.fr"))
    assert b"smime=pass" not in head


def test_bare_cr_in_signer_address_adds_no_field() -> None:
    head = trace(failed(signer="x" + FORGED.replace("\r\n", "\r") + "@medecin.fr"))
    assert b"smime=pass" not in head


def test_nul_in_signer_address_is_not_written() -> None:
    head = trace(failed(signer="x\x00@medecin.fr"))
    assert b"\x00" not in head and b"smime-identifier=" not in head
    assert b"withheld: body.smime-identifier" in head


def test_semicolon_in_signer_address_adds_no_result() -> None:
    head = trace(failed(signer="x@medecin.fr; smime=pass"))
    assert b"smime=pass" not in head
    assert results_outside_quotes_and_comments(head) == [("smime", "fail")]


def test_quote_and_backslash_in_signer_address_are_not_written() -> None:
    head = trace(failed(signer='x"; smime=pass; \\"@medecin.fr'))
    assert b"smime=pass" not in head and b"smime-identifier=" not in head


def test_unicode_line_separator_in_signer_address() -> None:
    head = trace(failed(signer="x\u2028Authentication-Results: passerelle.example.org@medecin.fr"))
    assert b"smime=pass" not in head and b"smime-identifier=" not in head


def test_non_ascii_signer_address_is_not_written_raw() -> None:
    head = trace(replace(failed(signer="médecin@médecin.fr"), result="pass"))
    assert b"smime-identifier=" not in head and b"withheld: body.smime-identifier" in head


def test_overlong_signer_address_is_left_out_not_cut() -> None:
    head = trace(failed(signer="a" * 3000 + "@medecin.fr"))
    assert b"smime-identifier=" not in head


def test_plain_signer_address_is_written_bare() -> None:
    head = trace(replace(failed(signer="martin@medecin.fr"), result="pass"))
    assert b"\tbody.smime-identifier=martin@medecin.fr" in head
    assert b"withheld" not in head


def test_crlf_in_openpgp_user_id_address_adds_no_field() -> None:
    verdict = Verdict("x-openpgp", "fail", "key not in the directory",
                      signer="x" + FORGED + "@apicrypt.org", fingerprints=("AB" * 20,))
    head = trace(verdict)
    assert b"smime=pass" not in head and b"header.from=" not in head
    assert b"x-openpgp.fingerprint=" + b"AB" * 20 in head


# -- other certificate values: serial, fingerprint, issuer -------------------------------------


def test_crlf_in_serial_and_fingerprint_adds_no_field() -> None:
    head = trace(failed(signer_serial="0a" + FORGED, fingerprints=("AB" + FORGED,)))
    assert b"smime=pass" not in head and b"smime-serial=" not in head


def test_issuer_with_crlf_quote_backslash_and_semicolon_stays_one_quoted_value() -> None:
    issuer = 'CN=a"b\\,c' + FORGED + ", O=Hôpital"
    head = trace(failed(signer_issuer=issuer))
    value = re.search(rb'body\.smime-issuer=("(?:[^"\\]|\\.)*")', head)
    assert value is not None
    assert b";" not in value.group(1) and b"\r" not in value.group(1)
    # Hex escapes (RFC 4514 §2.4) name the same DN: ô is C3 B4 in UTF-8, CR LF 0D 0A.
    assert b"H\\\\C3\\\\B4pital" in value.group(1) and b"\\\\0D\\\\0A" in value.group(1)
    assert results_outside_quotes_and_comments(head) == [("smime", "fail")]


def test_overlong_issuer_is_left_out() -> None:
    head = trace(failed(signer_issuer="CN=" + "x" * 2000))
    assert b"smime-issuer=" not in head and b"withheld: body.smime-issuer" in head


def test_reason_with_line_breaks_stays_in_its_comment() -> None:
    verdict = failed(reason="bad)" + FORGED + "\u2028\u0085(\\ end")
    head = trace(verdict)
    assert results_outside_quotes_and_comments(head) == [("smime", "fail")]


def test_method_that_is_not_a_keyword_is_refused() -> None:
    with pytest.raises(ValueError, match="method"):
        authentication_results(HOST, Verdict("smime\r\nX: y", "pass"))


# -- Received: HELO, certificate subject, recipient, queue id ---------------------------------


def test_crlf_in_helo_adds_no_field() -> None:
    peer = replace(ENVELOPE.peer, helo="mx" + FORGED)
    head = trace(Verdict.unsigned(), replace(ENVELOPE, peer=peer))
    assert head.startswith(b"Received: from unknown ([192.0.2.7] helo=mx??Authentication-")
    assert b"smime=pass" not in head


def test_helo_with_semicolon_does_not_end_the_received_tokens() -> None:
    peer = replace(ENVELOPE.peer, helo="mx; Mon, 1 Jan 2001 00:00:00 +0000")
    head = trace(Verdict.unsigned(), replace(ENVELOPE, peer=peer))
    first = head.split(b"\r\n")[0]
    assert b";" not in first


def test_address_literal_helo_is_kept() -> None:
    peer = replace(ENVELOPE.peer, helo="[IPv6:2001:db8::1]", address="2001:db8::1")
    head = trace(Verdict.unsigned(), replace(ENVELOPE, peer=peer))
    assert head.startswith(b"Received: from [IPv6:2001:db8::1] ([IPv6:2001:db8::1])")


def test_crlf_and_non_ascii_in_certificate_subject_stay_in_the_comment() -> None:
    peer = replace(ENVELOPE.peer, certificate_subject="CN=mx" + FORGED + ",O=Hôpital (x)")
    head = trace(Verdict.unsigned(), replace(ENVELOPE, peer=peer))
    assert b"(authenticated: CN=mx\\\\0D\\\\0AAuthentication-Results: passerelle.example.org" in head
    assert "Hôpital".encode() not in head and b"\\(x\\)" in head


def test_crlf_in_recipient_adds_no_field() -> None:
    head = trace(Verdict.unsigned(), recipients=("b@clinique-test.fr>" + FORGED,))
    assert b" for <" not in head and b"smime=pass" not in head


def test_non_ascii_recipient_is_left_out() -> None:
    head = trace(Verdict.unsigned(), recipients=("médecin@clinique-test.fr",))
    assert b" for <" not in head


def test_queue_id_that_is_not_an_atom_is_left_out() -> None:
    head = trace(Verdict.unsigned(), replace(ENVELOPE, queue_id="Q1" + FORGED))
    assert b" id " not in head


def test_received_keeps_its_usual_shape() -> None:
    text = received(ENVELOPE, HOST, "b@clinique-test.fr", WHEN)
    assert text == ("Received: from mx.chu-test.fr ([192.0.2.7])\r\n\t(authenticated: CN=mx)"
                    f"\r\n\tby {HOST} (Passerelle) with ESMTPS id Q1\r\n\tfor "
                    "<b@clinique-test.fr>; Mon, 23 Nov 2026 10:00:00 +0000")


# -- through the real S/MIME path: a certificate issued to a hostile address -------------------


def test_certificate_email_with_crlf_through_smime_unwrap() -> None:
    pki = SmimePki.create()
    hostile = "x" + FORGED + "@medecin.fr"
    signer = pki.intermediate.issue(
        name(CN="x", O="TEST", C="FR"), key=ec.generate_private_key(ec.SECP256R1()),
        emails=[hostile], eku=[ExtendedKeyUsageOID.EMAIL_PROTECTION],
    )
    assert hostile.lower() in [e.lower() for e in signer.certificate.extensions
                               .get_extension_for_class(x509.SubjectAlternativeName)
                               .value.get_values_for_type(x509.RFC822Name)]
    part = b"Content-Type: text/plain; charset=us-ascii\r\n\r\nCompte rendu.\r\n"
    der, _ = sign_content(part, signer.certificate, signer.key, now=NOW, detached=True,
                          chain=(pki.intermediate.certificate,))
    raw = (
        b"From: <martin@medecin.fr>\r\nTo: <bob@chu-test.fr>\r\nSubject: CR\r\n"
        b"MIME-Version: 1.0\r\nContent-Type: multipart/signed; "
        b'protocol="application/pkcs7-signature"; micalg=sha-256; boundary="b1"\r\n\r\n'
        b"--b1\r\n" + part + b"\r\n--b1\r\nContent-Type: application/pkcs7-signature\r\n"
        b"Content-Transfer-Encoding: base64\r\n\r\n" + base64.encodebytes(der) + b"--b1--\r\n"
    )
    verdict = SmimeAdapter().unwrap(raw, unwrap_context(pki)).signature
    assert verdict.signer == hostile.lower() and verdict.result == "fail"
    head = trace(verdict)
    assert b"smime=pass" not in head
    assert results_outside_quotes_and_comments(head) == [("smime", "fail")]


# -- forged Authentication-Results in the sender's header block --------------------------------

REST = b"From: <a@chu-test.fr>\r\nSubject: x\r\n\r\nAuthentication-Results: passerelle.example.org;"


def stripped(field: bytes) -> bytes:
    return strip_forged_results(b"Received: from x\r\n" + field + REST, HOST)


def assert_removed(field: bytes) -> None:
    assert stripped(field) == b"Received: from x\r\n" + REST


def assert_kept(field: bytes) -> None:
    assert stripped(field) == b"Received: from x\r\n" + field + REST


def test_forged_results_plain() -> None:
    assert_removed(b"Authentication-Results: passerelle.example.org; smime=pass\r\n")


def test_forged_results_folded_before_the_authserv_id() -> None:
    assert_removed(b"Authentication-Results:\r\n passerelle.example.org; smime=pass\r\n")


def test_forged_results_obs_folded_with_tabs_and_blank_continuations() -> None:
    assert_removed(b"Authentication-Results:\t\r\n\t \r\n \tpasserelle.example.org;\r\n\tsmime=pass\r\n")


def test_forged_results_after_a_comment() -> None:
    assert_removed(b"Authentication-Results: (x) passerelle.example.org; smime=pass\r\n")


def test_forged_results_after_nested_comments_with_quoted_pairs() -> None:
    assert_removed(b"Authentication-Results: (a (b \\) (c)) \\( d)(e)passerelle.example.org;"
                   b" smime=pass\r\n")


def test_forged_results_after_a_comment_folded_over_lines() -> None:
    assert_removed(b"Authentication-Results: (a\r\n b)\r\n\tpasserelle.example.org; smime=pass\r\n")


def test_forged_results_in_another_case() -> None:
    assert_removed(b"authentication-RESULTS: PASSERELLE.Example.ORG; smime=pass\r\n")


def test_forged_results_with_a_trailing_dot() -> None:
    assert_removed(b"Authentication-Results: passerelle.example.org.; smime=pass\r\n")


def test_forged_results_with_an_authserv_version() -> None:
    assert_removed(b"Authentication-Results: passerelle.example.org 1; smime=pass\r\n")
    assert_removed(b"Authentication-Results: passerelle.example.org (v) 1 (w); smime=pass\r\n")


def test_forged_results_with_a_quoted_authserv_id() -> None:
    assert_removed(b'Authentication-Results: "passerelle.example\\.org"; smime=pass\r\n')


def test_forged_results_without_spaces_or_with_space_before_the_colon() -> None:
    assert_removed(b"Authentication-Results:passerelle.example.org;smime=pass\r\n")
    assert_removed(b"Authentication-Results \t: passerelle.example.org; smime=pass\r\n")


def test_forged_results_that_say_none() -> None:
    assert_removed(b"Authentication-Results: passerelle.example.org; none\r\n")
    assert_removed(b"Authentication-Results: passerelle.example.org\r\n")


def test_forged_results_with_a_control_or_non_ascii_after_the_authserv_id() -> None:
    assert_removed(b"Authentication-Results: passerelle.example.org\x00; smime=pass\r\n")
    assert_removed(b"Authentication-Results: passerelle.example.org\xc2\xa0; smime=pass\r\n")
    assert_removed(b"Authentication-Results: passerelle.example.org\xe2\x80\xa8; smime=pass\r\n")


def test_results_whose_authserv_id_cannot_be_read_are_removed() -> None:
    # An RFC 2047 encoded word is not a value, but a reader that decodes first sees our name.
    assert_removed(b"Authentication-Results: =?utf-8?q?passerelle=2Eexample=2Eorg?=; "
                   b"smime=pass\r\n")
    assert_removed(b"Authentication-Results: (unterminated passerelle.example.org; x\r\n")
    assert_removed(b"Authentication-Results: ; smime=pass\r\n")
    assert_removed(b"Authentication-Results:\r\n")


def test_forged_arc_authentication_results() -> None:
    assert_removed(b"ARC-Authentication-Results: i=1; passerelle.example.org; smime=pass\r\n")
    assert_removed(b"ARC-Authentication-Results: i = 2 (x);\r\n\t(y) PASSERELLE.example.org.;"
                   b" smime=pass\r\n")


def test_our_private_fields_are_removed() -> None:
    assert_removed(b"X-Passerelle-Verdict: pass\r\n")
    assert_removed(b"x-passerelle-signature:\r\n verified by passerelle.example.org\r\n")
    assert_removed(b"X-Passerelle : verified\r\n")


def test_forged_results_on_lf_only_lines() -> None:
    message = (b"Subject: x\nAuthentication-Results: passerelle.example.org;\n smime=pass\n"
               b"From: a\n\nbody\n")
    assert strip_forged_results(message, HOST) == b"Subject: x\nFrom: a\n\nbody\n"


def test_forged_results_behind_a_bare_cr() -> None:
    # Python's email package (and others) end a line at a bare CR: the field is real to them.
    message = b"Subject: x\rAuthentication-Results: passerelle.example.org; smime=pass\r\n\r\nb"
    assert strip_forged_results(message, HOST) == b"Subject: x\r\r\nb"


def test_forged_results_after_a_line_that_is_not_a_field() -> None:
    message = b"Subject: x\r\nnot a field\r\nAuthentication-Results: passerelle.example.org; x\r\n\r\n"
    assert strip_forged_results(message, HOST) == b"Subject: x\r\nnot a field\r\n\r\n"


def test_results_of_another_authserv_id_are_kept_byte_for_byte() -> None:
    assert_kept(b"Authentication-Results: passerelle.example.org.evil.test; smime=pass\r\n")
    assert_kept(b"Authentication-Results: evil.passerelle.example.org; smime=pass\r\n")
    assert_kept(b"Authentication-Results: passerelle.example; smime=pass\r\n")
    assert_kept(b"Authentication-Results: (passerelle.example.org) mx.other.example;\r\n"
                b"\tdkim=pass (passerelle.example.org) header.d=chu-test.fr\r\n")
    assert_kept(b"Authentication-Results:  mx.other.example 1 ;  spf=pass\r\n")
    assert_kept(b"ARC-Authentication-Results: i=1; mx.other.example; dkim=pass\r\n")


def test_fields_that_are_not_verdicts_of_ours_are_kept() -> None:
    assert_kept(b"Received: from mx by passerelle.example.org (Passerelle) with ESMTPS id Q0;"
                b"\r\n\tMon, 23 Nov 2026 10:00:00 +0000\r\n")
    assert_kept(b"X-Mailer: Passerelle\r\nX-Passerelles: a name of its own\r\n")
    assert_kept(b"X-MSS-NIL: 1.0\r\nX-Authentication-Results: passerelle.example.org; x\r\n")


def test_results_in_the_body_are_content() -> None:
    message = b"Subject: x\r\n\r\nAuthentication-Results: passerelle.example.org; smime=pass\r\n"
    assert strip_forged_results(message, HOST) is message


def test_header_block_without_a_body() -> None:
    message = b"Subject: x\r\nAuthentication-Results: passerelle.example.org; smime=pass"
    assert strip_forged_results(message, HOST) == b"Subject: x\r\n"


def test_deeply_nested_comments_and_many_fields_are_scanned_in_one_pass() -> None:
    nested = b"Authentication-Results: " + b"(" * 200_000 + b")" * 200_000 + b" " + HOST.encode()
    many = b"Authentication-Results: mx.other.example; spf=pass\r\n" * 20_000
    message = nested + b"; smime=pass\r\n" + many + b"\r\nbody"
    assert strip_forged_results(message, HOST) == many + b"\r\nbody"
    unbalanced = b"Authentication-Results: " + b"(" * 300_000 + b"\r\n\r\n"
    assert strip_forged_results(unbalanced, HOST) == b"\r\n"
