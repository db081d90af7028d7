"""The S/MIME adapter in the pipeline and the queue manager: what a stale or badly signed CRL
does to a message (DESIGN.md §10 "Revocation").

A CRL past its nextUpdate is the operator's to fix, so the message is deferred (451 4.7.5,
revocation_unknown), never delivered meanwhile, and bounced only at the retry give-up time;
once the CRL is refreshed (a reload: a new Runtime with a new TrustStore) it goes through.
"""

from __future__ import annotations

import base64
import datetime as dt
import os
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import pytest
from asn1crypto import cms
from cryptography.hazmat.primitives.asymmetric import ec

from adapters.base import TrustStore
from adapters.cms.encrypt import encrypt_content
from adapters.cms.entity import decode_body, parse_entity
from adapters.cms.sign import sign_content
from adapters.smime import SmimeAdapter
from gateway.config import NetworkSettings, Requirements, RetrySettings
from gateway.delivery import Outcome
from gateway.envelope import Envelope, Peer, Recipient, Status
from gateway.errors import PermanentFailure, Reason, TemporaryFailure
from gateway.pipeline import Prepared, prepare
from gateway.qmgr import QueueManager
from gateway.runtime import Runtime
from gateway.spool import Spool
from tests.support.smime_pki import NOW, SmimePki, smime_runtime, unwrap_context
from tests.support.testpki import root

DATE = NOW.strftime("%a, %d %b %Y %H:%M:%S +0000").encode()
HOSPITAL_LETTER = (
    b"From: cardio@chu-test.fr\r\nTo: bob@medecin.fr\r\nSubject: CR\r\nDate: " + DATE + b"\r\n"
    b"Message-ID: <1@chu-test.fr>\r\nMIME-Version: 1.0\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n\r\nCompte rendu.\r\n"
)
PART = b"Content-Type: text/plain; charset=utf-8\r\n\r\nAvis du cardiologue.\r\n"
ADVICE = "The revocation status of a certificate this message depends on cannot be checked now"


@pytest.fixture(scope="module")
def pki() -> SmimePki:
    pki = SmimePki.create()
    pki.person("gw@passerelle.test")
    pki.person("bob@medecin.fr")
    pki.person("martin@medecin.fr")
    return pki


def stale(pki: SmimePki) -> TrustStore:
    """The intermediate's CRL, three days past its nextUpdate; the root's is fresh."""
    old = pki.intermediate.crl(last_update=NOW - dt.timedelta(days=10),
                               next_update=NOW - dt.timedelta(days=3))
    return TrustStore(anchors=(pki.root.certificate,), crls=(pki.root.crl(), old))


def badly_signed(pki: SmimePki) -> TrustStore:
    forged = pki.intermediate.crl(signer=root())
    return TrustStore(anchors=(pki.root.certificate,), crls=(pki.root.crl(), forged))


def runtime(pki: SmimePki, trust: TrustStore, **kwargs: object) -> Runtime:
    return smime_runtime(pki, pki.people["gw@passerelle.test"], trust=trust,
                         **kwargs)  # type: ignore[arg-type]


def outbound(recipients: Sequence[str] = ("bob@medecin.fr",)) -> Envelope:
    return Envelope(
        queue_id="Q1", sender="cardio@chu-test.fr",
        recipients=tuple(Recipient(r, "medecin") for r in recipients), source_network="hospital",
        peer=Peer("192.0.2.7", 25, "mx.chu-test.fr", True), received_at=NOW.timestamp(),
        size=len(HOSPITAL_LETTER),
    )


def inbound(pki: SmimePki) -> tuple[Envelope, bytes]:
    """Mail from martin@medecin.fr, signed (multipart/signed), to the hospital."""
    signer = pki.people["martin@medecin.fr"]
    der, _ = sign_content(PART, signer.certificate, signer.key, now=NOW, detached=True,
                          chain=(pki.intermediate.certificate,))
    signature = base64.encodebytes(der)
    raw = (
        b"From: martin@medecin.fr\r\nTo: cardio@chu-test.fr\r\nSubject: Avis\r\n"
        b"Date: " + DATE + b"\r\nMIME-Version: 1.0\r\n"
        b'Content-Type: multipart/signed; protocol="application/pkcs7-signature"; '
        b'micalg=sha-256; boundary="s"\r\n\r\n--s\r\n' + PART + b"\r\n--s\r\n"
        b"Content-Type: application/pkcs7-signature\r\nContent-Transfer-Encoding: base64\r\n"
        b"\r\n" + signature + b"--s--\r\n"
    )
    envelope = Envelope(
        queue_id="Q2", sender="martin@medecin.fr",
        recipients=(Recipient("cardio@chu-test.fr", "hospital"),), source_network="medecin",
        peer=Peer("192.0.2.8", 25, "mx.medecin.fr", True), received_at=NOW.timestamp(),
        size=len(raw),
    )
    return envelope, raw


def assert_deferred(prepared: Prepared, *addresses: str) -> None:
    assert prepared.batches == ()
    assert set(prepared.failed) == set(addresses)
    for error in prepared.failed.values():
        assert isinstance(error, TemporaryFailure), repr(error)
        assert not error.permanent
        assert error.smtp_reply.startswith("451 4.7.5 ")
        assert error.reason is Reason.REVOCATION_UNKNOWN
        assert ADVICE in error.advice


# -- wrap: the recipient's certificate -------------------------------------------------------


def test_recipient_with_a_stale_crl_is_deferred_not_bounced(pki: SmimePki) -> None:
    prepared = prepare(runtime(pki, stale(pki)), outbound(), HOSPITAL_LETTER,
                       outbound().recipients, NOW)
    assert_deferred(prepared, "bob@medecin.fr")
    assert "stale" in prepared.failed["bob@medecin.fr"].detail


def test_only_the_recipient_whose_crl_is_stale_waits_the_others_are_delivered() -> None:
    pki = SmimePki.create()
    pki.person("gw@passerelle.test")
    pki.person("bob@medecin.fr")  # under the intermediate, whose CRL is stale
    pki.person("chef@medecin.fr", issuer=pki.root)  # under the root, whose CRL is fresh
    envelope = outbound(("bob@medecin.fr", "chef@medecin.fr"))
    prepared = prepare(runtime(pki, stale(pki)), envelope, HOSPITAL_LETTER,
                       envelope.recipients, NOW)
    [batch] = prepared.batches
    assert [r.address for r in batch.recipients] == ["chef@medecin.fr"]
    assert set(prepared.failed) == {"bob@medecin.fr"}
    waiting = prepared.failed["bob@medecin.fr"]
    assert isinstance(waiting, TemporaryFailure) and waiting.smtp_reply.startswith("451 4.7.5 ")
    opened = SmimeAdapter().unwrap(batch.content,
                                   unwrap_context(pki, me=pki.people["chef@medecin.fr"]))
    assert opened.content.endswith(b"\r\n\r\nCompte rendu.\r\n")


def test_recipient_with_a_badly_signed_crl_is_deferred_not_bounced(pki: SmimePki) -> None:
    prepared = prepare(runtime(pki, badly_signed(pki)), outbound(), HOSPITAL_LETTER,
                       outbound().recipients, NOW)
    assert_deferred(prepared, "bob@medecin.fr")
    assert "not signed" in prepared.failed["bob@medecin.fr"].detail


def test_recipient_goes_through_once_the_crl_is_refreshed(pki: SmimePki) -> None:
    envelope = outbound()
    assert_deferred(prepare(runtime(pki, stale(pki)), envelope, HOSPITAL_LETTER,
                            envelope.recipients, NOW), "bob@medecin.fr")
    refreshed = runtime(pki, pki.trust(crls=True))  # what a reload with the new CRL builds
    prepared = prepare(refreshed, envelope, HOSPITAL_LETTER, envelope.recipients, NOW)
    assert prepared.failed == {}
    [batch] = prepared.batches
    assert [r.address for r in batch.recipients] == ["bob@medecin.fr"]
    opened = SmimeAdapter().unwrap(batch.content,
                                   unwrap_context(pki, me=pki.people["bob@medecin.fr"]))
    assert opened.content.endswith(b"\r\n\r\nCompte rendu.\r\n")


def test_revoked_recipient_under_a_stale_crl_still_bounces(pki: SmimePki) -> None:
    # A revocation the CA published is not undone by the list ageing: that one is final.
    revoked = pki.person("rev@medecin.fr")
    pki.intermediate.revoke(revoked)
    try:
        trust = stale(pki)
    finally:
        pki.intermediate.revoked.clear()
    envelope = outbound(("rev@medecin.fr",))
    prepared = prepare(runtime(pki, trust), envelope, HOSPITAL_LETTER, envelope.recipients, NOW)
    error = prepared.failed["rev@medecin.fr"]
    assert isinstance(error, PermanentFailure) and error.reason is Reason.NO_RECIPIENT_KEY
    assert "revoked" in error.detail


# -- unwrap: a required signature -------------------------------------------------------------


def test_required_signature_with_a_stale_crl_is_deferred(pki: SmimePki) -> None:
    envelope, raw = inbound(pki)
    prepared = prepare(runtime(pki, stale(pki)), envelope, raw, envelope.recipients, NOW)
    assert_deferred(prepared, "cardio@chu-test.fr")
    # The verdict is kept for the audit trail: a failure, never a pass.
    assert prepared.verdict.result == "fail"
    assert prepared.verdict.failure is Reason.REVOCATION_UNKNOWN


def test_required_signature_with_a_badly_signed_crl_is_deferred(pki: SmimePki) -> None:
    envelope, raw = inbound(pki)
    prepared = prepare(runtime(pki, badly_signed(pki)), envelope, raw, envelope.recipients, NOW)
    assert_deferred(prepared, "cardio@chu-test.fr")


def test_required_signature_passes_once_the_crl_is_refreshed(pki: SmimePki) -> None:
    envelope, raw = inbound(pki)
    assert_deferred(prepare(runtime(pki, stale(pki)), envelope, raw, envelope.recipients, NOW),
                    "cardio@chu-test.fr")
    prepared = prepare(runtime(pki, pki.trust(crls=True)), envelope, raw, envelope.recipients,
                       NOW)
    assert prepared.failed == {}
    assert prepared.verdict.result == "pass"
    [batch] = prepared.batches
    assert b"smime=pass" in batch.content and batch.content.endswith(PART)


def test_revoked_signer_under_a_stale_crl_is_refused_for_good(pki: SmimePki) -> None:
    pki.intermediate.revoke(pki.people["martin@medecin.fr"])
    try:
        trust = stale(pki)
    finally:
        pki.intermediate.revoked.clear()
    envelope, raw = inbound(pki)
    prepared = prepare(runtime(pki, trust), envelope, raw, envelope.recipients, NOW)
    error = prepared.failed["cardio@chu-test.fr"]
    assert isinstance(error, PermanentFailure) and error.reason is Reason.REVOKED


# -- the queue manager: deferred on every attempt, bounced at the give-up time ----------------


class Recorder:
    """A transport that records what it would have sent (nothing should be)."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, Sequence[Recipient]]] = []

    async def send(self, network: NetworkSettings, sender: str,
                   recipients: Sequence[Recipient], message: bytes, *,
                   envid: str | None, ret: str | None) -> list[Outcome]:
        self.sent.append((network.name, recipients))
        return [Outcome(r.address, "delivered", 250, "2.0.0", "ok", None) for r in recipients]


async def test_queue_defers_until_the_give_up_time_then_bounces(
    pki: SmimePki, tmp_path: Path,
) -> None:
    retry = RetrySettings(schedule=(60.0,), give_up_after=3600.0)
    gateway = runtime(pki, stale(pki), retry=retry)
    spool = Spool(tmp_path / "spool")
    spool.open()
    clock = [NOW.timestamp()]
    transport = Recorder()
    manager = QueueManager(spool, lambda: gateway, transport, clock=lambda: clock[0])
    envelope = replace(outbound(), queue_id=spool.new_queue_id(), received_at=clock[0])
    try:
        await spool.enqueue(envelope, HOSPITAL_LETTER)
        for _ in range(3):  # each retry within the give-up time: deferred again
            await manager.attempt(envelope.queue_id)
            [state] = spool.read_state(envelope.queue_id).recipients
            assert state.status is Status.DEFERRED
            assert state.enhanced == "4.7.5" and state.reason == "revocation_unknown"
            clock[0] = state.next_attempt
        clock[0] = envelope.received_at + retry.give_up_after
        await manager.attempt(envelope.queue_id)
        assert spool.locate(envelope.queue_id) is None  # finished: bounced, DSN queued
        assert transport.sent == []  # never delivered meanwhile
        dsns = [e for e in spool.recover() if e.queue_id != envelope.queue_id]
        assert len(dsns) == 1
        notice, report = spool.load(dsns[0].queue_id)
        assert notice.recipients[0].address == "cardio@chu-test.fr"
        assert b"5.4.7" in report and b"4.7.5" in report
        assert ADVICE.encode() in report.replace(b"\r\n ", b" ")
    finally:
        spool.close()


# -- what the destination and the sender see ---------------------------------------------------


def test_one_encryption_for_all_recipients_and_a_dsn_for_the_one_without_a_certificate(
    pki: SmimePki,
) -> None:
    pki.person("carol@medecin.fr", curve=ec.SECP384R1())
    envelope = outbound(("bob@medecin.fr", "nobody@medecin.fr", "carol@medecin.fr"))
    prepared = prepare(runtime(pki, pki.trust(crls=True)), envelope, HOSPITAL_LETTER,
                       envelope.recipients, NOW)
    error = prepared.failed["nobody@medecin.fr"]
    assert list(prepared.failed) == ["nobody@medecin.fr"]
    assert isinstance(error, PermanentFailure) and error.smtp_reply.startswith("550 5.7.1 ")
    assert error.reason is Reason.NO_RECIPIENT_KEY and "ask the recipient" in error.advice
    [batch] = prepared.batches
    assert [r.address for r in batch.recipients] == ["bob@medecin.fr", "carol@medecin.fr"]
    entity = parse_entity(batch.content)
    info = cms.ContentInfo.load(decode_body(entity))
    assert info["content_type"].native == "enveloped_data"
    assert len(info["content"]["recipient_infos"]) == 2  # one envelope, a key for each
    for address in ("bob@medecin.fr", "carol@medecin.fr"):
        opened = SmimeAdapter().unwrap(batch.content, unwrap_context(pki, me=pki.people[address]))
        assert opened.content.endswith(b"\r\n\r\nCompte rendu.\r\n")


def test_authentication_results_carry_the_rfc7281_properties(pki: SmimePki) -> None:
    envelope, raw = inbound(pki)
    prepared = prepare(runtime(pki, pki.trust(crls=True)), envelope, raw, envelope.recipients,
                       NOW)
    [batch] = prepared.batches
    head = parse_entity(batch.content)
    [results] = [v for n, v in head.fields if n == "authentication-results"]
    signer = pki.people["martin@medecin.fr"].certificate
    assert results.startswith("passerelle.test; smime=pass (signature verified)")
    assert "body.smime-identifier=martin@medecin.fr" in results
    assert f"body.smime-serial={signer.serial_number:x}" in results
    assert f'body.smime-issuer="{signer.issuer.rfc4514_string()}"' in results


def test_required_signature_that_fails_is_a_dsn_with_an_integrity_code(pki: SmimePki) -> None:
    envelope, raw = inbound(pki)
    tampered = raw.replace(b"Avis du cardiologue.", b"Avis du cardiologue!")
    prepared = prepare(runtime(pki, pki.trust(crls=True)), envelope, tampered,
                       envelope.recipients, NOW)
    error = prepared.failed["cardio@chu-test.fr"]
    assert isinstance(error, PermanentFailure) and error.smtp_reply.startswith("550 5.7.7 ")
    assert error.reason is Reason.SIGNATURE_INVALID
    assert "requires a valid signature" in error.advice and "message-digest" in error.advice
    assert prepared.batches == ()


def test_required_encryption_missing_is_a_dsn(pki: SmimePki) -> None:
    envelope, raw = inbound(pki)
    gateway = runtime(pki, pki.trust(crls=True),
                      require=Requirements(signature=True, encryption=True))
    prepared = prepare(gateway, envelope, raw, envelope.recipients, NOW)
    error = prepared.failed["cardio@chu-test.fr"]
    assert isinstance(error, PermanentFailure) and error.smtp_reply.startswith("550 5.7.1 ")
    assert error.reason is Reason.ENCRYPTION_MISSING and prepared.batches == ()


def test_encrypt_then_sign_under_a_required_signature_is_a_dsn_saying_why(
    pki: SmimePki,
) -> None:
    envelope, raw = inbound(pki)
    signer = pki.people["martin@medecin.fr"]
    sealed = encrypt_content(PART, [pki.people["gw@passerelle.test"].certificate],
                             random=os.urandom)
    enveloped = (b"Content-Type: application/pkcs7-mime; smime-type=enveloped-data\r\n"
                 b"Content-Transfer-Encoding: base64\r\n\r\n" + base64.encodebytes(sealed))
    der, _ = sign_content(enveloped, signer.certificate, signer.key, now=NOW, detached=False,
                          chain=(pki.intermediate.certificate,))
    outer = raw.split(b"Content-Type: multipart/signed")[0] + (
        b"Content-Type: application/pkcs7-mime; smime-type=signed-data\r\n"
        b"Content-Transfer-Encoding: base64\r\n\r\n" + base64.encodebytes(der))
    prepared = prepare(runtime(pki, pki.trust(crls=True)), envelope, outer,
                       envelope.recipients, NOW)
    assert prepared.verdict.result == "neutral" and prepared.encrypted
    # What the audit needs to know: who signed the ciphertext, what was decrypted.
    assert any(n.startswith("over-ciphertext smime layer") and "martin@medecin.fr" in n
               for n in prepared.notes)
    assert "decrypted aes256_cbc with rsaes_pkcs1v15" in prepared.notes
    error = prepared.failed["cardio@chu-test.fr"]
    assert isinstance(error, PermanentFailure) and error.reason is Reason.SIGNATURE_MISSING
    assert "signature covers only the encrypted content" in error.advice
