"""GnuPG 2.2 as the independent peer of the `openpgp` adapter, both ways, with gpg's defaults.

gpg compresses by default: its signed+encrypted output is the message pysequoia 0.1.35 cannot
verify in one step (trap 1). Keys come from `generate_identity` (trap 2: GnuPG 2.2 must be able
to use them) and from gpg itself, Ed25519 and RSA (partners' keys, trap 3).
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import pysequoia
import pytest

from adapters.base import (
    Directory,
    Identity,
    TrustStore,
    UnwrapContext,
    Unwrapped,
    Verdict,
    WrapContext,
)
from adapters.cms.entity import decode_body, multipart_parts, parse_entity
from adapters.openpgp import OpenPgpAdapter
from adapters.pgpkeys import generate_identity
from adapters.pgpmime import canonical_crlf
from gateway.errors import PermanentFailure, Reason
from tests.support.gpg import Gpg

pytestmark = [
    pytest.mark.interop,
]

GATEWAY = "gw@passerelle.test"
ALICE = "alice@cabinet.test"
ROBERT = "robert@labo.test"
NOW = datetime.now(UTC)
ADAPTER = OpenPgpAdapter()


@dataclass
class Peers:
    gpg: Gpg
    gateway_secret: bytes
    alice_fpr: str
    robert_fpr: str
    alice_public: bytes
    robert_public: bytes
    stranger_fpr: str


@pytest.fixture(scope="module")
def peers() -> Iterator[Peers]:
    gpg = Gpg()
    gateway_secret = generate_identity(f"Passerelle <{GATEWAY}>", created=NOW - timedelta(days=1))
    gpg.import_key(gateway_secret)
    alice = gpg.generate(f"Alice Martin <{ALICE}>")
    robert = gpg.generate(f"Robert Labo <{ROBERT}>", algo="rsa2048")
    stranger = gpg.generate("Stranger <stranger@elsewhere.test>")
    yield Peers(gpg, gateway_secret, alice, robert, gpg.export_public(alice),
                gpg.export_public(robert), stranger)
    gpg.close()


def unwrap_context(peers: Peers, *certs: bytes) -> UnwrapContext:
    directory = certs or (peers.alice_public, peers.robert_public)
    return UnwrapContext(
        "openpgp-net", Identity("gw", openpgp_secret=peers.gateway_secret), TrustStore(),
        Directory(openpgp=tuple(directory)), NOW,
    )


def message(sender: str, body: bytes, content_type: bytes = b"text/plain; charset=utf-8") -> bytes:
    return (
        b"From: <" + sender.encode() + b">\r\nTo: <" + GATEWAY.encode() + b">\r\n"
        b"Subject: Compte rendu\r\nMessage-ID: <1@test>\r\nMIME-Version: 1.0\r\n"
        b"Content-Type: " + content_type + b"\r\n\r\n" + body
    )


def text_of(content: bytes) -> tuple[bytes, str | None]:
    """(decoded body, charset label) of a single-part text message."""
    entity = parse_entity(content)
    media_type, params = entity.content_type()
    assert media_type == "text/plain", media_type
    return decode_body(entity), params.get("charset")


ENTITY = (
    b"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
    b"R\xc3\xa9sultats: h\xc3\xa9moglobine 13,5 g/dl\r\nFrom the lab\r\n"
)


def pgp_mime_signed(peers: Peers, signer: str, sender: str, entity: bytes = ENTITY) -> bytes:
    signature = peers.gpg.run("--armor", "--detach-sign", "--local-user", signer,
                              input=canonical_crlf(entity), check=True).output
    body = (b"--B\r\n" + entity + b"\r\n--B\r\nContent-Type: application/pgp-signature\r\n\r\n"
            + signature + b"\r\n--B--\r\n")
    return message(sender, body, b'multipart/signed; micalg=pgp-sha256; '
                   b'protocol="application/pgp-signature"; boundary="B"')


def pgp_mime_encrypted(armored: bytes, sender: str) -> bytes:
    body = (b"--E\r\nContent-Type: application/pgp-encrypted\r\n\r\nVersion: 1\r\n\r\n--E\r\n"
            b"Content-Type: application/octet-stream\r\n\r\n" + armored + b"\r\n--E--\r\n")
    return message(sender, body,
                   b'multipart/encrypted; protocol="application/pgp-encrypted"; boundary="E"')


# -- gpg -> gateway --------------------------------------------------------------------------

def test_trap1_pysequoia_alone_fails_on_gpg_default_signed_encrypted(peers: Peers) -> None:
    """The reason for the two-step verification: one-step decrypt+verify rejects gpg's output."""
    armored = peers.gpg.run("--armor", "--sign", "--encrypt", "--recipient", GATEWAY,
                            "--local-user", peers.alice_fpr, input=b"x\n", check=True).output
    tsk = pysequoia.Tsk.from_bytes(peers.gateway_secret)
    cert = pysequoia.Cert.from_bytes(peers.alice_public)
    with pytest.raises(Exception, match="Unexpected message structure"):
        pysequoia.decrypt(armored, tsk.decryptor(), store=lambda ids: [cert])


@pytest.mark.parametrize("signer_attr,sender", [("alice_fpr", ALICE), ("robert_fpr", ROBERT)])
def test_gpg_signed_and_encrypted_inline_default_compressed(
    peers: Peers, signer_attr: str, sender: str
) -> None:
    text = "Bonjour, résultats en pièce jointe.\n".encode()
    armored = peers.gpg.run("--armor", "--sign", "--encrypt", "--recipient", GATEWAY,
                            "--local-user", getattr(peers, signer_attr), input=text,
                            check=True).output
    unwrapped = ADAPTER.unwrap(message(sender, armored), unwrap_context(peers))
    assert unwrapped.encrypted
    assert unwrapped.signature.result == "pass", unwrapped.signature
    assert unwrapped.signature.signer == sender
    assert text_of(unwrapped.content) == (text, "utf-8")  # bare LF kept, not made CRLF


def test_gpg_pgp_mime_combined_signed_encrypted(peers: Peers) -> None:
    armored = peers.gpg.run("--armor", "--sign", "--encrypt", "--recipient", GATEWAY,
                            "--local-user", peers.alice_fpr, input=ENTITY, check=True).output
    unwrapped = ADAPTER.unwrap(pgp_mime_encrypted(armored, ALICE), unwrap_context(peers))
    assert unwrapped.encrypted and unwrapped.signature.result == "pass"
    assert unwrapped.content.endswith(ENTITY)
    assert b"Subject: Compte rendu" in unwrapped.content


def test_gpg_pgp_mime_signed_then_encrypted_nested(peers: Peers) -> None:
    signed = pgp_mime_signed(peers, peers.robert_fpr, ROBERT)
    inner = signed[signed.index(b"Content-Type: multipart/signed"):]
    armored = peers.gpg.run("--armor", "--encrypt", "--recipient", GATEWAY, input=inner,
                            check=True).output
    unwrapped = ADAPTER.unwrap(pgp_mime_encrypted(armored, ROBERT), unwrap_context(peers))
    assert unwrapped.encrypted
    assert unwrapped.signature.result == "pass"
    assert unwrapped.signature.algorithm == "RSAEncryptSign/SHA256" or unwrapped.signature.algorithm
    assert unwrapped.signed_entity is not None


def test_gpg_encrypted_only(peers: Peers) -> None:
    armored = peers.gpg.run("--armor", "--encrypt", "--recipient", GATEWAY, input=ENTITY,
                            check=True).output
    unwrapped = ADAPTER.unwrap(pgp_mime_encrypted(armored, ALICE), unwrap_context(peers))
    assert unwrapped.encrypted and unwrapped.signature.result == "none"
    assert unwrapped.decryption_keys


def test_gpg_pgp_mime_signed(peers: Peers) -> None:
    unwrapped = ADAPTER.unwrap(pgp_mime_signed(peers, peers.alice_fpr, ALICE),
                               unwrap_context(peers))
    assert not unwrapped.encrypted
    assert unwrapped.signature.result == "pass"
    assert unwrapped.signature.signer_subject == f"Alice Martin <{ALICE}>"
    assert unwrapped.signature.fingerprints == (peers.alice_fpr,)


def test_signed_part_with_bare_lf_verifies_over_crlf_canonical_form(peers: Peers) -> None:
    raw = pgp_mime_signed(peers, peers.alice_fpr, ALICE).replace(b"\r\n", b"\n")
    assert ADAPTER.unwrap(raw, unwrap_context(peers)).signature.result == "pass"


def test_altered_signed_part_fails(peers: Peers) -> None:
    raw = pgp_mime_signed(peers, peers.alice_fpr, ALICE).replace(b"13,5", b"31,5")
    verdict = ADAPTER.unwrap(raw, unwrap_context(peers)).signature
    assert verdict.result == "fail" and verdict.failure == Reason.SIGNATURE_INVALID


def test_signer_not_in_directory_is_not_verified(peers: Peers) -> None:
    raw = pgp_mime_signed(peers, peers.stranger_fpr, ALICE)
    verdict = ADAPTER.unwrap(raw, unwrap_context(peers)).signature
    assert verdict.result == "fail" and verdict.reason == "signer key unknown"


def test_signer_must_match_from(peers: Peers) -> None:
    raw = pgp_mime_signed(peers, peers.robert_fpr, ALICE)
    verdict = ADAPTER.unwrap(raw, unwrap_context(peers)).signature
    assert verdict.result == "fail" and verdict.failure == Reason.SIGNER_MISMATCH


@pytest.mark.parametrize("mode", ["--clearsign", "--sign"])
def test_gpg_inline_signed(peers: Peers, mode: str) -> None:
    text = b"Patient: DUPONT Jean\nGlyc\xc3\xa9mie 5,2 mmol/l\n"
    armored = peers.gpg.run("--armor", mode, "--local-user", peers.alice_fpr, input=text,
                            check=True).output
    unwrapped = ADAPTER.unwrap(message(ALICE, armored), unwrap_context(peers))
    assert unwrapped.signature.result == "pass"
    # What `gpg --decrypt` prints for the block: the text as written, final line break too.
    assert peers.gpg.run("--decrypt", input=armored).output == text
    assert text_of(unwrapped.content) == (text, "utf-8")


def test_inline_block_with_unprotected_text_is_not_a_whole(peers: Peers) -> None:
    armored = peers.gpg.run("--armor", "--clearsign", "--local-user", peers.alice_fpr,
                            input=b"signed part\n", check=True).output
    raw = message(ALICE, b"Injected text\r\n" + armored + b"more injected\r\n")
    unwrapped = ADAPTER.unwrap(raw, unwrap_context(peers))
    assert unwrapped.signature.result == "none" and not unwrapped.encrypted
    assert unwrapped.content == raw


def test_message_for_another_key_is_refused(peers: Peers) -> None:
    armored = peers.gpg.run("--armor", "--encrypt", "--recipient", peers.alice_fpr,
                            input=b"x\n", check=True).output
    with pytest.raises(PermanentFailure) as caught:
        ADAPTER.unwrap(pgp_mime_encrypted(armored, ALICE), unwrap_context(peers))
    assert caught.value.reason == Reason.NO_DECRYPTION_KEY
    assert caught.value.enhanced == "5.7.5"


def test_tampered_ciphertext_is_refused_without_plaintext(peers: Peers) -> None:
    binary = peers.gpg.run("--encrypt", "--recipient", GATEWAY, input=b"secret " * 40,
                           check=True).output
    tampered = binary[:-30] + bytes([binary[-30] ^ 0x01]) + binary[-29:]
    armored = pysequoia.armor(tampered, pysequoia.ArmorKind.Message).encode()
    with pytest.raises(PermanentFailure) as caught:
        ADAPTER.unwrap(pgp_mime_encrypted(armored, ALICE), unwrap_context(peers))
    assert caught.value.reason == Reason.DECRYPTION_FAILED
    assert caught.value.enhanced == "5.7.7"
    assert b"secret" not in caught.value.detail.encode()


# -- gateway -> gpg --------------------------------------------------------------------------

CONTENT = (
    b"From: Hopital <secretariat@chu.test>\r\nTo: <" + ALICE.encode() + b">\r\n"
    b"Subject: Courrier de sortie\r\nMessage-ID: <w1@chu.test>\r\nMIME-Version: 1.0\r\n"
    b'Content-Type: multipart/mixed; boundary="M"\r\n\r\n'
    b"--M\r\nContent-Type: text/plain; charset=iso-8859-1\r\nContent-Transfer-Encoding: 8bit\r\n"
    b"\r\nCher confr\xe8re,\r\nci-joint le compte rendu.\r\n"
    b"--M\r\nContent-Type: application/pdf; name=cr.pdf\r\nContent-Transfer-Encoding: base64\r\n"
    b"Content-Disposition: attachment; filename=cr.pdf\r\n\r\n"
    + base64.encodebytes(b"%PDF-1.4\n\x00\x01\x02\xff binary" * 20).replace(b"\n", b"\r\n")
    + b"--M--\r\n"
)


def leaves(raw: bytes) -> list[bytes]:
    entity = parse_entity(raw)
    media_type, params = entity.content_type()
    if media_type.startswith("multipart/"):
        _, parts, _ = multipart_parts(entity.body, params["boundary"])
        return [leaf for part in parts for leaf in leaves(part)]
    return [decode_body(entity)]


def test_wrap_decrypts_with_recipient_key_and_gateway_signature_verifies(peers: Peers) -> None:
    context = WrapContext(
        "openpgp-net", Identity("gw", openpgp_secret=peers.gateway_secret), TrustStore(),
        Directory(openpgp=(peers.alice_public,)), NOW, "secretariat@chu.test",
        (ALICE, "nobody@cabinet.test"),
    )
    wrapped = ADAPTER.wrap(Unwrapped(CONTENT, Verdict.unsigned(), "mime"), context)
    assert set(wrapped.refused) == {"nobody@cabinet.test"}
    assert wrapped.refused["nobody@cabinet.test"].reason == Reason.NO_RECIPIENT_KEY
    assert wrapped.recipient_keys == {ALICE: peers.alice_fpr}
    assert b"Cher confr" not in wrapped.content and b"%PDF-1.4" not in wrapped.content

    outer = parse_entity(wrapped.content)
    assert outer.content_type()[0] == "multipart/encrypted"
    _, parts, _ = multipart_parts(outer.body, outer.content_type()[1]["boundary"])
    decrypted = peers.gpg.run("--decrypt", input=decode_body(parse_entity(parts[1])))
    assert decrypted.has("DECRYPTION_OKAY") and decrypted.has("GOODMDC"), decrypted.stderr
    enc_to = {line.split()[1] for line in decrypted.status if line.startswith("ENC_TO")}
    alice_keys = peers.gpg.run("--with-colons", "--list-keys", peers.alice_fpr).output.decode()
    alice_subkeys = {line.split(":")[4] for line in alice_keys.splitlines()
                     if line.startswith("sub:")}
    assert enc_to <= alice_subkeys  # encrypted for the intended recipient only

    signed = parse_entity(decrypted.output)
    media_type, params = signed.content_type()
    assert media_type == "multipart/signed" and params["micalg"] == "pgp-sha256"
    _, signed_parts, _ = multipart_parts(signed.body, params["boundary"])
    part = peers.gpg.base / "part"
    part.write_bytes(signed_parts[0])
    sig = peers.gpg.base / "part.asc"
    sig.write_bytes(decode_body(parse_entity(signed_parts[1])))
    verified = peers.gpg.run("--verify", str(sig), str(part))
    assert verified.has("GOODSIG"), verified.stderr
    gateway_fpr = wrapped.signer_key
    assert verified.line("VALIDSIG") is not None and gateway_fpr in str(verified.line("VALIDSIG"))
    assert leaves(signed_parts[0]) == leaves(CONTENT)  # parts byte-identical once decoded


def test_trap2_generated_identity_is_usable_by_gnupg_22(peers: Peers) -> None:
    """gpg encrypts to the generated key (no SEIPD v2) and we decrypt; gpg reads what we sign."""
    listing = peers.gpg.run("--with-colons", "--list-secret-keys", GATEWAY, check=True)
    rows = [line.split(":") for line in listing.output.decode().splitlines()]
    assert [r[3] for r in rows if r[0] in ("sec", "ssb")] == ["22", "18"]  # EdDSA, ECDH
    armored = peers.gpg.run("--armor", "--encrypt", "--recipient", GATEWAY, input=b"hi\n",
                            check=True).output
    packets = list(pysequoia.packet.PacketPile.from_bytes(armored))
    assert all(p.tag != pysequoia.packet.Tag.AED for p in packets)
    unwrapped = ADAPTER.unwrap(message(ALICE, armored), unwrap_context(peers))
    assert unwrapped.encrypted and text_of(unwrapped.content) == (b"hi\n", "utf-8")
    features = [p for p in pysequoia.packet.PacketPile.from_bytes(peers.gateway_secret)
                if p.tag == pysequoia.packet.Tag.Signature]
    # Features subpacket (type 30) = 0x01: MDC only, never the SEIPD v2 bit (0x08).
    assert all(b"\x02\x1e\x01" in bytes(p.body) for p in features[:1])


def test_wrap_to_revoked_or_missing_key_is_refused_never_plaintext(peers: Peers) -> None:
    context = WrapContext(
        "openpgp-net", Identity("gw", openpgp_secret=peers.gateway_secret), TrustStore(),
        Directory(openpgp=()), NOW, "a@chu.test", (ALICE,),
    )
    wrapped = ADAPTER.wrap(Unwrapped(CONTENT, Verdict.unsigned(), "mime"), context)
    assert wrapped.content == b"" and ALICE in wrapped.refused
    assert "key" in wrapped.refused[ALICE].advice
    # Alice's gpg-made key, revoked by its own primary key: refused the same way.
    tsk = pysequoia.Tsk.from_bytes(peers.gpg.export_secret(peers.alice_fpr))
    public = tsk.extract_certificate()
    revoked = pysequoia.Cert.from_bytes(bytes(public) + bytes(public.revoke(tsk.certifier())))
    context = WrapContext(
        "openpgp-net", Identity("gw", openpgp_secret=peers.gateway_secret), TrustStore(),
        Directory(openpgp=(str(revoked).encode(),)), NOW, "a@chu.test", (ALICE,),
    )
    wrapped = ADAPTER.wrap(Unwrapped(CONTENT, Verdict.unsigned(), "mime"), context)
    assert wrapped.content == b"" and "revoked" in wrapped.refused[ALICE].detail


def test_trap2_gnupg_holding_a_generated_secret_key_reads_and_signs(peers: Peers) -> None:
    """A correspondent whose key came from `gateway keys generate` uses it in GnuPG 2.2: it
    decrypts what the gateway sends (SEIPD v1 with MDC, never v2 or AEAD) and signs mail the
    gateway verifies."""
    carla = "carla@cabinet.test"
    secret = generate_identity(f"Carla <{carla}>", created=NOW - timedelta(days=1))
    public = str(pysequoia.Tsk.from_bytes(secret).extract_certificate()).encode()
    holder = Gpg()
    try:
        holder.import_key(secret)
        holder.import_key(str(pysequoia.Tsk.from_bytes(peers.gateway_secret)
                              .extract_certificate()).encode())
        wrapped = ADAPTER.wrap(Unwrapped(CONTENT, Verdict.unsigned(), "mime"), WrapContext(
            "openpgp-net", Identity("gw", openpgp_secret=peers.gateway_secret), TrustStore(),
            Directory(openpgp=(public,)), NOW, "secretariat@chu.test", (carla,),
        ))
        outer = parse_entity(wrapped.content)
        _, parts, _ = multipart_parts(outer.body, outer.content_type()[1]["boundary"])
        armored = decode_body(parse_entity(parts[1]))
        tags = [p.tag for p in pysequoia.packet.PacketPile.from_bytes(armored)]
        assert pysequoia.packet.Tag.SEIP in tags and pysequoia.packet.Tag.AED not in tags
        decrypted = holder.run("--decrypt", input=armored)
        assert decrypted.has("DECRYPTION_OKAY") and decrypted.has("GOODMDC"), decrypted.stderr
        signed_by_carla = holder.run(
            "--armor", "--sign", "--encrypt", "--recipient", GATEWAY, "--local-user", carla,
            input=b"Bonjour\n", check=True,
        ).output
    finally:
        holder.close()
    assert parse_entity(decrypted.output).content_type()[0] == "multipart/signed"
    unwrapped = ADAPTER.unwrap(message(carla, signed_by_carla), unwrap_context(peers, public))
    assert unwrapped.encrypted and unwrapped.signature.result == "pass"
    assert unwrapped.signature.signer == carla
