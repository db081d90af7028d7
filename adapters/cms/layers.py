"""Peeling the S/MIME layers of a received message, outermost first, down to its content.

A message may be signed, encrypted, or both in either order, and signed twice (a list server
or a secretary signing over the author's signed mail). Every layer is removed; each signed
layer is kept with the octets it covers and its depth, the number of encryption layers around
it, so the caller can decide which signature speaks for the message.

Only a signed layer peeled after the last decryption covers the plaintext the destination
will read. A signed layer with fewer encryption layers around it than the message has covers
ciphertext (encrypt-then-sign): RFC 8551 §3.7 says its recipient "cannot determine any
relationship between the signer and the unencrypted contents", and its entity is a blob only
this gateway can decrypt, never something to pass on to a destination.

The returned content is the innermost MIME entity with the outer message's RFC 5322 header
fields in front (RFC 8551 §3.1: the outer header fields are those of the message; the inner
entity brings its own Content-* fields). A header field the inner entity carries itself (a
protected header, RFC 9788) wins over the unprotected outer copy; so does a field that
RFC 5322 §3.6 allows once (From:, Date:, Subject:...) carried by an intermediate layer over
the copy of a layer around it, so the result never has two From: fields, one checked against
the signer and another shown by the reader.

Followed: RFC 8551 §3.2-3.5 (application/pkcs7-mime smime-types, multipart/signed with
application/pkcs7-signature, also the x-pkcs7 legacy names), RFC 1847 §2.1 (the signed part
is the exact octets of the first body part).

Untrusted input: the whole received message and every decrypted or signed inner entity.
"""

from __future__ import annotations

from dataclasses import dataclass

from adapters.base import Identity
from adapters.cms.directory import DirectoryIndex
from adapters.cms.entity import Entity, decode_body, field_blocks, multipart_parts, parse_entity
from adapters.cms.envelope import Opened, open_envelope
from adapters.cms.parse import guarded, load_content_info, malformed
from adapters.cms.verify import SignedContent, read_signed_data

__all__ = ["Peeled", "SignedLayer", "peel"]

_MAX_LAYERS = 8  # deeper nesting is no real client's output: refuse it rather than recurse
_PKCS7_MIME = {"application/pkcs7-mime", "application/x-pkcs7-mime"}
_PKCS7_SIGNATURE = {"application/pkcs7-signature", "application/x-pkcs7-signature"}
# RFC 5322 §3.6: fields a message carries at most once (and MIME-Version, RFC 2045 §4).
_AT_MOST_ONCE = frozenset({
    "date", "from", "sender", "reply-to", "to", "cc", "bcc", "message-id", "in-reply-to",
    "references", "subject", "mime-version",
})


@dataclass(frozen=True)
class SignedLayer:
    entity: bytes  # the signed MIME entity (its Content-* fields and body), as received
    signed: SignedContent
    opaque: bool
    depth: int  # encryption layers around this one (decryptions peeled before it)


@dataclass(frozen=True)
class Peeled:
    content: bytes
    signed_layers: tuple[SignedLayer, ...]  # outermost first
    decrypted: tuple[Opened, ...]  # outermost first

    def covers_content(self, layer: SignedLayer) -> bool:
        """Whether `layer` sits inside every encryption layer, so it signs the plaintext."""
        return layer.depth == len(self.decrypted)

    @property
    def content_layers(self) -> tuple[SignedLayer, ...]:
        """The signed layers over the plaintext, outermost first."""
        return tuple(layer for layer in self.signed_layers if self.covers_content(layer))

    @property
    def ciphertext_layers(self) -> tuple[SignedLayer, ...]:
        """The signed layers over an encrypted entity (encrypt-then-sign), outermost first."""
        return tuple(layer for layer in self.signed_layers if not self.covers_content(layer))


def _mime_entity(entity: Entity) -> bytes:
    """The entity's Content-* fields and body: what a signature layer wraps."""
    kept = b"".join(raw for name, raw in field_blocks(entity.head) if name.startswith("content-"))
    return kept + (entity.separator or b"\r\n") + entity.body


def _inner_wins(outer: list[tuple[str, bytes]], inner: Entity) -> list[tuple[str, bytes]]:
    """`outer` with the layer `inner`'s header fields added (not its Content-* fields)."""
    fields = [(n, b) for n, b in field_blocks(inner.head) if not n.startswith("content-")]
    replaced = {name for name, _ in fields if name in _AT_MOST_ONCE}
    return [(n, b) for n, b in outer if n not in replaced] + fields


def _merge(outer: list[tuple[str, bytes]], inner: Entity) -> bytes:
    inner_names = {name for name, _ in field_blocks(inner.head)}
    kept = b"".join(raw for name, raw in outer if name not in inner_names)
    return kept + inner.head + (inner.separator or b"\r\n") + inner.body


def peel(raw: bytes, identity: Identity | None, directory: DirectoryIndex) -> Peeled:
    current = parse_entity(raw)
    outer: list[tuple[str, bytes]] = []
    signed_layers: list[SignedLayer] = []
    decrypted: list[Opened] = []
    for _ in range(_MAX_LAYERS + 1):
        media_type, params = current.content_type()
        inner: bytes
        if media_type in _PKCS7_MIME:
            with guarded("application/pkcs7-mime body"):
                info = load_content_info(decode_body(current))
                kind = info["content_type"].native
            if kind in ("enveloped_data", "authenticated_enveloped_data"):
                with guarded(kind):
                    envelope = info["content"]
                    opened = open_envelope(kind, envelope, identity)
                decrypted.append(opened)
                inner = opened.content
            elif kind == "signed_data":
                with guarded("signed-data"):
                    signed = read_signed_data(info["content"], None, directory)
                signed_layers.append(SignedLayer(
                    _mime_entity(current), signed, opaque=True, depth=len(decrypted)
                ))
                inner = signed.content
            else:
                raise malformed(f"application/pkcs7-mime holding {kind}")
        elif media_type == "multipart/signed" and (
            params.get("protocol", "").lower() in _PKCS7_SIGNATURE
        ):
            with guarded("multipart/signed"):
                _, parts, _ = multipart_parts(current.body, params.get("boundary", ""))
                if len(parts) != 2:
                    raise ValueError(f"multipart/signed with {len(parts)} parts")
                signature_part = parse_entity(parts[1])
                if signature_part.content_type()[0] not in _PKCS7_SIGNATURE:
                    raise ValueError("second part is not application/pkcs7-signature")
                info = load_content_info(decode_body(signature_part))
                if info["content_type"].native != "signed_data":
                    raise ValueError("signature part is not signed-data")
                signed = read_signed_data(info["content"], parts[0], directory)
            signed_layers.append(SignedLayer(
                _mime_entity(current), signed, opaque=False, depth=len(decrypted)
            ))
            inner = parts[0]
        else:
            return Peeled(
                content=_merge(outer, current) if outer else raw,
                signed_layers=tuple(signed_layers),
                decrypted=tuple(decrypted),
            )
        outer = _inner_wins(outer, current)
        current = parse_entity(inner)
    raise malformed(f"more than {_MAX_LAYERS} nested S/MIME layers")
