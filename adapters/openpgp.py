"""The `openpgp` adapter: OpenPGP networks speaking PGP/MIME (RFC 3156, RFC 4880 / RFC 9580).

    unwrap: peel `multipart/encrypted` and `multipart/signed` layers (and a body that is one
            whole inline armored block), decrypting with the network identity and verifying
            against the directory; report the outermost signature that covers the plaintext
    wrap:   sign the content with the network identity (`multipart/signed`,
            micalg=pgp-sha256), then encrypt once to every recipient's valid certificate
            (`multipart/encrypted`); recipients without one are refused, never sent plaintext

Rules that decide verdicts (see `adapters.pgpkeys.signature_verdict`):
- a signature made over ciphertext (a `multipart/signed` around `multipart/encrypted`, or
  around an inline encrypted block) says nothing about the plaintext: anyone who sees the
  encrypted mail can sign it without reading it (RFC 8551 §3.7 says so of S/MIME, and the
  same holds here). When no signature covers the plaintext, such a signature makes the
  verdict `neutral` ("signature covers only the encrypted content", the S/MIME adapter's
  words), never a pass and never the author's: no signer is reported and a network that
  requires signatures refuses it. If it does not verify, its failure is the verdict (a
  broken signature is evidence of tampering either way); that its signer is not the From:
  address is no failure, since From: names the author of content it does not cover;
- inline blocks with unprotected text around them, and encrypted sub-parts of a larger
  message, are left as they are: never counted as an encrypted or signed whole (EFAIL);
- `encrypted` is claimed only when the whole content came out of a decryption of a pure
  encrypted message (session-key packets and one integrity-protected container): a
  `multipart/encrypted` or inline block holding literal, compressed or signed data, or
  encrypted data with packets appended, is refused (5.7.1), never passed as encrypted;
- no integrity protection, or a failed integrity check, is a 5.7.7 failure and no plaintext
  comes out;
- each decryption counts against `adapters.pgpkeys.MAX_ENCRYPTED_BLOCKS` (one encrypted part
  per layer and at most `_MAX_LAYERS` layers keep PGP/MIME far below it; the count is kept so
  the bound does not rest on the layer limit alone).

Inline text (a body that is one armored block) is handed on as the octets the sender wrote,
line breaks and all, labelled with a charset it can be in (`adapters.pgpmime.text_part`).

Untrusted input: the received message in `unwrap`; the inner content in `wrap`. Nothing but a
GatewayError leaves either method: anything a parser raises becomes 5.6.0 malformed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from adapters.base import UnwrapContext, Unwrapped, Verdict, WrapContext, Wrapped
from adapters.cms.entity import (
    Entity,
    address_of,
    decode_body,
    field_blocks,
    multipart_parts,
    parse_entity,
    seven_bit,
)
from adapters.cms.verdict import CIPHERTEXT_ONLY
from adapters.pgpkeys import (
    CertInfo,
    KeyIndex,
    NetworkKey,
    SignatureCheck,
    check_block_count,
    decrypt,
    encrypt,
    key_index,
    network_key,
    sign_detached,
    signature_verdict,
    verify_detached,
    verify_inline,
)
from adapters.pgpmime import (
    canonical_crlf,
    cleartext,
    encrypted_entity,
    find_armored,
    new_boundary,
    outer_fields,
    same_signed_text,
    signed_entity,
    text_entity,
    whole_armored,
)
from adapters.pgppackets import message_packets
from gateway.errors import GatewayError, PermanentFailure, Reason

__all__ = [
    "OpenPgpAdapter", "Peeled", "peel_openpgp", "recipient_certificate", "unwrap_openpgp",
    "wrap_openpgp",
]

_MAX_LAYERS = 8
_PGP_SIGNATURE = "application/pgp-signature"
_PGP_ENCRYPTED = "application/pgp-encrypted"
_SMIME_SIGNATURE = {"application/pkcs7-signature", "application/x-pkcs7-signature"}


def malformed(detail: str) -> PermanentFailure:
    return PermanentFailure(
        "The message's OpenPGP/MIME structure could not be read", enhanced="5.6.0",
        reason=Reason.MALFORMED, detail=detail,
    )


@dataclass
class Peeled:
    """What peeling found: the content, whether it was decrypted, the signatures that count."""

    content: bytes
    encrypted: bool = False
    keys: list[str] = field(default_factory=list)
    checks: list[tuple[SignatureCheck, bytes | None]] = field(default_factory=list)
    # Signatures made before the last decryption: over ciphertext, outermost first.
    over_ciphertext: list[SignatureCheck] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    blocks: int = 0  # decryptions made

    def decrypted(self, key: str, check: SignatureCheck) -> None:
        """Record one decryption: what was signed so far covered only its ciphertext."""
        self.over_ciphertext += [c for c, _ in self.checks]
        self.checks.clear()
        self.encrypted = True
        self.keys.append(key)
        if check.signed:
            self.checks.append((check, None))


def _inline_charset(declared: str | None, text: bytes) -> str:
    """A charset label for inline text. The body's label describes the armor but senders set
    it to their text's charset; it is kept when the text can be in it, else UTF-8 (the
    OpenPGP default, RFC 9580 §7) when the text is UTF-8, else `unknown-8bit` (RFC 1428)."""
    for candidate in (declared or "us-ascii", "utf-8"):
        try:
            text.decode(candidate)
        except (LookupError, UnicodeError):
            continue
        return candidate
    return "unknown-8bit"


def _merged_head(outer: list[tuple[str, bytes]], head: bytes) -> bytes:
    # A field the inner entity carries itself (protected headers) wins over the outer copy.
    inner_names = {name for name, _ in field_blocks(head)}
    return b"".join(raw for name, raw in outer if name not in inner_names) + head


def _merge(outer: list[tuple[str, bytes]], inner: Entity) -> bytes:
    return b"".join((_merged_head(outer, inner.head), inner.separator or b"\r\n", inner.body))


def _mime_entity(entity: Entity) -> bytes:
    kept = b"".join(raw for name, raw in field_blocks(entity.head) if name.startswith("content-"))
    return kept + (entity.separator or b"\r\n") + entity.body


def _two_parts(entity: Entity, params: Mapping[str, str], what: str) -> list[bytes]:
    try:
        _, parts, _ = multipart_parts(entity.body, params.get("boundary", ""))
    except ValueError as error:
        raise malformed(f"{what}: {error}") from None
    if len(parts) != 2:
        raise malformed(f"{what} with {len(parts)} parts")
    return parts


def _decrypt(peeled: Peeled, payload: bytes, key: NetworkKey | None, index: KeyIndex) -> bytes:
    peeled.blocks += 1
    check_block_count(peeled.blocks)
    decrypted = decrypt(payload, _need(key), index)
    peeled.decrypted(decrypted.key, decrypted.check)
    return decrypted.plaintext


def peel_openpgp(
    raw: bytes, key: NetworkKey | None, index: KeyIndex,
    text_charset: Callable[[bytes], str] | None = None,
) -> Peeled:
    """Remove every OpenPGP layer of `raw`, outermost first.

    `text_charset` names the charset of inline text when the network fixes it (Apicrypt);
    without it the label is inferred (`_inline_charset`).
    """
    current = parse_entity(raw)
    outer: list[tuple[str, bytes]] = []
    peeled = Peeled(content=raw)
    changed = False
    for _ in range(_MAX_LAYERS + 1):
        media_type, params = current.content_type()
        protocol = params.get("protocol", "").lower()
        inner: bytes
        if media_type == "multipart/encrypted" and protocol == _PGP_ENCRYPTED:
            parts = _two_parts(current, params, "multipart/encrypted")
            inner = _decrypt(peeled, decode_body(parse_entity(parts[1])), key, index)
        elif media_type == "multipart/signed" and protocol == _PGP_SIGNATURE:
            parts = _two_parts(current, params, "multipart/signed")
            signature = decode_body(parse_entity(parts[1]))
            check = verify_detached(canonical_crlf(parts[0]), signature, index)
            peeled.checks.append((check, _mime_entity(current)))
            inner = parts[0]
        elif media_type == "multipart/signed" and protocol in _SMIME_SIGNATURE:
            parts = _two_parts(current, params, "multipart/signed")
            peeled.notes.append("S/MIME signature layer not verified by the openpgp adapter")
            inner = parts[0]
        elif media_type == "text/plain":
            text = decode_body(current)
            armored = whole_armored(text)
            if armored is None:
                if find_armored(text):
                    peeled.notes.append("partial inline OpenPGP left as is (not a whole)")
                break
            packets, encrypted = (
                message_packets(armored.block) if armored.kind == "message"
                else (armored.block, False)  # cleartext: pysequoia reads its framing
            )
            if encrypted:
                clear = _decrypt(peeled, packets, key, index)
            else:
                content, check = verify_inline(packets, index)
                peeled.checks.append((check, None))
                if content is None:
                    # Not verified: keep the message exactly as it arrived.
                    peeled.notes.append("inline signature not verified; body left as is")
                    break
                clear = content
                if armored.kind == "cleartext":
                    # pysequoia hands out the signed text without the line break before the
                    # signature and without trailing blanks; the sender's lines are these.
                    printed = cleartext(armored.block)
                    if printed is not None and same_signed_text(printed, content):
                        clear = printed
                    else:
                        peeled.notes.append("cleartext given as verified, not as written")
            charset = text_charset(clear) if text_charset is not None else _inline_charset(
                params.get("charset"), clear)
            head, body = text_entity(current, clear, charset)
            # Joined once: the text is copied once.
            peeled.content = b"".join((_merged_head(outer, head), b"\r\n", body))
            return peeled
        else:
            if media_type.startswith("multipart/") and find_armored(current.body):
                peeled.notes.append("OpenPGP data inside a larger message left as is")
            break
        changed = True
        outer += [(n, b) for n, b in field_blocks(current.head) if not n.startswith("content-")]
        current = parse_entity(inner)
    else:
        raise malformed(f"more than {_MAX_LAYERS} nested OpenPGP layers")
    if changed:
        peeled.content = _merge(outer, current)
    return peeled


def _need(key: NetworkKey | None) -> NetworkKey:
    if key is None:
        raise PermanentFailure(
            "The gateway holds no OpenPGP key for this network", enhanced="5.7.5",
            reason=Reason.NO_DECRYPTION_KEY, detail="encrypted mail, no network identity",
        )
    return key


def _over_ciphertext(layer: Verdict) -> Verdict:
    """The verdict when the only signature covers ciphertext (see the module docstring)."""
    if layer.result == "pass" or layer.failure is Reason.SIGNER_MISMATCH:
        return dataclasses.replace(
            layer, result="neutral", reason=CIPHERTEXT_ONLY, failure=None, signer=None,
            signer_subject=None,
        )
    return layer


def unwrap_openpgp(
    raw: bytes, context: UnwrapContext, method: str, source: str,
    text_charset: Callable[[bytes], str] | None = None,
) -> Unwrapped:
    index = key_index(context.directory)
    key = network_key(context.identity) if context.identity is not None and (
        context.identity.openpgp_secret
    ) else None
    peeled = peel_openpgp(raw, key, index, text_charset)
    content_entity = parse_entity(peeled.content)
    from_address = address_of(content_entity.get("from"))
    verdict = Verdict.unsigned(method)
    signed_entity_bytes: bytes | None = None
    for position, (check, entity) in enumerate(peeled.checks):
        layer = signature_verdict(check, index, from_address, context.now, method)
        if position == 0:
            verdict = layer
            if layer.result == "pass":
                signed_entity_bytes = entity
        else:
            peeled.notes.append(
                f"inner openpgp signature: {layer.result} ({layer.reason}); signer "
                f"{layer.signer or 'unknown'}"
            )
    for position, check in enumerate(peeled.over_ciphertext):
        layer = signature_verdict(check, index, from_address, context.now, method)
        peeled.notes.append(
            f"openpgp signature over the encrypted part, not over the content: {layer.result} "
            f"({layer.reason}); signer {layer.signer or 'unknown'}; key "
            f"{layer.fingerprints[0] if layer.fingerprints else 'unknown'}"
        )
        if position == 0 and not peeled.checks:
            verdict = _over_ciphertext(layer)
    return Unwrapped(
        content=peeled.content,
        signature=verdict,
        source_format=source,
        encrypted=peeled.encrypted,
        decryption_keys=tuple(peeled.keys),
        signed_entity=signed_entity_bytes,
        notes=tuple(peeled.notes),
    )


# -- wrap ------------------------------------------------------------------------------------

def recipient_certificate(
    address: str, index: KeyIndex, context: WrapContext
) -> tuple[CertInfo | None, str]:
    """The newest usable certificate for `address`, or None and why."""
    candidates = index.for_address(address)
    if not candidates:
        return None, "no OpenPGP certificate in the directory"
    usable = [
        c for c in candidates
        if not c.revoked and not c.expired(context.now) and c.encryption_capable
    ]
    if not usable:
        reasons = sorted({
            "revoked" if c.revoked else "expired" if c.expired(context.now)
            else "no encryption key" for c in candidates
        })
        return None, "certificate " + ", ".join(reasons)
    return max(usable, key=lambda c: c.created), ""


def wrap_openpgp(
    message: Unwrapped, context: WrapContext, source_name: str
) -> tuple[bytes, dict[str, PermanentFailure], dict[str, str], str]:
    """(PGP/MIME message, refused, recipient keys, signer key) for `context.recipients`."""
    try:
        key = network_key(context.identity)
    except PermanentFailure as error:
        raise PermanentFailure(
            "The gateway has no usable OpenPGP identity for this network", enhanced="5.3.5",
            reason=Reason.WRAP_FAILED, detail=error.detail,
        ) from None
    index = key_index(context.directory)
    refused: dict[str, PermanentFailure] = {}
    chosen: dict[str, CertInfo] = {}
    for address in context.recipients:
        cert, why = recipient_certificate(address, index, context)
        if cert is None:
            refused[address] = PermanentFailure(
                f"No valid OpenPGP key is known for {address}; ask the recipient for their "
                "current public key and add it to the gateway's directory",
                enhanced="5.7.1", reason=Reason.NO_RECIPIENT_KEY, detail=f"{address}: {why}",
            )
        else:
            chosen[address] = cert
    if not chosen:
        return b"", refused, {}, key.fingerprint
    content = parse_entity(message.content)
    if message.source_format == source_name and message.signed_entity:
        # Keep the author's verified signature inside; the gateway signs around it.
        header = b"".join(
            raw for name, raw in field_blocks(content.head) if not name.startswith("content-")
        )
        to_sign = seven_bit(header + message.signed_entity)
    else:
        to_sign = seven_bit(message.content)
    signature = sign_detached(key, to_sign, context.now)
    signed = signed_entity(
        to_sign, signature, "pgp-sha256", new_boundary(context.random, to_sign, "signed")
    )
    unique = list({c.fingerprint: c for c in chosen.values()}.values())
    armored = encrypt(signed, unique)
    wrapped = encrypted_entity(
        outer_fields(content.head), armored, new_boundary(context.random, b"", "encrypted")
    )
    return (
        wrapped, refused, {a: c.fingerprint for a, c in chosen.items()}, key.fingerprint
    )


class OpenPgpAdapter:
    name = "openpgp"
    method = "x-openpgp"

    def option_problems(self, options: Mapping[str, object]) -> list[str]:
        return [f"option {key!r} is not known to the openpgp adapter (it takes none)"
                for key in options]

    def unwrap(self, raw: bytes, context: UnwrapContext) -> Unwrapped:
        try:
            return unwrap_openpgp(raw, context, self.method, self.name)
        except GatewayError:
            raise
        except Exception as error:  # never crash the worker on hostile input
            raise malformed(f"openpgp unwrap: {type(error).__name__}: {error}") from None

    def wrap(self, message: Unwrapped, context: WrapContext) -> Wrapped:
        try:
            content, refused, keys, signer = wrap_openpgp(message, context, self.name)
        except GatewayError:
            raise
        except Exception as error:
            raise PermanentFailure(
                "The message could not be prepared for the OpenPGP network; its MIME "
                "structure could not be read", enhanced="5.6.0", reason=Reason.MALFORMED,
                detail=f"openpgp wrap: {type(error).__name__}: {error}",
            ) from None
        return Wrapped(content=content, refused=refused, recipient_keys=keys, signer_key=signer)
