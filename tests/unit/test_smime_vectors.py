"""smime unwrap of the stored OpenSSL vectors (tests/vectors/smime, see its README)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from adapters.base import Directory, Identity, TrustStore, UnwrapContext
from adapters.smime import SmimeAdapter

VECTORS = Path(__file__).resolve().parents[1] / "vectors" / "smime"
PART = b"Content-Type: text/plain; charset=utf-8\r\n\r\nCompte rendu de test.\r\n"


def context() -> UnwrapContext:
    anchor = x509.load_pem_x509_certificate((VECTORS / "ca.pem").read_bytes())
    gateway = x509.load_pem_x509_certificate((VECTORS / "gateway.pem").read_bytes())
    key = load_pem_private_key((VECTORS / "gateway.key").read_bytes(), password=None)
    return UnwrapContext(
        network="medecin",
        identity=Identity(name="medecin-smime", certificate=gateway, private_key=key),
        trust=TrustStore(anchors=(anchor,)), directory=Directory(),
        now=gateway.not_valid_before_utc + dt.timedelta(hours=1),
    )


@pytest.mark.parametrize(("name", "encrypted", "algorithm"), [
    ("signed-multipart.eml", False, "ecdsa-with-SHA256"),
    ("signed-opaque-ber.eml", False, "ecdsa-with-SHA384"),
    ("signed-then-aes256-oaep.eml", True, "ecdsa-with-SHA256"),
    ("signed-then-aes256-gcm.eml", True, "ecdsa-with-SHA256"),
])
def test_vector(name: str, encrypted: bool, algorithm: str) -> None:
    out = SmimeAdapter().unwrap((VECTORS / name).read_bytes(), context())
    assert out.signature.result == "pass", out.signature
    assert out.signature.signer == "alice@medecin.fr"
    assert out.signature.algorithm == algorithm
    assert out.encrypted is encrypted
    assert out.content.endswith(PART)
