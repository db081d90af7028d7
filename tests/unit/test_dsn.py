"""RFC 3464 reports built by gateway.dsn, read back with Python's email package."""

from __future__ import annotations

import datetime as dt
import email
import email.message
import email.policy

import pytest

from gateway import dsn
from gateway.envelope import DeliveryState, Envelope, Peer, Recipient, Status

NOW = dt.datetime(2026, 11, 23, 10, 0, 0, tzinfo=dt.UTC)
SUBJECT = "CR biologie DUPONT Jean né le 01/02/1950"
ORIGINAL = (
    "From: Dr A <a@clinique-test.fr>\r\n"
    "To: <b@chu-test.fr>, <gone@chu-test.fr>\r\n"
    f"Subject: {SUBJECT}\r\n"
    "Message-ID: <orig.1@clinique-test.fr>\r\n"
    "MIME-Version: 1.0\r\n"
    "Content-Type: text/plain; charset=utf-8\r\n"
    "\r\n"
    "Résultats confidentiels du patient.\r\n"
).encode()
BODY_MARK = "Résultats confidentiels".encode()


def envelope(**changes: object) -> Envelope:
    fields: dict[str, object] = {
        "queue_id": "Q0001",
        "sender": "a@clinique-test.fr",
        "recipients": (
            Recipient("b@chu-test.fr", "hospital"),
            Recipient("gone@chu-test.fr", "hospital", orcpt="rfc822;Gone@chu-test.fr"),
        ),
        "source_network": "clinic",
        "peer": Peer("127.0.0.1"),
        "received_at": NOW.timestamp() - 3600,
        "size": len(ORIGINAL),
        "message_id": "<orig.1@clinique-test.fr>",
    }
    fields.update(changes)
    return Envelope(**fields)  # type: ignore[arg-type]


def report(recipient: Recipient, **changes: object) -> dsn.RecipientReport:
    fields: dict[str, object] = {
        "recipient": recipient,
        "status": "5.1.1",
        "diagnostic": "550 5.1.1 No such user",
        "remote_mta": "mx.chu-test.fr",
        "last_attempt": NOW,
        "advice": "The recipient's mailbox does not exist; check the address.",
    }
    fields.update(changes)
    return dsn.RecipientReport(**fields)  # type: ignore[arg-type]


def build(env: Envelope, reports: list[dsn.RecipientReport], action: dsn.Action = "failed",
          original: bytes = ORIGINAL) -> bytes:
    return dsn.build_dsn(
        envelope=env, reports=reports, action=action, reporting_mta="passerelle.test",
        original=original, now=NOW, random_token="0123abcd",
    )


def parse(data: bytes) -> email.message.Message:
    return email.message_from_bytes(data, policy=email.policy.compat32)


def parts(data: bytes) -> list[email.message.Message]:
    message = parse(data)
    assert message.get_content_type() == "multipart/report"
    assert message.get_param("report-type") == "delivery-status"
    payload = message.get_payload()
    assert isinstance(payload, list)
    return [part for part in payload if isinstance(part, email.message.Message)]


def ours(data: bytes) -> bytes:
    """The report without the returned original (its third part)."""
    return data[: data.index(b"Content-Type: text/rfc822-headers")]


def status_blocks(data: bytes) -> list[email.message.Message]:
    status = parts(data)[1]
    assert status.get_content_type() == "message/delivery-status"
    blocks = status.get_payload()
    assert isinstance(blocks, list)
    return [block for block in blocks if isinstance(block, email.message.Message)]


# -- structure ------------------------------------------------------------------------------


def test_structure_and_headers() -> None:
    env = envelope()
    data = build(env, [report(env.recipients[1])])
    assert b"\n" not in data.replace(b"\r\n", b"")  # CRLF only
    # What the gateway wrote is 7-bit; only the returned headers carry the sender's own 8-bit
    # Subject, and that part says so.
    assert ours(data).isascii()
    assert parts(data)[2]["Content-Transfer-Encoding"] == "8bit"
    message = parse(data)
    assert message["From"] == "Mail Delivery System <MAILER-DAEMON@passerelle.test>"
    assert message["To"] == "<a@clinique-test.fr>"
    assert message["Subject"] == "Delivery Status Notification (Failure)"
    assert message["Auto-Submitted"] == "auto-replied"
    assert message["MIME-Version"] == "1.0"
    assert message["In-Reply-To"] == "<orig.1@clinique-test.fr>"
    assert message["References"] == "<orig.1@clinique-test.fr>"
    assert "0123abcd" in message["Message-ID"]
    assert message["Date"] == "Mon, 23 Nov 2026 10:00:00 +0000"
    human, status, returned = parts(data)
    assert human.get_content_type() == "text/plain"
    assert status.get_content_type() == "message/delivery-status"
    assert returned.get_content_type() == "text/rfc822-headers"
    # The patient's name never reaches the report's own headers.
    own_headers = data.split(b"\r\n\r\n", 1)[0]
    assert b"DUPONT" not in own_headers


def test_per_message_and_per_recipient_fields() -> None:
    env = envelope(envid="QX+2B1")
    data = build(env, [report(env.recipients[1])])
    per_message, recipient = status_blocks(data)
    assert per_message["Reporting-MTA"] == "dns; passerelle.test"
    # RFC 3461 §4.4: ENVID travels as xtext; the report carries the identifier itself.
    assert per_message["Original-Envelope-Id"] == "QX+1"
    assert per_message["Arrival-Date"] == "Mon, 23 Nov 2026 09:00:00 +0000"
    assert recipient["Original-Recipient"] == "rfc822;Gone@chu-test.fr"
    assert recipient["Final-Recipient"] == "rfc822; gone@chu-test.fr"
    assert recipient["Action"] == "failed"
    assert recipient["Status"] == "5.1.1"
    assert recipient["Remote-MTA"] == "dns; mx.chu-test.fr"
    assert recipient["Diagnostic-Code"] == "smtp; 550 5.1.1 No such user"
    assert recipient["Last-Attempt-Date"] == "Mon, 23 Nov 2026 10:00:00 +0000"
    assert recipient["Will-Retry-Until"] is None


def test_no_envid_no_orcpt_means_no_such_fields() -> None:
    env = envelope()
    per_message, recipient = status_blocks(build(env, [report(env.recipients[0])]))
    assert per_message["Original-Envelope-Id"] is None
    assert recipient["Original-Recipient"] is None
    assert recipient["Final-Recipient"] == "rfc822; b@chu-test.fr"


def test_one_block_per_reported_recipient() -> None:
    env = envelope()
    reports = [report(r) for r in env.recipients]
    blocks = status_blocks(build(env, reports))
    assert [b["Final-Recipient"] for b in blocks[1:]] == [
        "rfc822; b@chu-test.fr", "rfc822; gone@chu-test.fr",
    ]


def test_human_part_carries_the_advice_for_each_recipient() -> None:
    env = envelope()
    reports = [
        report(env.recipients[0], advice="No certificate is known for b@chu-test.fr; ask them "
               "to publish one.", diagnostic="554 5.7.1 no recipient certificate",
               remote_mta=None),
        report(env.recipients[1]),
    ]
    human = parts(build(env, reports))[0]
    text = human.get_payload(decode=True)
    assert isinstance(text, bytes)
    body = text.decode("utf-8")
    assert "could not be delivered" in body
    assert "No certificate is known for b@chu-test.fr; ask them to publish one." in " ".join(
        body.split()
    )
    assert "check the address" in body
    assert "Votre message n'a pas pu être remis" in " ".join(body.split())
    assert SUBJECT not in body


def test_gateway_reason_is_not_labelled_as_an_smtp_reply() -> None:
    env = envelope()
    data = build(env, [report(env.recipients[0], diagnostic="no recipient certificate")])
    assert status_blocks(data)[1]["Diagnostic-Code"] == "X-Passerelle; no recipient certificate"


# -- RET ------------------------------------------------------------------------------------


@pytest.mark.parametrize("ret", [None, "HDRS"])
def test_ret_hdrs_returns_only_the_headers(ret: str | None) -> None:
    env = envelope(ret=ret)
    data = build(env, [report(env.recipients[1])])
    returned = parts(data)[2]
    assert returned.get_content_type() == "text/rfc822-headers"
    assert BODY_MARK not in data
    text = returned.get_payload()
    assert isinstance(text, str)
    assert "Message-ID: <orig.1@clinique-test.fr>" in text
    assert SUBJECT.encode() in data  # headers go back to the sender, who wrote them


def test_ret_full_returns_the_whole_message() -> None:
    env = envelope(ret="FULL")
    data = build(env, [report(env.recipients[1])])
    returned = parts(data)[2]
    assert returned.get_content_type() == "message/rfc822"
    assert returned["Content-Transfer-Encoding"] == "8bit"  # the body is UTF-8
    assert ORIGINAL in data
    payload = returned.get_payload()
    assert isinstance(payload, list)
    inner = payload[0]
    assert isinstance(inner, email.message.Message)
    assert inner["Message-ID"] == "<orig.1@clinique-test.fr>"


def test_bare_lf_original_is_returned_with_crlf() -> None:
    env = envelope(ret="FULL")
    data = build(env, [report(env.recipients[1])], original=ORIGINAL.replace(b"\r\n", b"\n"))
    assert b"\n" not in data.replace(b"\r\n", b"")
    assert ORIGINAL in data


def test_boundary_never_occurs_in_the_returned_message() -> None:
    env = envelope(ret="FULL")
    hostile = ORIGINAL + b"--=_dsn_0123abcd\r\n"
    data = build(env, [report(env.recipients[1])], original=hostile)
    assert len(parts(data)) == 3
    assert parse(data).get_boundary() != "=_dsn_0123abcd"


# -- actions --------------------------------------------------------------------------------


def test_delayed_report() -> None:
    env = envelope()
    until = NOW + dt.timedelta(days=5)
    data = build(env, [report(env.recipients[0], status="4.4.1",
                              diagnostic="421 4.4.1 no answer", will_retry_until=until)],
                 action="delayed")
    assert parse(data)["Subject"] == "Delivery Status Notification (Delay)"
    recipient = status_blocks(data)[1]
    assert recipient["Action"] == "delayed"
    assert recipient["Status"] == "4.4.1"
    assert recipient["Will-Retry-Until"] == "Sat, 28 Nov 2026 10:00:00 +0000"


@pytest.mark.parametrize("action", ["delivered", "relayed", "expanded"])
def test_success_reports(action: dsn.Action) -> None:
    env = envelope()
    data = build(env, [report(env.recipients[0], status="2.0.0", diagnostic="250 2.0.0 Ok")],
                 action=action)
    assert parse(data)["Subject"] == "Delivery Status Notification (Success)"
    recipient = status_blocks(data)[1]
    assert recipient["Action"] == action
    assert recipient["Status"] == "2.0.0"


def test_status_class_follows_the_action() -> None:
    env = envelope()
    data = build(env, [report(env.recipients[0], status="4.4.1")], action="failed")
    assert status_blocks(data)[1]["Status"] == "5.4.1"
    data = build(env, [report(env.recipients[0], status="garbage")], action="failed")
    assert status_blocks(data)[1]["Status"] == "5.0.0"


def test_unknown_action_and_empty_reports_are_refused() -> None:
    env = envelope()
    with pytest.raises(ValueError):
        build(env, [report(env.recipients[0])], action="bounced")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        build(env, [])


# -- 7-bit safety ---------------------------------------------------------------------------


def test_non_ascii_and_hostile_text_stays_seven_bit_and_on_one_field() -> None:
    recipient = Recipient("jérôme@chu-test.fr", "hospital")
    env = envelope(sender="médecin@clinique-test.fr", recipients=(recipient,))
    diagnostic = "550 5.1.1 Destinataire inconnu é\r\nX-Injected: yes"
    data = build(env, [report(recipient, diagnostic=diagnostic, advice="Adresse inconnue.")])
    assert ours(data).isascii()
    message = parse(data)
    assert "=?utf-8?" in message["To"]
    block = status_blocks(data)[1]
    assert block["Final-Recipient"] == "utf-8; j\\x{E9}r\\x{F4}me@chu-test.fr"
    assert block["X-Injected"] is None
    assert "\\x{E9}" in block["Diagnostic-Code"]
    human = parts(data)[0].get_payload(decode=True)
    assert isinstance(human, bytes)
    assert "jérôme@chu-test.fr" in human.decode("utf-8")


def test_hostile_envid_does_not_inject_a_field() -> None:
    env = envelope(envid="A+0D+0AX-Evil:+201")
    per_message = status_blocks(build(env, [report(env.recipients[0])]))[0]
    assert per_message["X-Evil"] is None
    assert per_message["Original-Envelope-Id"] == "A+0D+0AX-Evil:+201"


def test_long_diagnostic_is_folded() -> None:
    env = envelope()
    long = "550 5.7.1 " + " ".join(["refused"] * 60)
    data = build(env, [report(env.recipients[0], diagnostic=long)])
    assert all(len(line) <= 998 for line in data.split(b"\r\n"))
    value = status_blocks(data)[1]["Diagnostic-Code"]
    assert " ".join(value.split()) == f"smtp; {long}"


def test_message_id_is_taken_from_the_original_when_the_envelope_has_none() -> None:
    env = envelope(message_id=None)
    assert parse(build(env, [report(env.recipients[0])]))["In-Reply-To"] == (
        "<orig.1@clinique-test.fr>"
    )


# -- who gets a DSN -------------------------------------------------------------------------


def states(env: Envelope, *statuses: Status, delay_notified: bool = False) -> DeliveryState:
    state = DeliveryState.initial(env)
    for recipient, status in zip(env.recipients, statuses, strict=True):
        state = state.update(recipient.address, status=status, delay_notified=delay_notified)
    return state


def notify_envelope(*notify: tuple[str, ...]) -> Envelope:
    return envelope(recipients=tuple(
        Recipient(f"r{i}@chu-test.fr", "hospital", notify=n) for i, n in enumerate(notify)
    ))


def test_should_send_dsn() -> None:
    assert dsn.should_send_dsn(envelope())
    assert not dsn.should_send_dsn(envelope(sender=""))
    assert not dsn.should_send_dsn(envelope(generated=True))


def test_notify_never_means_no_report() -> None:
    env = notify_envelope(("NEVER",))
    for event, status in (("FAILURE", Status.BOUNCED), ("DELAY", Status.DEFERRED),
                          ("SUCCESS", Status.DELIVERED)):
        assert dsn.dsn_recipients(env, states(env, status), event) == []  # type: ignore[arg-type]


def test_default_notify_is_failure_and_delay() -> None:
    env = notify_envelope(())
    assert dsn.dsn_recipients(env, states(env, Status.BOUNCED), "FAILURE") == list(env.recipients)
    assert dsn.dsn_recipients(env, states(env, Status.DEFERRED), "DELAY") == list(env.recipients)
    assert dsn.dsn_recipients(env, states(env, Status.DELIVERED), "SUCCESS") == []


def test_explicit_notify_lists() -> None:
    env = notify_envelope(("SUCCESS",), ("FAILURE",), ("DELAY",), ("SUCCESS", "FAILURE"))
    bounced = states(env, *([Status.BOUNCED] * 4))
    assert [r.address for r in dsn.dsn_recipients(env, bounced, "FAILURE")] == [
        "r1@chu-test.fr", "r3@chu-test.fr",
    ]
    delivered = states(env, *([Status.DELIVERED] * 4))
    assert [r.address for r in dsn.dsn_recipients(env, delivered, "SUCCESS")] == [
        "r0@chu-test.fr", "r3@chu-test.fr",
    ]
    deferred = states(env, *([Status.DEFERRED] * 4))
    assert [r.address for r in dsn.dsn_recipients(env, deferred, "DELAY")] == ["r2@chu-test.fr"]


def test_only_recipients_in_the_matching_state_are_reported() -> None:
    env = notify_envelope((), ())
    mixed = states(env, Status.BOUNCED, Status.DELIVERED)
    assert [r.address for r in dsn.dsn_recipients(env, mixed, "FAILURE")] == ["r0@chu-test.fr"]


def test_delay_is_reported_once() -> None:
    env = notify_envelope(("DELAY",))
    assert dsn.dsn_recipients(env, states(env, Status.DEFERRED, delay_notified=True), "DELAY") == []


def test_null_sender_and_generated_reports_get_nothing() -> None:
    for env in (envelope(sender=""), envelope(generated=True)):
        assert dsn.dsn_recipients(env, states(env, Status.BOUNCED, Status.BOUNCED),
                                  "FAILURE") == []
