"""The gateway's TLS client contexts towards the next hop, for STARTTLS (RFC 3207), TLS 1.2 or
later.

`make_client_tls_context` builds the verifying context: the next hop's certificate is checked
against the configured trust anchors only (never the system store), and so is its host name.
The gateway always presents its own certificate as a TLS client (MSSanté operators require
it). The context carries an unverified twin with the same client certificate, which
`relay.tls: opportunistic` falls back to when verification fails (RFC 7435);
`unverified_context` is the same without a client certificate, for an opportunistic relay
when the gateway has no TLS client configuration at all.

Input read: the trust anchors (PEM, or a single DER certificate) and the gateway's certificate
and key, all named by the operator's configuration; nothing from the network.
"""

from __future__ import annotations

import ssl
from collections.abc import Sequence
from pathlib import Path
from typing import TypeVar

from cryptography import x509
from cryptography.hazmat.primitives import serialization

__all__ = ["ClientTlsContext", "make_client_tls_context", "unverified_context"]


class ClientTlsContext(ssl.SSLContext):
    """The verifying client context, carrying an unverified twin with the same client
    certificate for the `opportunistic` fallback (an SSLContext cannot be copied)."""

    unverified: ssl.SSLContext | None = None


def make_client_tls_context(
    anchors: Sequence[Path | x509.Certificate],
    certificate: Path | None,
    key: Path | None,
) -> ClientTlsContext:
    """A TLS 1.2+ client context that verifies the next hop against `anchors` only (not the
    system store), checks its host name, and presents the gateway's certificate when given."""
    context = _client_context(ClientTlsContext, certificate, key)
    context.verify_mode = ssl.CERT_REQUIRED
    context.check_hostname = True
    # Every configured anchor is trusted as such, including an intermediate CA (as IGC-Santé
    # operators sometimes configure), without requiring the chain to reach a self-signed root.
    context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    pem: list[str] = []
    for anchor in anchors:
        if isinstance(anchor, x509.Certificate):
            pem.append(anchor.public_bytes(serialization.Encoding.PEM).decode("ascii"))
        else:
            data = Path(anchor).read_bytes()
            if b"-----BEGIN" not in data:  # a single DER certificate
                data = x509.load_der_x509_certificate(data).public_bytes(
                    serialization.Encoding.PEM
                )
            pem.append(data.decode("ascii"))
    if pem:
        context.load_verify_locations(cadata="".join(pem))
    unverified = _client_context(ssl.SSLContext, certificate, key)
    unverified.check_hostname = False
    unverified.verify_mode = ssl.CERT_NONE
    context.unverified = unverified
    return context


def unverified_context() -> ssl.SSLContext:
    """Encryption without authentication and without a client certificate."""
    context = _client_context(ssl.SSLContext, None, None)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


_Context = TypeVar("_Context", bound=ssl.SSLContext)


def _client_context(kind: type[_Context], certificate: Path | None, key: Path | None) -> _Context:
    context = kind(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options |= ssl.OP_NO_COMPRESSION
    if certificate is not None:
        context.load_cert_chain(certificate, key)
    return context
