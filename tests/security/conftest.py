"""The security suite runs on the end-to-end harness: real SMTP and TLS on 127.0.0.1."""

from __future__ import annotations

from tests.e2e.conftest import running, world_factory

__all__ = ["running", "world_factory"]
