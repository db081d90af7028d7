"""Real Thunderbird (RNP) and GnuPG OpenPGP messages get the verdicts of expected.tsv.

Data: ../shared/data/thunderbird-openpgp/ (read-only; provenance in its SOURCE.md). Alice's
Ed25519 key is passphrase-protected there; the fixture unlocks a copy with gpg at test time.
Keyrings follow expected.tsv: the secret key is the network identity, the public keys the
directory.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pysequoia
import pytest

from adapters.base import Directory, Identity, TrustStore, UnwrapContext, Unwrapped
from adapters.openpgp import OpenPgpAdapter
from adapters.pgppackets import _session_keys, read_secret_keys
from gateway.errors import PermanentFailure, Reason
from tests.security.test_openpgp_attacks import (
    CLEAR,
    IV,
    aead_packet,
    aead_vector_packets,
    literal,
)
from tests.support.gpg import Gpg

DATA = Path(__file__).resolve().parents[3] / "shared" / "data" / "thunderbird-openpgp"
KEYS = DATA / "keys"
ALICE_FPR = "EB85BB5FA33A75E15E944E63F231550C4F47E38E"
BOB_FPR = "D1A66E1A23B182C9980F788CFBFCC82A015E7330"

pytestmark = [
    pytest.mark.interop,
]


def key(name: str) -> bytes:
    return (KEYS / name).read_bytes()


@pytest.fixture(scope="module")
def rings() -> Iterator[dict[str, tuple[bytes, tuple[bytes, ...]]]]:
    gpg = Gpg()
    gpg.import_key(key("alice@openpgp.example-0xf231550c4f47e38e-secret-with-pp.asc"),
                   passphrase="alice-passphrase")
    gpg.unprotect(ALICE_FPR, "alice-passphrase")
    alice = gpg.export_secret(ALICE_FPR)
    gpg.close()
    bob_pub = key("bob@openpgp.example-0xfbfcc82a015e7330-pub.asc")
    carol_pub = key("carol@example.com-0x3099ff1238852b9f-pub.asc")
    alice_com = key("alice@example.com-0xf2823b8f6c9a7553-secret.asc")
    yield {
        "alice": (alice, (bob_pub,)),
        "alice+carol": (alice, (bob_pub, carol_pub)),
        "bob": (key("bob@openpgp.example-0xfbfcc82a015e7330-secret.asc"), (bob_pub,)),
        "carol-pgp.icu": (key("carol@pgp.icu-0xEF2FD01608AFD744-revoked-secret.asc"), ()),
        "alice-example.com": (alice_com, ()),
        "alice-example.com+carol": (alice_com, (carol_pub,)),
    }


# file, keyring, expected outcome: (result, reason phrase or failure, encrypted) or an error.
# Each line restates the gateway_verdict column of expected.tsv in the adapter's terms.
CASES: list[tuple[str, str, object]] = [
    ("signed-by-0xfbfcc82a015e7330-to-0xf231550c4f47e38e-unencrypted.eml", "alice",
     ("pass", "signature verified", False)),
    ("bob-to-alice-signed-damaged-signature.eml", "alice", ("fail", "bad signature", False)),
    ("signed-by-0x3099ff1238852b9f-to-0xf231550c4f47e38e-unencrypted.eml", "alice",
     ("fail", "signer key unknown", False)),
    ("signed-by-0x3099ff1238852b9f-to-0xf231550c4f47e38e-unencrypted.eml", "alice+carol",
     ("pass", "signature verified", False)),
    ("unsigned-encrypted-to-0xf231550c4f47e38e-from-0xfbfcc82a015e7330.eml", "alice",
     ("none", "not signed", True)),
    ("signed-by-0xfbfcc82a015e7330-encrypted-to-0xf231550c4f47e38e.eml", "alice",
     ("pass", "signature verified", True)),
    ("encrypted-to-alice-as-hidden-recipient.eml", "alice", ("none", "not signed", True)),
    ("rc-openpgp-mdc.eml", "bob", ("none", "not signed", True)),
    # The LibrePGP AEAD packet (tag 20, OCB, AES-256) that GnuPG writes: pysequoia does not
    # read it, adapters.pgppackets.open_aead does (expected.tsv: encrypted, integrity-protected).
    ("rc-openpgp-aead.eml", "bob", ("none", "not signed", True)),
    ("rc-openpgp-nomdc.eml", "bob", (Reason.DECRYPTION_FAILED, "5.7.7")),
    ("rc-openpgp-mdc-tampered.eml", "bob", (Reason.DECRYPTION_FAILED, "5.7.7")),
    ("rc-openpgp-mixed-subpart.eml", "bob", ("none", "not signed", False)),
    # Bob's valid signature covers only the ciphertext of Alice's message: neutral, with no
    # signer, so the decrypted text is never presented as signed by Bob.
    ("rc-openpgp-sigwrap-mdc.eml", "bob",
     ("neutral", "signature covers only the encrypted content", True)),
    ("rc-openpgp-sigwrap-nomdc.eml", "bob", (Reason.DECRYPTION_FAILED, "5.7.7")),
    ("partial-encrypt-for-alice-plaintext.eml", "alice", ("none", "not signed", False)),
    ("partial-signed-from-bob-plaintext.eml", "alice", ("none", "not signed", False)),
    ("enc-to-carol@pgp.icu-revoked.eml", "carol-pgp.icu", ("fail", "signer key unknown", True)),
    ("signed-by-0x3099ff1238852b9f-to-0xf2823b8f6c9a7553-unencrypted-autocrypt.eml",
     "alice-example.com", ("fail", "signer key unknown", False)),
    ("signed-by-0x3099ff1238852b9f-to-0xf2823b8f6c9a7553-unencrypted-autocrypt.eml",
     "alice-example.com+carol", ("pass", "signature verified", False)),
    ("signed-encrypted-autocrypt-gossip.eml", "alice", ("pass", "signature verified", True)),
    ("outer-smime-bad-sig-inner-pgp-enc.eml", "alice", ("none", "not signed", True)),
    ("outer-pgp-sig-inner-smime-enc.eml", "alice", ("fail", "signer key unknown", False)),
    ("outer-pgp-sig-inner-smime-enc.eml", "alice+carol", ("fail", "bad signature", False)),
    ("inner-smime-sig-in-pgp-encrypted.eml", "alice", ("none", "not signed", True)),
]


def unwrap(rings: dict[str, tuple[bytes, tuple[bytes, ...]]], name: str, ring: str) -> Unwrapped:
    secret, directory = rings[ring]
    context = UnwrapContext(
        "openpgp-net", Identity(ring, openpgp_secret=secret), TrustStore(),
        Directory(openpgp=directory), datetime.now(UTC),
    )
    return OpenPgpAdapter().unwrap((DATA / "eml" / name).read_bytes(), context)


def test_every_expected_row_is_covered() -> None:
    rows = (DATA / "expected.tsv").read_text().splitlines()[1:]
    assert {row.split("\t")[0] for row in rows} == {name for name, _, _ in CASES}


@pytest.mark.parametrize("name,ring,expected", CASES, ids=[f"{c[0]}[{c[1]}]" for c in CASES])
def test_thunderbird_verdict(
    rings: dict[str, tuple[bytes, tuple[bytes, ...]]], name: str, ring: str, expected: object
) -> None:
    assert isinstance(expected, tuple)
    if isinstance(expected[0], Reason):
        with pytest.raises(PermanentFailure) as caught:
            unwrap(rings, name, ring)
        assert (caught.value.reason, caught.value.enhanced) == expected
        return
    unwrapped = unwrap(rings, name, ring)
    result, reason, encrypted = expected
    assert (unwrapped.signature.result, unwrapped.signature.reason, unwrapped.encrypted) == (
        result, reason, encrypted), unwrapped.signature


def test_partial_inline_messages_pass_unchanged(
    rings: dict[str, tuple[bytes, tuple[bytes, ...]]]
) -> None:
    for name in ("partial-encrypt-for-alice-plaintext.eml", "partial-signed-from-bob-plaintext.eml",
                 "rc-openpgp-mixed-subpart.eml"):
        raw = (DATA / "eml" / name).read_bytes()
        ring = "bob" if name.startswith("rc-") else "alice"
        assert unwrap(rings, name, ring).content == raw


def test_signature_over_ciphertext_is_not_the_authors(
    rings: dict[str, tuple[bytes, tuple[bytes, ...]]]
) -> None:
    unwrapped = unwrap(rings, "rc-openpgp-sigwrap-mdc.eml", "bob")
    assert unwrapped.signature.result == "neutral" and unwrapped.encrypted
    assert unwrapped.signature.signer is None and unwrapped.signed_entity is None
    assert unwrapped.signature.signer_subject is None
    # The audit still learns whose key signed the ciphertext.
    assert unwrapped.signature.fingerprints == (BOB_FPR,)
    assert any("over the encrypted part" in note and BOB_FPR in note
               for note in unwrapped.notes)


def test_gossip_message_uses_protected_headers(
    rings: dict[str, tuple[bytes, tuple[bytes, ...]]]
) -> None:
    unwrapped = unwrap(rings, "signed-encrypted-autocrypt-gossip.eml", "alice")
    assert unwrapped.signature.signer == "bob@openpgp.example"
    assert unwrapped.content.count(b"\nSubject:") + unwrapped.content.startswith(b"Subject:") <= 1


def test_aead_vector_plaintext_is_what_gnupg_decrypts(
    rings: dict[str, tuple[bytes, tuple[bytes, ...]]]
) -> None:
    """The tag-20 OCB vector: the gateway's plaintext is GnuPG's, byte for byte."""
    _, packets = aead_vector_packets()
    gpg = Gpg()
    try:
        gpg.import_key(key("bob@openpgp.example-0xfbfcc82a015e7330-secret.asc"))
        done = gpg.run("--decrypt", input=b"".join(p.raw for p in packets))
    finally:
        gpg.close()
    assert done.returncode == 0 and done.has("DECRYPTION_OKAY"), done.stderr
    unwrapped = unwrap(rings, "rc-openpgp-aead.eml", "bob")
    assert unwrapped.encrypted and unwrapped.decryption_keys
    assert unwrapped.content.endswith(done.output)
    assert b"Subject: rc aead allow" in unwrapped.content


def test_gnupg_decrypts_the_multi_chunk_aead_packets_of_the_tampering_tests() -> None:
    """The AEAD writer of tests/security/test_openpgp_attacks.py follows the format GnuPG
    reads: several 64-octet chunks, per-chunk nonces and the final tag, under the session key
    of the GnuPG-made vector. So its tampered packets test real chunk handling."""
    bob = key("bob@openpgp.example-0xfbfcc82a015e7330-secret.asc")
    _, (pkesk, _container) = aead_vector_packets()
    [(_algorithm, session, _key)] = _session_keys(
        [pkesk], read_secret_keys(bytes(pysequoia.Tsk.from_bytes(bob)))
    )
    message = pkesk.raw + aead_packet(session, literal(CLEAR), 0, IV)
    gpg = Gpg()
    try:
        gpg.import_key(bob)
        done = gpg.run("--decrypt", input=message)
        tampered = bytearray(message)
        tampered[len(pkesk.raw) + 40] ^= 0x01
        refused = gpg.run("--decrypt", input=bytes(tampered))
    finally:
        gpg.close()
    assert done.returncode == 0 and done.has("DECRYPTION_OKAY"), done.stderr
    assert done.output == CLEAR
    # GnuPG 2.2 still prints DECRYPTION_OKAY and GOODMDC after a failed OCB tag: only its exit
    # status and the checktag line say that the chunk was refused.
    assert refused.returncode != 0 and "checktag failed" in refused.stderr
    assert CLEAR not in refused.output
