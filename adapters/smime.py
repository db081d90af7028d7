"""The `smime` adapter: S/MIME networks such as the @medecin.fr boxes (RFC 8551, CMS RFC 5652).

    unwrap: decrypt (EnvelopedData / AuthEnvelopedData) with the network's identity, verify
            every signed layer (multipart/signed or opaque signed-data), report the outermost
            signature over the plaintext as the Verdict (a signature over ciphertext only is
            neutral), hand on the inner message with the outer RFC 5322 fields
    wrap:   sign with the network's identity (multipart/signed by default), keeping the
            author's signed entity inside when the source was S/MIME too, then encrypt once to
            every recipient's validated certificate from the directory

The CMS work lives in `adapters.cms` (parse, verify, trust, envelope, sign, encrypt) on
asn1crypto for the ASN.1 and cryptography for the primitives: no maintained Python library
verifies CMS signatures with signed attributes, SKI signers and BER input, and a subprocess to
openssl would break the sans-I/O rule.

Options (routing.yaml, under the network): `signature: multipart|opaque`,
`content_encryption: aes-256-cbc|aes-256-gcm`, `key_transport: rsa-pkcs1|rsa-oaep`,
`signature_padding: pkcs1|pss`.

Untrusted input: the received message in `unwrap`; the inner content in `wrap`. Nothing but a
GatewayError leaves either method: anything a parser raises becomes 5.6.0 malformed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import cast

from cryptography import x509

from adapters.base import UnwrapContext, Unwrapped, Verdict, WrapContext, Wrapped
from adapters.cms.directory import directory_index
from adapters.cms.encrypt import ContentEncryption, KeyTransport, encrypt_content
from adapters.cms.entity import address_of, base64_lines, field_blocks, parse_entity, seven_bit
from adapters.cms.layers import peel
from adapters.cms.parse import malformed
from adapters.cms.sign import SignaturePadding, sign_content
from adapters.cms.trust import TrustProblem, check_certificate, fingerprint, trust_cache
from adapters.cms.verdict import layer_note, over_ciphertext, signature_verdict
from gateway.errors import GatewayError, PermanentFailure, Reason
from gateway.revocation import revocation_unknown

__all__ = ["SmimeAdapter"]

_CHOICES: dict[str, tuple[str, ...]] = {
    "signature": ("multipart", "opaque"),
    "content_encryption": ("aes-256-cbc", "aes-256-gcm"),
    "key_transport": ("rsa-pkcs1", "rsa-oaep"),
    "signature_padding": ("pkcs1", "pss"),
}
# Header fields copied onto the encrypted envelope so that MTAs can route and clients can
# list it; the authoritative copies travel inside, signed.
_ROUTING_FIELDS = (
    "from", "sender", "reply-to", "to", "cc", "subject", "date", "message-id",
    "in-reply-to", "references",
    # A client offers a read receipt (RFC 8098 §2.1) from the header it shows, the outer one.
    "disposition-notification-to", "disposition-notification-options",
)


@dataclass(frozen=True)
class _Options:
    signature: str = "multipart"
    content_encryption: str = "aes-256-cbc"
    key_transport: str = "rsa-pkcs1"
    signature_padding: str = "pkcs1"

    @staticmethod
    def of(options: Mapping[str, object]) -> _Options:
        values = {k: str(options[k]) for k in _CHOICES if k in options}
        wrong = [f"{k}={v}" for k, v in values.items() if v not in _CHOICES[k]]
        if wrong:
            # `gateway check` reports these; never fall back to a weaker default silently.
            raise PermanentFailure(
                "The gateway's S/MIME settings for this network are invalid",
                enhanced="5.3.5", reason=Reason.WRAP_FAILED,
                detail=f"invalid smime options: {', '.join(wrong)}",
            )
        return _Options(**values)


def _crlf_line(raw: bytes) -> bytes:
    return raw.rstrip(b"\r\n").replace(b"\r\n", b"\n").replace(b"\n", b"\r\n") + b"\r\n"


class SmimeAdapter:
    name = "smime"
    method = "smime"

    def option_problems(self, options: Mapping[str, object]) -> list[str]:
        problems: list[str] = []
        for key, value in options.items():
            if key not in _CHOICES:
                problems.append(
                    f"option {key!r} is not known to the smime adapter "
                    f"(known: {', '.join(sorted(_CHOICES))})"
                )
            elif str(value) not in _CHOICES[key]:
                problems.append(
                    f"option {key!r} must be one of {', '.join(_CHOICES[key])}, not {value!r}"
                )
        return problems

    # -- unwrap ------------------------------------------------------------------------------

    def unwrap(self, raw: bytes, context: UnwrapContext) -> Unwrapped:
        try:
            return self._unwrap(raw, context)
        except GatewayError:
            raise
        except Exception as error:  # never crash the worker on hostile input
            raise malformed(f"smime unwrap: {type(error).__name__}: {error}") from None

    def _unwrap(self, raw: bytes, context: UnwrapContext) -> Unwrapped:
        trust = trust_cache(context.trust, context.directory)
        peeled = peel(raw, context.identity, directory_index(context.directory))
        content_entity = parse_entity(peeled.content)
        from_address = address_of(content_entity.get("from"))
        date_header = content_entity.get("date")
        # Which signature speaks for the message. Only a signed layer inside every encryption
        # layer covers the plaintext the destination reads; among those the outermost speaks
        # (a message re-signed by Dave is Dave's, Thunderbird's rule), inner ones are notes.
        #
        # A signed layer around an encryption layer (encrypt-then-sign) covers the ciphertext.
        # RFC 8551 §3.7: its recipient "cannot determine any relationship between the signer
        # and the unencrypted contents": anyone who sees Alice's encrypted mail can sign it
        # as their own without ever reading it. So such a signature is never a pass for the
        # content: when it verifies the verdict is neutral (signed, but not over what is
        # delivered; a network that requires signatures refuses it with a DSN saying the
        # signature covers only the encrypted content); when it does not verify, its failure
        # is the verdict, as a broken signature is evidence of tampering either way. Its
        # entity is the ciphertext only this gateway can decrypt: it is never passed on.
        #
        # Sign-encrypt-sign (RFC 2634 §1.1 triple wrapping): the inner signature is the
        # author's over the content and gives the verdict; the outer one vouches for the
        # encrypted hop and is recorded as a note only.
        verdict = Verdict.unsigned(self.method)
        notes: list[str] = []
        signed_entity: bytes | None = None
        content_layers = peeled.content_layers
        for index, layer in enumerate(content_layers):
            layer_verdict = signature_verdict(
                layer, from_address=from_address, date_header=date_header, trust=trust,
                now=context.now,
            )
            if index == 0:
                verdict = layer_verdict
                if layer_verdict.result == "pass":
                    # Passed on only when it verified: a broken signature is not forwarded
                    # to S/MIME readers as if it were the author's.
                    signed_entity = layer.entity
            else:
                notes.append(layer_note(layer, layer_verdict))
        for index, layer in enumerate(peeled.ciphertext_layers):
            layer_verdict = signature_verdict(
                layer, from_address=from_address, date_header=date_header, trust=trust,
                now=context.now,
            )
            notes.append(layer_note(layer, layer_verdict, covers_content=False))
            if index == 0 and not content_layers:
                verdict = over_ciphertext(layer_verdict)
        for opened in peeled.decrypted:
            notes.append(f"decrypted {opened.content_algorithm} with {opened.key_algorithm}")
        identity = context.identity
        keys: tuple[str, ...] = ()
        if peeled.decrypted and identity is not None and identity.certificate is not None:
            keys = (fingerprint(identity.certificate),)
        return Unwrapped(
            content=peeled.content,
            signature=verdict,
            source_format=self.name,
            encrypted=bool(peeled.decrypted),
            decryption_keys=keys,
            signed_entity=signed_entity,
            notes=tuple(notes),
        )

    # -- wrap --------------------------------------------------------------------------------

    def wrap(self, message: Unwrapped, context: WrapContext) -> Wrapped:
        try:
            return self._wrap(message, context)
        except GatewayError:
            raise
        except Exception as error:
            raise PermanentFailure(
                "The message could not be prepared for the S/MIME network; its MIME "
                "structure could not be read",
                enhanced="5.6.0", reason=Reason.MALFORMED,
                detail=f"smime wrap: {type(error).__name__}: {error}",
            ) from None

    def _recipient_certificate(
        self, address: str, context: WrapContext
    ) -> tuple[x509.Certificate | None, str, bool]:
        """The newest valid certificate for `address`, or None, why, and whether the only
        obstacle is a revocation status the configured CRLs cannot tell now."""
        candidates = directory_index(context.directory).for_address(address)
        if not candidates:
            return None, "no certificate in the directory", False
        trust = trust_cache(context.trust, context.directory)
        valid: list[x509.Certificate] = []
        problems: list[str] = []
        unknown = False
        for certificate in candidates:
            try:
                check_certificate(certificate, purpose="encrypt", cache=trust, now=context.now)
            except TrustProblem as problem:
                problems.append(problem.phrase)
                # Revocation is checked last: a certificate refused for it is good otherwise.
                unknown = unknown or problem.reason is Reason.REVOCATION_UNKNOWN
                continue
            valid.append(certificate)
        if not valid:
            return None, "; ".join(sorted(set(problems))), unknown
        newest = max(valid, key=lambda c: (c.not_valid_before_utc, c.not_valid_after_utc))
        return newest, "", False

    def _wrap(self, message: Unwrapped, context: WrapContext) -> Wrapped:
        options = _Options.of(context.options)
        identity = context.identity
        if identity is None or identity.certificate is None or identity.private_key is None:
            raise PermanentFailure(
                "The gateway has no S/MIME identity configured for this network",
                enhanced="5.3.5", reason=Reason.WRAP_FAILED,
                detail=f"network {context.network}: identity with certificate and key required",
            )
        refused: dict[str, GatewayError] = {}
        chosen: dict[str, x509.Certificate] = {}
        for address in context.recipients:
            certificate, why, revocation_unknown_only = self._recipient_certificate(
                address, context
            )
            if certificate is not None:
                chosen[address] = certificate
            elif revocation_unknown_only:
                # A stale or badly signed CRL is the operator's to fix, not the recipient's:
                # this recipient waits (never plaintext, never a bounce before the give-up
                # time) and is judged again at the next attempt; the others go now.
                refused[address] = revocation_unknown(f"{address}: {why}")
            else:
                refused[address] = PermanentFailure(
                    f"No valid S/MIME certificate is known for {address}; ask the recipient "
                    "for their certificate or add it to the directory",
                    enhanced="5.7.1", reason=Reason.NO_RECIPIENT_KEY,
                    detail=f"{address}: {why}",
                )
        signer_key = fingerprint(identity.certificate)
        if not chosen:
            return Wrapped(content=b"", refused=refused, signer_key=signer_key)

        content = parse_entity(message.content)
        if message.source_format == self.name and message.signed_entity:
            # Keep the author's signature: their signed entity goes inside, under the
            # message's header fields, and the gateway signs around it.
            header = b"".join(
                raw for name, raw in field_blocks(content.head) if not name.startswith("content-")
            )
            to_sign = seven_bit(header + message.signed_entity)
        else:
            to_sign = seven_bit(message.content)
        signed_entity = self._sign(to_sign, identity.certificate, identity.private_key,
                                   identity.chain, options, context)
        unique = list({fingerprint(c): c for c in chosen.values()}.values())
        envelope = encrypt_content(
            signed_entity, unique, random=context.random,
            content_encryption=cast(ContentEncryption, options.content_encryption),
            key_transport=cast(KeyTransport, options.key_transport),
        )
        smime_type = (
            b"authEnveloped-data" if options.content_encryption == "aes-256-gcm"
            else b"enveloped-data"
        )
        # Joined once: a MiB message is not copied again for each piece added to it.
        outer = b"".join([
            *(_crlf_line(raw) for name, raw in field_blocks(content.head)
              if name in _ROUTING_FIELDS),
            b"MIME-Version: 1.0\r\n"
            b"Content-Type: application/pkcs7-mime; smime-type=", smime_type,
            b"; name=smime.p7m\r\n"
            b"Content-Transfer-Encoding: base64\r\n"
            b"Content-Disposition: attachment; filename=smime.p7m\r\n"
            b"\r\n", base64_lines(envelope),
        ])
        return Wrapped(
            content=outer,
            refused=refused,
            recipient_keys={address: fingerprint(c) for address, c in chosen.items()},
            signer_key=signer_key,
        )

    def _sign(
        self, to_sign: bytes, certificate: x509.Certificate, private_key: object,
        chain: tuple[x509.Certificate, ...], options: _Options, context: WrapContext,
    ) -> bytes:
        from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

        padding_choice = cast(SignaturePadding, options.signature_padding)
        if options.signature == "opaque":
            der, _ = sign_content(
                to_sign, certificate, cast(PrivateKeyTypes, private_key), chain=chain,
                now=context.now, detached=False, signature_padding=padding_choice,
            )
            return b"".join([
                b"Content-Type: application/pkcs7-mime; smime-type=signed-data; "
                b"name=smime.p7m\r\n"
                b"Content-Transfer-Encoding: base64\r\n"
                b"Content-Disposition: attachment; filename=smime.p7m\r\n"
                b"\r\n", base64_lines(der),
            ])
        der, micalg = sign_content(
            to_sign, certificate, cast(PrivateKeyTypes, private_key), chain=chain,
            now=context.now, detached=True, signature_padding=padding_choice,
        )
        boundary = b"----=_smime_" + context.random(12).hex().encode("ascii")
        while boundary in to_sign:
            boundary = b"----=_smime_" + context.random(12).hex().encode("ascii")
        return b"".join([
            b"Content-Type: multipart/signed; protocol=\"application/pkcs7-signature\"; "
            b"micalg=", micalg.encode("ascii"), b"; boundary=\"", boundary, b"\"\r\n"
            b"\r\n"
            b"This is an S/MIME signed message.\r\n"
            b"--", boundary, b"\r\n",
            to_sign, b"\r\n"
            b"--", boundary, b"\r\n"
            b"Content-Type: application/pkcs7-signature; name=smime.p7s\r\n"
            b"Content-Transfer-Encoding: base64\r\n"
            b"Content-Disposition: attachment; filename=smime.p7s\r\n"
            b"\r\n", base64_lines(der),
            b"--", boundary, b"--\r\n",
        ])
