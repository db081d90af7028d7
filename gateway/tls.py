"""TLS contexts for the SMTP listeners (RFC 3207 STARTTLS, RFC 8314 implicit TLS).

The gateway verifies client certificates against the configured trust anchors only, never the
system store: in the MSSanté trust space that is IGC-Santé, and a certificate from a public CA
must not authenticate a peer.
"""

from __future__ import annotations

import ssl
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.x509 import Certificate

__all__ = ["server_context"]


def server_context(
    certificate: Path,
    key: Path,
    anchors: tuple[Certificate, ...],
    client_certificate: str,
) -> ssl.SSLContext:
    """A server context: TLS 1.2+, our certificate chain, and client certificates as
    `client_certificate` says (none | optional | required), verified against `anchors`."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(certificate, key)
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    if client_certificate != "none" and anchors:
        cadata = "".join(
            a.public_bytes(serialization.Encoding.PEM).decode("ascii") for a in anchors
        )
        context.load_verify_locations(cadata=cadata)
        context.verify_mode = (
            ssl.CERT_REQUIRED if client_certificate == "required" else ssl.CERT_OPTIONAL
        )
    else:
        context.verify_mode = ssl.CERT_NONE
    return context
