"""Envelope codecs, one per kind of network, behind one registry.

The pipeline finds an adapter by the `adapter:` name a network declares in routing.yaml and
never imports an adapter module directly: a new network kind is one module plus one line here.
"""

from __future__ import annotations

from adapters.apicrypt import ApicryptAdapter
from adapters.base import Adapter
from adapters.mime import MimeAdapter
from adapters.openpgp import OpenPgpAdapter
from adapters.smime import SmimeAdapter

__all__ = ["REGISTRY", "Adapter", "get"]

REGISTRY: dict[str, Adapter] = {
    adapter.name: adapter
    for adapter in (
        MimeAdapter(),
        SmimeAdapter(),
        OpenPgpAdapter(),
        ApicryptAdapter(),
    )
}


def get(name: str) -> Adapter:
    """The adapter registered under `name`; KeyError names the known ones."""
    try:
        return REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(REGISTRY))
        raise KeyError(f"unknown adapter {name!r} (known: {known})") from None
