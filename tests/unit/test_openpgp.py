"""The `openpgp` adapter without an outside peer: keys, failure shapes, never plaintext."""

from __future__ import annotations

import base64
import itertools
from datetime import UTC, datetime, timedelta

import pysequoia
import pytest

from adapters import REGISTRY
from adapters.base import (
    Directory,
    Identity,
    TrustStore,
    UnwrapContext,
    Unwrapped,
    Verdict,
    WrapContext,
)
from adapters.cms.entity import decode_body, parse_entity
from adapters.openpgp import OpenPgpAdapter
from adapters.pgpkeys import generate_identity, network_key, sign_detached
from adapters.pgpmime import canonical_crlf
from adapters.pgppackets import read_secret_keys
from gateway.errors import GatewayError, PermanentFailure, Reason

NOW = datetime(2026, 11, 23, 10, 0, tzinfo=UTC)
ADAPTER = OpenPgpAdapter()
CONTENT = (b"From: <a@chu.test>\r\nTo: <b@pgp.test>\r\nSubject: s\r\n"
           b"Content-Type: text/plain\r\n\r\nbonjour\r\n")


def counter_random() -> object:
    numbers = itertools.count()
    return lambda n: bytes((next(numbers) * 7 + i) % 256 for i in range(n))


def test_registered() -> None:
    assert REGISTRY["openpgp"].method == "x-openpgp"
    assert REGISTRY["apicrypt"].method == "x-apicrypt"


def test_generate_identity_is_deterministic_given_time_and_randomness() -> None:
    first = generate_identity("GW <gw@x.test>", created=NOW, random=counter_random())  # type: ignore[arg-type]
    second = generate_identity("GW <gw@x.test>", created=NOW, random=counter_random())  # type: ignore[arg-type]
    assert first == second and first.startswith(b"-----BEGIN PGP PRIVATE KEY BLOCK-----")
    tsk = pysequoia.Tsk.from_bytes(first)
    keys = read_secret_keys(bytes(tsk))
    assert [k.algorithm for k in keys] == [22, 18]  # Ed25519 [SC], Cv25519 [E]
    assert [str(u) for u in tsk.extract_certificate().user_ids] == ["GW <gw@x.test>"]


def test_sequoia_round_trip_with_generated_keys() -> None:
    gateway = generate_identity("GW <gw@x.test>", created=NOW - timedelta(days=1))
    peer = generate_identity("Bob <b@pgp.test>", created=NOW - timedelta(days=1))
    peer_cert = str(pysequoia.Tsk.from_bytes(peer).extract_certificate()).encode()
    gateway_cert = str(pysequoia.Tsk.from_bytes(gateway).extract_certificate()).encode()
    wrapped = ADAPTER.wrap(
        Unwrapped(CONTENT, Verdict.unsigned(), "mime"),
        WrapContext("pgp", Identity("gw", openpgp_secret=gateway), TrustStore(),
                    Directory(openpgp=(peer_cert,)), NOW, "a@chu.test", ("b@pgp.test",)),
    )
    assert not wrapped.refused and b"bonjour" not in wrapped.content
    # The signed inner header says a@chu.test: signed by the gateway, so not the From's key.
    mismatch = ADAPTER.unwrap(
        wrapped.content,
        UnwrapContext("pgp", Identity("b", openpgp_secret=peer), TrustStore(),
                      Directory(openpgp=(gateway_cert,)), NOW),
    )
    assert mismatch.signature.failure == Reason.SIGNER_MISMATCH
    wrapped = ADAPTER.wrap(
        Unwrapped(CONTENT.replace(b"<a@chu.test>", b"<gw@x.test>"), Verdict.unsigned(), "mime"),
        WrapContext("pgp", Identity("gw", openpgp_secret=gateway), TrustStore(),
                    Directory(openpgp=(peer_cert,)), NOW, "a@chu.test", ("b@pgp.test",)),
    )
    unwrapped = ADAPTER.unwrap(
        wrapped.content,
        UnwrapContext("pgp", Identity("b", openpgp_secret=peer), TrustStore(),
                      Directory(openpgp=(gateway_cert,)), NOW),
    )
    assert unwrapped.encrypted and unwrapped.signature.result == "pass"
    assert unwrapped.signature.algorithm == "EdDSA/SHA256"
    assert b"bonjour\r\n" in unwrapped.content


@pytest.mark.parametrize("raw", [
    b"Content-Type: multipart/encrypted; protocol=\"application/pgp-encrypted\"; boundary=x\r\n\r\n--x\r\n\r\nVersion: 1\r\n--x\r\n\r\n-----BEGIN PGP MESSAGE-----\r\n\r\nAAAA\r\n-----END PGP MESSAGE-----\r\n--x--\r\n",
    b"Content-Type: multipart/encrypted; protocol=\"application/pgp-encrypted\"; boundary=x\r\n\r\nno parts",
    b"Content-Type: multipart/signed; protocol=\"application/pgp-signature\"; boundary=x\r\n\r\n--x\r\n\r\nhi\r\n--x\r\n\r\n\xff\xfe\r\n--x--\r\n",
    b"\x00\xff" * 50,
])
def test_hostile_input_gives_only_gateway_errors(raw: bytes) -> None:
    context = UnwrapContext("pgp", Identity("gw", openpgp_secret=generate_identity("g <g@x.test>")),
                            TrustStore(), Directory(), NOW)
    try:
        unwrapped = ADAPTER.unwrap(raw, context)
    except GatewayError as error:
        assert error.permanent
    else:
        assert not unwrapped.encrypted and unwrapped.signature.result in ("none", "fail")


def test_wrap_without_any_key_refuses_every_recipient() -> None:
    wrapped = ADAPTER.wrap(
        Unwrapped(CONTENT, Verdict.unsigned(), "mime"),
        WrapContext("pgp", Identity("gw", openpgp_secret=generate_identity("g <g@x.test>")),
                    TrustStore(), Directory(), NOW, "a@chu.test", ("b@pgp.test",)),
    )
    assert wrapped.content == b""
    failure = wrapped.refused["b@pgp.test"]
    assert isinstance(failure, PermanentFailure) and failure.reason == Reason.NO_RECIPIENT_KEY


def test_wrap_refuses_expired_certificate() -> None:
    peer = pysequoia.Tsk.from_bytes(generate_identity("Bob <b@pgp.test>", created=NOW))
    cert = peer.extract_certificate().set_expiration(NOW + timedelta(days=1),
                                                      peer.certifier())
    wrapped = ADAPTER.wrap(
        Unwrapped(CONTENT, Verdict.unsigned(), "mime"),
        WrapContext("pgp", Identity("gw", openpgp_secret=generate_identity("g <g@x.test>")),
                    TrustStore(), Directory(openpgp=(str(cert).encode(),)),
                    NOW + timedelta(days=2), "a@chu.test", ("b@pgp.test",)),
    )
    assert wrapped.content == b"" and "expired" in wrapped.refused["b@pgp.test"].detail


def test_no_identity_means_no_wrap() -> None:
    with pytest.raises(PermanentFailure) as caught:
        ADAPTER.wrap(Unwrapped(CONTENT, Verdict.unsigned(), "mime"),
                     WrapContext("pgp", None, TrustStore(), Directory(), NOW, "a@chu.test",
                                 ("b@pgp.test",)))
    assert caught.value.reason == Reason.WRAP_FAILED


def test_options() -> None:
    assert ADAPTER.option_problems({}) == []
    assert ADAPTER.option_problems({"micalg": "md5"})


# -- the signer's certificate: revoked or expired at `now` is never a pass -------------------

ENTITY = b"Content-Type: text/plain; charset=utf-8\r\n\r\nCompte rendu\r\n"


def signed_by(secret: bytes, sender: str, when: datetime) -> bytes:
    signature = sign_detached(network_key(Identity("sender", openpgp_secret=secret)), ENTITY,
                              when)
    return (
        b"From: <" + sender.encode() + b">\r\nSubject: s\r\nMIME-Version: 1.0\r\n"
        b'Content-Type: multipart/signed; micalg=pgp-sha256; '
        b'protocol="application/pgp-signature"; boundary="S"\r\n\r\n'
        b"--S\r\n" + ENTITY + b"\r\n--S\r\nContent-Type: application/pgp-signature\r\n\r\n"
        + signature + b"\r\n--S--\r\n"
    )


def revoked_certificate(secret: bytes) -> bytes:
    """The public certificate of `secret` with its key revocation signature attached."""
    tsk = pysequoia.Tsk.from_bytes(secret)
    public = tsk.extract_certificate()
    revoked = pysequoia.Cert.from_bytes(bytes(public) + bytes(public.revoke(tsk.certifier())))
    assert revoked.is_revoked
    return str(revoked).encode()


def verdict_for(raw: bytes, cert: bytes, now: datetime) -> Verdict:
    return ADAPTER.unwrap(raw, UnwrapContext(
        "pgp", None, TrustStore(), Directory(openpgp=(cert,)), now)).signature


def test_signature_by_a_valid_directory_key_passes() -> None:
    """The control for the two tests below: same key, same message, nothing wrong."""
    secret = generate_identity("Bob <b@pgp.test>", created=NOW - timedelta(days=10))
    cert = str(pysequoia.Tsk.from_bytes(secret).extract_certificate()).encode()
    verdict = verdict_for(signed_by(secret, "b@pgp.test", NOW), cert, NOW)
    assert verdict.result == "pass" and verdict.signer == "b@pgp.test"


def test_signature_by_a_revoked_key_fails() -> None:
    secret = generate_identity("Bob <b@pgp.test>", created=NOW - timedelta(days=10))
    revoked = revoked_certificate(secret)
    verdict = verdict_for(signed_by(secret, "b@pgp.test", NOW), revoked, NOW)
    assert (verdict.result, verdict.reason, verdict.failure) == (
        "fail", "signer key revoked", Reason.REVOKED)


def test_signature_by_a_key_expired_at_now_fails() -> None:
    secret = generate_identity("Bob <b@pgp.test>", created=NOW - timedelta(days=10))
    tsk = pysequoia.Tsk.from_bytes(secret)
    expiring = tsk.extract_certificate().set_expiration(NOW + timedelta(days=1), tsk.certifier())
    raw = signed_by(secret, "b@pgp.test", NOW)  # made while the key was valid
    cert = str(expiring).encode()
    assert verdict_for(raw, cert, NOW).result == "pass"
    verdict = verdict_for(raw, cert, NOW + timedelta(days=2))
    assert (verdict.result, verdict.reason, verdict.failure) == (
        "fail", "signer key expired", Reason.EXPIRED)


def test_wrap_refuses_revoked_certificate() -> None:
    revoked = revoked_certificate(generate_identity("Bob <b@pgp.test>", created=NOW))
    wrapped = ADAPTER.wrap(
        Unwrapped(CONTENT, Verdict.unsigned(), "mime"),
        WrapContext("pgp", Identity("gw", openpgp_secret=generate_identity("g <g@x.test>")),
                    TrustStore(), Directory(openpgp=(revoked,)), NOW,
                    "a@chu.test", ("b@pgp.test",)),
    )
    assert wrapped.content == b"" and "revoked" in wrapped.refused["b@pgp.test"].detail
    assert wrapped.refused["b@pgp.test"].reason == Reason.NO_RECIPIENT_KEY


# -- inline blocks: the recipient reads the octets the sender wrote -------------------------

def inline_message(block: bytes, charset: bytes) -> bytes:
    # A body with bare LF reaches us only under a transfer encoding (SMTP lines end in CRLF).
    encoded = base64.encodebytes(block).replace(b"\n", b"\r\n")
    return (b"From: <b@pgp.test>\r\nTo: <gw@x.test>\r\nSubject: s\r\nMIME-Version: 1.0\r\n"
            b"Content-Type: text/plain; charset=" + charset + b"; format=flowed\r\n"
            b"Content-Transfer-Encoding: base64\r\n\r\n" + encoded)


TEXTS = [
    (b"Glyc\xc3\xa9mie 5,2 mmol/l\nsans CR\n", b"utf-8", "utf-8"),
    (b"Glyc\xe9mie 5,2 mmol/l\r\nen Latin-1\r\n", b"iso-8859-1", "iso-8859-1"),
    # The label of an armored body describes the armor: text it cannot be is relabelled.
    (b"Glyc\xc3\xa9mie 5,2 mmol/l\n", b"us-ascii", "utf-8"),
    (b"Glyc\xe9mie, ni ASCII ni UTF-8\n", b"us-ascii", "unknown-8bit"),
    (b"no final line break", b"us-ascii", "us-ascii"),
]


@pytest.mark.parametrize("form,text,declared,label", [
    (form, *case) for form in ("cleartext", "signed", "signed+encrypted") for case in TEXTS
    # A cleartext signature always ends its text with a line break.
    if form != "cleartext" or case[0].endswith(b"\n")
])
def test_inline_text_keeps_its_octets_and_a_true_charset_label(
    form: str, text: bytes, declared: bytes, label: str
) -> None:
    gateway = generate_identity("GW <gw@x.test>", created=NOW - timedelta(days=1))
    peer = generate_identity("Bob <b@pgp.test>", created=NOW - timedelta(days=1))
    peer_cert = str(pysequoia.Tsk.from_bytes(peer).extract_certificate()).encode()
    signer = pysequoia.Tsk.from_bytes(peer).signer()
    if form == "cleartext":
        made = pysequoia.sign(signer, text[:-2] if text.endswith(b"\r\n") else text[:-1],
                              mode=pysequoia.SignatureMode.CLEAR)
    elif form == "signed":
        made = pysequoia.sign(signer, text, armor=True)
    else:
        cert = pysequoia.Tsk.from_bytes(gateway).extract_certificate()
        made = pysequoia.encrypt(text, [cert], signer=signer, armor=True)
    block = made if isinstance(made, bytes) else str(made).encode()
    if b"\r\n" in text:  # a client whose lines end in CRLF writes its armor so too
        block = canonical_crlf(block)
    unwrapped = ADAPTER.unwrap(inline_message(block, declared), UnwrapContext(
        "pgp", Identity("gw", openpgp_secret=gateway), TrustStore(),
        Directory(openpgp=(peer_cert,)), NOW))
    assert unwrapped.signature.result == "pass", unwrapped.signature
    entity = parse_entity(unwrapped.content)
    media_type, params = entity.content_type()
    assert (media_type, params.get("charset")) == ("text/plain", label)
    assert "format" not in params  # format=flowed described the armor, not the text
    assert decode_body(entity) == text
    assert canonical_crlf(unwrapped.content) == unwrapped.content
