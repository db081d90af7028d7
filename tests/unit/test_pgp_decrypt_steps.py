"""The work an OpenPGP message costs, counted (never timed), and the checks that work buys.

`adapters.pgpkeys.decrypt` has pysequoia decrypt and check integrity, then the packet reader
(`adapters.pgppackets.open_inner`) open the same message for its signatures; the literal data
both produced must agree, and pysequoia verifies the signatures over exactly those packets.
These tests count the calls into pysequoia and the armor reads of one message, so that a
change that adds a pass over a message, or drops one of the two decryptions, shows here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pysequoia
import pytest

from adapters import pgpkeys, pgppackets
from adapters.apicrypt import ApicryptAdapter
from adapters.base import (
    Directory,
    Identity,
    TrustStore,
    UnwrapContext,
    Unwrapped,
    Verdict,
    WrapContext,
)
from adapters.openpgp import OpenPgpAdapter
from adapters.pgpkeys import NetworkKey, encrypt_signed, generate_identity, network_key
from gateway.errors import PermanentFailure, Reason
from tests.support.gpg import Gpg, gpg_available

NOW = datetime(2026, 11, 23, 10, 0, tzinfo=UTC)
GATEWAY = "gw@passerelle.test"
DOCTOR = "dr.martin@medecin.apicrypt.org"
TEXT = b"RES|Hemoglobine|HB|N|13.5|g/dl|12|16|N||F|\r\n" * 200
APICRYPT = ApicryptAdapter()
OPENPGP = OpenPgpAdapter()


@pytest.fixture(scope="module")
def keys() -> dict[str, bytes]:
    gateway = generate_identity(f"Passerelle <{GATEWAY}>", created=NOW - timedelta(1))
    doctor = generate_identity(f"Dr Martin <{DOCTOR}>", created=NOW - timedelta(1))
    return {
        "gateway": gateway,
        "doctor": doctor,
        "gateway_pub": str(pysequoia.Tsk.from_bytes(gateway).extract_certificate()).encode(),
        "doctor_pub": str(pysequoia.Tsk.from_bytes(doctor).extract_certificate()).encode(),
    }


def letter(body: bytes = TEXT) -> bytes:
    return (b"From: <" + DOCTOR.encode() + b">\r\nTo: <" + GATEWAY.encode() + b">\r\n"
            b"Subject: Compte rendu\r\nMIME-Version: 1.0\r\n"
            b"Content-Type: text/plain; charset=iso-8859-1\r\n\r\n" + body)


def from_doctor(keys: dict[str, bytes]) -> bytes:
    """An Apicrypt message from the doctor to the gateway: text block signed and encrypted."""
    context = WrapContext(
        "apicrypt", Identity("doctor", openpgp_secret=keys["doctor"]), TrustStore(),
        Directory(openpgp=(keys["gateway_pub"],)), NOW, DOCTOR, (GATEWAY,),
        options={"codec": "openpgp", "version": 1},
    )
    return APICRYPT.wrap(Unwrapped(letter(), Verdict.unsigned(), "mime"), context).content


def at_gateway(keys: dict[str, bytes]) -> UnwrapContext:
    return UnwrapContext(
        "apicrypt", Identity("gw", openpgp_secret=keys["gateway"]), TrustStore(),
        Directory(openpgp=(keys["doctor_pub"],)), NOW,
        options={"codec": "openpgp", "version": 1},
    )


class Calls:
    """Every call of a wrapped function, with its arguments."""

    def __init__(self, function: Callable[..., Any]) -> None:
        self.function = function
        self.arguments: list[tuple[Any, ...]] = []

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.arguments.append(args + tuple(kwargs.values()))
        return self.function(*args, **kwargs)


@pytest.fixture
def decryptions(monkeypatch: pytest.MonkeyPatch) -> Iterator[Calls]:
    calls = Calls(pysequoia.decrypt)
    monkeypatch.setattr(pysequoia, "decrypt", calls)
    yield calls


@pytest.fixture
def armor_reads(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[bytes]]:
    """The armored inputs `dearmor` was handed (binary ones it passes through uncounted)."""
    armored: list[bytes] = []
    original = pgppackets.dearmor

    def counting(data: bytes) -> bytes:
        if not (data[:1] and data[0] & 0x80):
            armored.append(data)
        return original(data)

    monkeypatch.setattr(pgppackets, "dearmor", counting)
    monkeypatch.setattr(pgpkeys, "dearmor", counting)
    yield armored


def test_a_message_the_packet_reader_opens_is_decrypted_once_by_pysequoia(
    keys: dict[str, bytes], decryptions: Calls
) -> None:
    raw = from_doctor(keys)
    unwrapped = APICRYPT.unwrap(raw, at_gateway(keys))
    assert unwrapped.encrypted and unwrapped.signature.result == "pass"
    assert len(decryptions.arguments) == 1


def test_the_two_decryptions_must_agree_or_nothing_is_delivered(
    keys: dict[str, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    genuine = pysequoia.decrypt

    class Other:
        def __init__(self, result: Any) -> None:
            self.bytes = bytes(result.bytes) + b"appended by a faulty decryption"
            self.valid_sigs: list[Any] = []

    monkeypatch.setattr(pysequoia, "decrypt", lambda *args, **kwargs: Other(
        genuine(*args, **kwargs)))
    with pytest.raises(PermanentFailure) as refused:
        APICRYPT.unwrap(from_doctor(keys), at_gateway(keys))
    assert refused.value.reason is Reason.DECRYPTION_FAILED
    assert "decrypted different data" in (refused.value.detail or "")


def test_the_armor_of_an_apicrypt_text_block_is_read_once(
    keys: dict[str, bytes], armor_reads: list[bytes]
) -> None:
    unwrapped = APICRYPT.unwrap(from_doctor(keys), at_gateway(keys))
    assert unwrapped.encrypted and unwrapped.signature.result == "pass"
    assert len(armor_reads) == 1


def test_the_armor_of_an_inline_encrypted_body_is_read_once(
    keys: dict[str, bytes], armor_reads: list[bytes]
) -> None:
    doctor = pysequoia.Tsk.from_bytes(keys["doctor"])
    block = pysequoia.encrypt(TEXT, [pysequoia.Cert.from_bytes(keys["gateway_pub"])],
                              signer=doctor.signer(), armor=True)
    unwrapped = OPENPGP.unwrap(letter(bytes(block)), at_gateway(keys))
    assert unwrapped.encrypted and unwrapped.signature.result == "pass"
    assert len(armor_reads) == 1


def test_an_inline_signed_body_reaches_pysequoia_as_binary(
    keys: dict[str, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    doctor = pysequoia.Tsk.from_bytes(keys["doctor"])
    block = bytes(pysequoia.sign(doctor.signer(), TEXT, mode=pysequoia.SignatureMode.INLINE))
    verifications = Calls(pysequoia.verify)
    monkeypatch.setattr(pysequoia, "verify", verifications)
    unwrapped = OPENPGP.unwrap(letter(block), at_gateway(keys))
    assert unwrapped.signature.result == "pass" and not unwrapped.encrypted
    handed = [arguments[0] for arguments in verifications.arguments]
    assert len(handed) == 1 and handed[0][0] & 0x80  # packets, not armor


def test_sealing_apicrypt_blocks_parses_no_secret_key(
    keys: dict[str, bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    identity = Identity("gw", openpgp_secret=keys["gateway"])
    network_key(identity)  # the identity is parsed once, when first used
    parsed = Calls(pysequoia.Tsk.from_bytes)

    class CountingTsk:
        from_bytes = parsed

    monkeypatch.setattr(pysequoia, "Tsk", CountingTsk)
    content = (b"From: <secretariat@chu.test>\r\nTo: <" + DOCTOR.encode() + b">\r\n"
               b'Subject: x\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary="M"'
               b"\r\n\r\n--M\r\nContent-Type: text/plain\r\n\r\n" + TEXT + b"\r\n--M\r\n"
               b"Content-Type: application/pdf; name=cr.pdf\r\n"
               b"Content-Disposition: attachment; filename=cr.pdf\r\n\r\n%PDF\r\n--M--\r\n")
    context = WrapContext(
        "apicrypt", identity, TrustStore(), Directory(openpgp=(keys["doctor_pub"],)), NOW,
        "secretariat@chu.test", (DOCTOR,), options={"codec": "openpgp", "version": 1},
    )
    wrapped = APICRYPT.wrap(Unwrapped(content, Verdict.unsigned(), "mime"), context)
    assert wrapped.content and not wrapped.refused
    assert parsed.arguments == []


def test_an_identity_that_cannot_sign_seals_nothing(keys: dict[str, bytes]) -> None:
    usable = network_key(Identity("gw", openpgp_secret=keys["gateway"]))
    unsigned = NetworkKey(usable.fingerprint, usable.secret_keys, usable.decryptors, None)
    with pytest.raises(PermanentFailure) as refused:
        encrypt_signed(b"x", unsigned, [], armor=True)
    assert refused.value.reason is Reason.WRAP_FAILED


@pytest.mark.interop
@pytest.mark.skipif(not gpg_available(), reason="gpg not installed")
@pytest.mark.parametrize("cipher", ["TWOFISH", "CAMELLIA256"])
def test_a_cipher_only_pysequoia_reads_decrypts_but_never_passes_its_signature(
    keys: dict[str, bytes], decryptions: Calls, cipher: str
) -> None:
    """The packet reader opens AES only: for another cipher pysequoia alone sees the packets,
    so the signature inside is noticed but never verified (and the message still decrypts)."""
    gpg = Gpg()
    try:
        gpg.import_key(keys["gateway"])
        gpg.import_key(keys["doctor"])
        block = gpg.run("--armor", "--sign", "--encrypt", "--local-user", DOCTOR,
                        "--recipient", GATEWAY, "--cipher-algo", cipher, input=TEXT,
                        check=True).output
    finally:
        gpg.close()
    unwrapped = OPENPGP.unwrap(letter(block), at_gateway(keys))
    assert unwrapped.encrypted
    assert unwrapped.signature.result != "pass"
    assert len(decryptions.arguments) == 2  # the plaintext, then the issuers alone
