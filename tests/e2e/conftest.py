from __future__ import annotations

import ssl
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest

from gateway.server import Gateway
from tests.support import testpki
from tests.support.world import World, build_world


class Running:
    def __init__(self, world: World, gateway: Gateway) -> None:
        self.world = world
        self.gateway = gateway

    async def send(
        self,
        sender: str,
        recipients: list[str],
        data: bytes,
        *,
        client: testpki.Issued | None = None,
        implicit: bool = False,
        mail_options: list[str] | None = None,
        rcpt_options: list[str] | None = None,
    ) -> tuple[dict[str, Any], str]:
        """Send through the gateway with aiosmtplib; returns (refused recipients, final reply)."""
        context: ssl.SSLContext = self.world.client_context(client)
        smtp = aiosmtplib.SMTP(
            hostname="127.0.0.1",
            port=self.world.implicit_port if implicit else self.world.port,
            use_tls=implicit,
            start_tls=not implicit,
            tls_context=context,
            timeout=20,
        )
        await smtp.connect()
        try:
            refused, reply = await smtp.sendmail(
                sender, recipients, data,
                mail_options=mail_options or [], rcpt_options=rcpt_options or [],
            )
        finally:
            await smtp.quit()
        return refused, reply


@pytest.fixture
def world_factory(tmp_path: Path) -> Callable[..., World]:
    def make(**kwargs: Any) -> World:
        return build_world(tmp_path, **kwargs)
    return make


@pytest.fixture
async def running(world_factory: Callable[..., World]) -> AsyncIterator[Running]:
    world = world_factory()
    async with start(world) as ctx:
        yield ctx


class start:
    """Start the sinks and the gateway in this event loop; stop both at exit."""

    def __init__(self, world: World, **gateway_kwargs: Any) -> None:
        self.world = world
        self.kwargs = gateway_kwargs
        self.gateway: Gateway | None = None

    async def __aenter__(self) -> Running:
        for sink in self.world.sinks.values():
            await sink.start()
        self.gateway = Gateway(self.world.config, **self.kwargs)
        await self.gateway.start()
        return Running(self.world, self.gateway)

    async def __aexit__(self, *exc: object) -> None:
        if self.gateway is not None:
            await self.gateway.stop(grace=2)
        for sink in self.world.sinks.values():
            await sink.stop()
