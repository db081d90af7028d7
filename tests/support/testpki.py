"""The test PKI: the same generator `gateway demo` uses (gateway.pkigen)."""

from gateway.pkigen import *  # noqa: F403
from gateway.pkigen import NOW, IgcSante, Issued, crl_pem, name, new_key, root

__all__ = ["NOW", "IgcSante", "Issued", "crl_pem", "name", "new_key", "root"]
