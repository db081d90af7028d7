"""Metrics, health and the audit trail of real traffic (docker-compose: tests/unit/test_deployment.py)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable

from gateway import audit
from tests.e2e.conftest import start
from tests.support.world import World, free_port, message


async def http_get(port: int, path: str) -> tuple[int, str]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    data = (await asyncio.wait_for(reader.read(), 10)).decode()
    writer.close()
    status = int(data.split(" ", 2)[1])
    return status, data.split("\r\n\r\n", 1)[1]


async def test_metrics_health_and_audit_of_one_delivery_and_one_refusal(
    world_factory: Callable[..., World],
) -> None:
    port = free_port()

    def with_metrics(text: str) -> str:
        return text.replace("  audit: {path: var/audit}",
                            f"  audit: {{path: var/audit}}\n  metrics: {{address: 127.0.0.1, "
                            f"port: {port}}}")

    world = world_factory(edit=with_metrics)
    async with start(world) as running:
        status, body = await http_get(port, "/healthz")
        assert status == 200 and body.strip() == "ready"
        subject = "DUPONT Jean 01/02/1950"
        await running.send("a@clinique-test.fr", ["b@chu-test.fr"],
                           message("a@clinique-test.fr", "b@chu-test.fr", subject=subject))
        await world.sinks["hospital"].wait()
        refused, _ = await running.send(
            "a@clinique-test.fr", ["b@chu-test.fr", "x@labo-test.fr"],
            message("a@clinique-test.fr", "b@chu-test.fr"))
        assert "x@labo-test.fr" in refused
        await world.sinks["hospital"].wait(2)
        await asyncio.sleep(0.3)
        status, body = await http_get(port, "/metrics")
        assert status == 200
        assert 'gateway_messages_received_total{network="clinic"} 2.0' in body
        assert 'gateway_messages_delivered_total{route="clinic->hospital"} 2.0' in body
        assert 'gateway_messages_failed_total{reason="route_denied"' in body
        for name in ("gateway_queue_messages", "gateway_process_seconds_bucket",
                     "gateway_signature_verifications_total"):
            assert name in body
        assert (await http_get(port, "/nope"))[0] == 404

    folder = world.root / "var" / "audit"
    count, broken = audit.verify(folder)
    assert broken is None and count > 0
    text = "".join(p.read_text() for p in folder.iterdir())
    assert "DUPONT" not in text and "Bonjour" not in text  # never the subject, never content
    events = [json.loads(line)["event"] for line in text.splitlines()]
    for event in ("start", "received", "unwrapped", "wrapped", "delivered", "rejected", "stop"):
        assert event in events, event

