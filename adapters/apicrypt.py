"""The `apicrypt` adapter: mail in the layout Apicrypt clients and their EHRs already parse.

Layout (both directions): the subject and routing fields in clear; the text body is one
encrypted text block; each attachment is encrypted on its own and named `<name>.apz`. Text is
ISO-8859-1 for Apicrypt v1 and UTF-8 for v2 (network option `version`). HPRIM lab reports
(12-line header, `****LAB****` blocks of `TEX|`/`RES|` lines, `****FIN****`,
`****FINFICHIER****`, CRLF or LF) are carried as opaque octets: after charset conversion the
text a recipient decrypts is exactly what the sender wrote. Inbound, every form of text the
network sends (text block, inline encrypted, signed+encrypted, cleartext-signed or
inline-signed) comes out as the sender's octets under the network's charset label, in base64
whenever SMTP could not carry them as they are (`adapters.pgpmime.text_part`). A v2 text that
is not UTF-8 can only be a v1 client's Latin-1, and is labelled so.

Codecs (`codec` option):
- `openpgp` (default): the blocks are OpenPGP messages, signed by the gateway and encrypted to
  the recipient's key (RFC 4880 / RFC 9580, via `adapters.pgpkeys`). Inbound mail may also be
  PGP/MIME or inline OpenPGP (Apicrypt 2, PGP users): that unwraps as with `openpgp`.
- `external`: the licensed APICEM programs (`adapters.apicrypt_external`); Apicrypt v1 bodies
  are recognised by their `$APICRYPT` marker. Signatures are not reported by those programs,
  so the verdict is `neutral`.

Options: codec, version, programs {apicrypt, apiuncrypt, apicryptpj, apiuncryptpj: path},
user, key_directory, timeout (seconds).

What counts as encrypted or signed: a message is unwrapped only when every part is a block
(the text block, `.apz` attachments); every part then comes out of a decryption, and the
signature verdict passes only when every block is signed. Blocks beside a part in clear
(EFAIL-style wrapping) are not decrypted: the message is left as it arrived, neither
encrypted nor signed. A text block or `.apz` attachment that is not a pure encrypted OpenPGP
message (literal, compressed or signed data, or encrypted data with packets appended) is
refused by `adapters.pgpkeys.decrypt`, never taken as encrypted.

Untrusted input: the received message in `unwrap`; the inner content in `wrap`. MIME nesting
deeper than `_MAX_NESTING` is refused: splitting each level rescans its body, so depth
multiplies the cost. A message with more blocks than `adapters.pgpkeys.MAX_ENCRYPTED_BLOCKS`
is refused (5.6.0) before any is opened: each costs private-key operations, or a run of the
external programs.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from adapters.apicrypt_external import PROGRAMS, ExternalCodec
from adapters.base import UnwrapContext, Unwrapped, Verdict, WrapContext, Wrapped
from adapters.cms.entity import (
    Entity,
    address_of,
    decode_body,
    field_blocks,
    multipart_parts,
    parse_entity,
)
from adapters.openpgp import malformed, recipient_certificate, unwrap_openpgp
from adapters.pgpkeys import (
    CertInfo,
    KeyIndex,
    NetworkKey,
    SignatureCheck,
    check_block_count,
    decrypt,
    encrypt_signed,
    key_index,
    network_key,
    signature_verdict,
)
from adapters.pgpmime import (
    base64_body,
    canonical_crlf,
    clear_fields,
    new_boundary,
    text_part_pieces,
    whole_armored,
)
from adapters.pgppackets import message_packets
from gateway.errors import GatewayError, PermanentFailure, Reason

__all__ = ["ApicryptAdapter", "ApicryptCodec"]

_KNOWN = {"codec", "version", "programs", "user", "key_directory", "timeout"}
_MARKER = b"$APICRYPT"
_CHARSETS = {1: "iso-8859-1", 2: "utf-8"}
_MAX_NESTING = 32


@dataclass(frozen=True)
class _Options:
    codec: str = "openpgp"
    version: int = 1
    programs: Mapping[str, str] | None = None
    user: str = ""
    key_directory: str = ""
    timeout: float = 30.0

    @staticmethod
    def of(options: Mapping[str, object]) -> _Options:
        programs = options.get("programs")
        return _Options(
            codec=str(options.get("codec", "openpgp")),
            version=int(str(options.get("version", 1))),
            programs={str(k): str(v) for k, v in programs.items()}
            if isinstance(programs, Mapping) else None,
            user=str(options.get("user", "")),
            key_directory=str(options.get("key_directory", "")),
            timeout=float(str(options.get("timeout", 30))),
        )


class ApicryptCodec(Protocol):
    """What the layout needs from a codec (recipients are mail addresses)."""

    def seal_text(self, data: bytes, recipients: Sequence[str]) -> bytes: ...
    def open_text(self, data: bytes) -> bytes: ...
    def seal_attachment(self, data: bytes, recipients: Sequence[str]) -> bytes: ...
    def open_attachment(self, data: bytes) -> bytes: ...


class _OpenPgpCodec:
    """OpenPGP in the Apicrypt layout: sign with the network key, encrypt to the recipients."""

    def __init__(self, key: NetworkKey, index: KeyIndex, certs: Sequence[CertInfo] = ()) -> None:
        self.key, self.index, self.certs = key, index, list(certs)
        self.checks: list[SignatureCheck] = []
        self.keys: list[str] = []  # fingerprints of the gateway keys that decrypted blocks

    def seal_text(self, data: bytes, recipients: Sequence[str]) -> bytes:
        return encrypt_signed(data, self.key, self.certs, armor=True)

    def seal_attachment(self, data: bytes, recipients: Sequence[str]) -> bytes:
        return encrypt_signed(data, self.key, self.certs, armor=False)

    def _open(self, data: bytes) -> bytes:
        opened = decrypt(data, self.key, self.index)
        self.checks.append(opened.check)
        if opened.key not in self.keys:
            self.keys.append(opened.key)
        return opened.plaintext

    def open_text(self, data: bytes) -> bytes:
        return self._open(data)

    def open_attachment(self, data: bytes) -> bytes:
        return self._open(data)


def _external(options: _Options) -> ExternalCodec:
    return ExternalCodec(options.programs or {}, options.user, options.key_directory,
                         options.timeout)


def _inbound_charset(version: int) -> Callable[[bytes], str]:
    """The charset label of text received on a network of Apicrypt `version`."""
    def charset(text: bytes) -> str:
        if version == 2:
            try:
                text.decode("utf-8")
            except UnicodeDecodeError:
                # Not UTF-8: a v1 client's Latin-1 (every octet string is); a UTF-8 label
                # would turn each accent into U+FFFD while the octets stay right.
                return _CHARSETS[1]
        return _CHARSETS.get(version, _CHARSETS[1])
    return charset


# A part as (head with its empty line, body), joined into the message once, by `_assemble`.
_Part = tuple[bytes, bytes]


def _attachment_part(name: str, data: bytes) -> _Part:
    safe = name.replace('"', "").replace("\r", "").replace("\n", "")
    return (
        f'Content-Type: application/octet-stream; name="{safe}"\r\n'
        "Content-Transfer-Encoding: base64\r\n"
        f'Content-Disposition: attachment; filename="{safe}"\r\n\r\n'
    ).encode(), base64_body(data)


def _filename(entity: Entity) -> str | None:
    disposition = entity.get("content-disposition") or ""
    match = re.search(r'filename\*?="?([^";]+)"?', disposition)
    if match:
        return match.group(1).strip()
    return entity.content_type()[1].get("name")


def _leaves(entity: Entity, depth: int = 0) -> list[Entity]:
    media_type, params = entity.content_type()
    if media_type.startswith("multipart/") and "boundary" in params:
        if depth >= _MAX_NESTING:
            raise malformed(f"MIME parts nested more than {_MAX_NESTING} levels deep")
        _, parts, _ = multipart_parts(entity.body, params["boundary"])
        return [leaf for part in parts for leaf in _leaves(parse_entity(part), depth + 1)]
    return [entity]


def _digest_random(parts: list[_Part]) -> Callable[[int], bytes]:
    """Octets for a boundary, derived from `parts` (unwrap has no randomness): a digest of
    every part, which no part can hold the boundary made of, computed only when a boundary
    is needed (one part needs none); each further call hashes the previous answer."""
    chain: list[bytes] = []

    def random(count: int) -> bytes:
        if not chain:
            digest = hashlib.sha256()
            for head, body in parts:
                digest.update(head)
                digest.update(body)
            chain.append(digest.digest())
        else:
            chain.append(hashlib.sha256(chain[-1]).digest())
        return chain[-1][:count]
    return random


def _assemble(outer: bytes, parts: list[_Part], random: Callable[[int], bytes]) -> bytes:
    """The message: `outer` fields, then the one part or a multipart/mixed of them, joined
    once (each part's octets are copied once)."""
    if len(parts) == 1:
        return b"".join((outer, b"MIME-Version: 1.0\r\n", *parts[0]))
    # A boundary holds no line break and every head ends with one, so it can only stand
    # within a head or a body: those are what it must not occur in.
    boundary = new_boundary(random, [piece for part in parts for piece in part], "apicrypt")
    pieces = [outer, b'MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary="',
              boundary, b'"\r\n\r\n']
    for head, body in parts:
        pieces += (b"--", boundary, b"\r\n", head, body, b"\r\n")
    pieces += (b"--", boundary, b"--\r\n")
    return b"".join(pieces)


class ApicryptAdapter:
    name = "apicrypt"
    method = "x-apicrypt"

    def option_problems(self, options: Mapping[str, object]) -> list[str]:
        problems = [
            f"option {key!r} is not known to the apicrypt adapter "
            f"(known: {', '.join(sorted(_KNOWN))})"
            for key in options if key not in _KNOWN
        ]
        codec = str(options.get("codec", "openpgp"))
        if codec not in ("openpgp", "external"):
            problems.append(f"option 'codec' must be openpgp or external, not {codec!r}")
        if str(options.get("version", 1)) not in ("1", "2"):
            problems.append(f"option 'version' must be 1 or 2, not {options.get('version')!r}")
        try:
            if float(str(options.get("timeout", 30))) <= 0:
                problems.append("option 'timeout' must be a positive number of seconds")
        except ValueError:
            problems.append("option 'timeout' must be a number of seconds")
        programs = options.get("programs")
        if programs is not None and not isinstance(programs, Mapping):
            problems.append("option 'programs' must map apicrypt, apiuncrypt, apicryptpj and "
                            "apiuncryptpj to the paths of those programs")
        elif isinstance(programs, Mapping):
            for key in programs:
                if key not in PROGRAMS:
                    problems.append(f"programs: {key!r} is not an APICEM program "
                                    f"(known: {', '.join(PROGRAMS)})")
        if codec == "external":
            missing = [p for p in PROGRAMS if not isinstance(programs, Mapping)
                       or not programs.get(p)]
            if missing:
                problems.append("codec external needs programs: " + ", ".join(missing))
            for key in ("user", "key_directory"):
                if not options.get(key):
                    problems.append(f"codec external needs option {key!r}")
        return problems

    # -- unwrap --------------------------------------------------------------------------------

    def unwrap(self, raw: bytes, context: UnwrapContext) -> Unwrapped:
        try:
            return self._unwrap(raw, context)
        except GatewayError:
            raise
        except Exception as error:
            raise malformed(f"apicrypt unwrap: {type(error).__name__}: {error}") from None

    def _unwrap(self, raw: bytes, context: UnwrapContext) -> Unwrapped:
        options = _Options.of(context.options)
        entity = parse_entity(raw)
        media_type, params = entity.content_type()
        leaves = _leaves(entity)
        texts = [leaf for leaf in leaves if leaf.content_type()[0] == "text/plain"]
        first_text = decode_body(texts[0]) if texts else b""
        v1_text = _MARKER in first_text
        armored_text = whole_armored(first_text) if texts and not v1_text else None
        text_block = v1_text or armored_text is not None
        # With the openpgp codec an inline encrypted text is an Apicrypt text block: read here,
        # where its octets and the network's charset are kept (HPRIM with bare LF).
        text_packets: bytes | None = None  # the inline block's packets, read once
        if options.codec == "openpgp" and armored_text is not None and (
            armored_text.kind == "message"
        ):
            packets, encrypted = message_packets(armored_text.block)
            text_packets = packets if encrypted else None
        inline_block = text_packets is not None

        def is_block(leaf: Entity) -> bool:
            return (_filename(leaf) or "").lower().endswith(".apz") or (
                text_block and leaf is texts[0]
            )

        apz = [leaf for leaf in leaves if (_filename(leaf) or "").lower().endswith(".apz")]
        text_charset = _inbound_charset(options.version)
        if (media_type in ("multipart/encrypted", "multipart/signed") and "pgp" in
                params.get("protocol", "")) or not (apz or v1_text or inline_block):
            # PGP/MIME or inline OpenPGP from the same network: as the openpgp adapter does,
            # inline text labelled with the network's charset.
            return unwrap_openpgp(raw, context, self.method, self.name, text_charset)
        if not all(is_block(leaf) for leaf in leaves):
            # Blocks beside parts in clear (EFAIL-style wrapping): decrypting would deliver the
            # plaintext next to content the author never wrote. Left exactly as it arrived,
            # neither encrypted nor signed, as `openpgp` does with such sub-parts.
            return Unwrapped(
                content=raw, signature=Verdict.unsigned(self.method), source_format=self.name,
                notes=("Apicrypt blocks beside unencrypted parts left as they are "
                       "(not an encrypted whole)",),
            )
        check_block_count(len(leaves))  # every leaf is a block here
        codec: ApicryptCodec
        index = key_index(context.directory)
        pgp: _OpenPgpCodec | None = None
        if options.codec == "external":
            codec = _external(options)
        else:
            if v1_text:
                raise PermanentFailure(
                    "This Apicrypt v1 message needs the gateway's external Apicrypt codec",
                    enhanced="5.7.5", reason=Reason.DECRYPTION_FAILED,
                    detail="apicrypt: $APICRYPT body received on a network with codec openpgp",
                )
            pgp = _OpenPgpCodec(network_key(context.identity), index)
            codec = pgp
        parts: list[_Part] = []
        for leaf in leaves:
            name = _filename(leaf)
            if name and name.lower().endswith(".apz"):
                parts.append(_attachment_part(name[:-4], codec.open_attachment(decode_body(leaf))))
            else:
                if text_packets is not None:
                    block = text_packets
                else:
                    block = armored_text.block if armored_text is not None else first_text
                text = codec.open_text(block)
                parts.append(text_part_pieces(text, text_charset(text)))
        outer = b"".join(raw_field for n, raw_field in field_blocks(entity.head)
                         if not n.startswith("content-") and n != "mime-version")
        content = _assemble(outer, parts, _digest_random(parts))
        from_address = address_of(entity.get("from"))
        if pgp is not None:
            verdict = Verdict.unsigned(self.method)
            signed = [c for c in pgp.checks if c.signed]
            if signed:
                verdicts = [signature_verdict(c, index, from_address, context.now, self.method)
                            for c in signed]
                # Every block must pass for the message to count as signed.
                failing = [v for v in verdicts if v.result != "pass"]
                verdict = failing[0] if failing else verdicts[0]
                if len(signed) != len(pgp.checks):
                    verdict = Verdict(self.method, "fail", "some blocks are not signed",
                                      failure=Reason.SIGNATURE_MISSING, signer=verdict.signer)
        else:
            verdict = Verdict(self.method, "neutral",
                              "signature not reported by the external codec")
        return Unwrapped(
            content=content, signature=verdict, source_format=self.name,
            encrypted=True,  # every part came out of a block the codec decrypted
            decryption_keys=tuple(pgp.keys) if pgp is not None else (),
        )

    # -- wrap ----------------------------------------------------------------------------------

    def wrap(self, message: Unwrapped, context: WrapContext) -> Wrapped:
        try:
            return self._wrap(message, context)
        except GatewayError:
            raise
        except Exception as error:
            raise PermanentFailure(
                "The message could not be prepared for the Apicrypt network; its MIME "
                "structure could not be read", enhanced="5.6.0", reason=Reason.MALFORMED,
                detail=f"apicrypt wrap: {type(error).__name__}: {error}",
            ) from None

    def _wrap(self, message: Unwrapped, context: WrapContext) -> Wrapped:
        options = _Options.of(context.options)
        refused: dict[str, PermanentFailure] = {}
        chosen: dict[str, CertInfo] = {}
        signer_key: str | None = None
        codec: ApicryptCodec
        if options.codec == "external":
            codec = _external(options)
            accepted = list(context.recipients)
        else:
            try:
                key = network_key(context.identity)
            except PermanentFailure as error:
                raise PermanentFailure(
                    "The gateway has no usable OpenPGP identity for this network",
                    enhanced="5.3.5", reason=Reason.WRAP_FAILED, detail=error.detail,
                ) from None
            signer_key = key.fingerprint
            index = key_index(context.directory)
            for address in context.recipients:
                cert, why = recipient_certificate(address, index, context)
                if cert is None:
                    refused[address] = PermanentFailure(
                        f"No valid Apicrypt (OpenPGP) key is known for {address}; ask the "
                        "recipient for their current key and add it to the gateway's directory",
                        enhanced="5.7.1", reason=Reason.NO_RECIPIENT_KEY,
                        detail=f"{address}: {why}",
                    )
                else:
                    chosen[address] = cert
            codec = _OpenPgpCodec(key, index, list(
                {c.fingerprint: c for c in chosen.values()}.values()))
            accepted = list(chosen)
        if not accepted:
            return Wrapped(content=b"", refused=refused, signer_key=signer_key)
        entity = parse_entity(message.content)
        charset = _CHARSETS.get(options.version, "iso-8859-1")
        parts: list[_Part] = []
        text_done = False
        for leaf in _leaves(entity):
            media_type, params = leaf.content_type()
            data = decode_body(leaf)
            name = _filename(leaf)
            if media_type == "text/plain" and not text_done and not name:
                text_done = True
                declared = params.get("charset", "us-ascii")
                try:
                    text = data if declared.lower() in (charset, "us-ascii") else (
                        data.decode(declared).encode(charset))
                except LookupError:
                    raise PermanentFailure(
                        f"The text is labelled with a character set the gateway does not know "
                        f"({declared[:40]}); the sender must send it in UTF-8 or ISO-8859-1",
                        enhanced="5.6.3", reason=Reason.WRAP_FAILED,
                        detail=f"apicrypt wrap: unknown charset {declared[:40]!r}",
                    ) from None
                except UnicodeError:
                    raise PermanentFailure(
                        f"The text cannot be written in {charset} for Apicrypt v"
                        f"{options.version}; the network needs Apicrypt version 2 (UTF-8)",
                        enhanced="5.6.3", reason=Reason.WRAP_FAILED,
                        detail=f"apicrypt wrap: text in {declared} not representable",
                    ) from None
                sealed = codec.seal_text(text, accepted)
                parts.insert(0, (
                    f"Content-Type: text/plain; charset={charset}\r\n"
                    "Content-Transfer-Encoding: 7bit\r\n\r\n".encode("ascii"),
                    canonical_crlf(sealed),
                ))
            else:
                label = name or f"piece-jointe-{len(parts) + 1}.bin"
                parts.append(_attachment_part(label + ".apz",
                                              codec.seal_attachment(data, accepted)))
        content = _assemble(clear_fields(entity.head), parts, context.random)
        return Wrapped(
            content=content, refused=refused,
            recipient_keys={a: c.fingerprint for a, c in chosen.items()},
            signer_key=signer_key,
        )
