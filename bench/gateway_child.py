"""`python -m bench.gateway_child routing.yaml STATS`: the gateway as `gateway serve` runs it,
plus its spool counters written to STATS (JSON) on SIGUSR1, for the group-commit figures.
SIGTERM drains and exits, as `gateway serve` does."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import signal
import sys
from pathlib import Path

from gateway.server import Gateway


async def main(config: Path, stats: Path) -> None:
    gateway = Gateway(config)
    await gateway.start()
    loop = asyncio.get_running_loop()

    def dump() -> None:
        counters = {f.name: getattr(gateway.spool.stats, f.name)
                    for f in dataclasses.fields(gateway.spool.stats) if not f.name.startswith("_")}
        stats.write_text(json.dumps(counters))

    loop.add_signal_handler(signal.SIGUSR1, dump)
    loop.add_signal_handler(signal.SIGTERM, lambda: asyncio.ensure_future(gateway.stop(5)))
    dump()
    await gateway.wait()


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1]), Path(sys.argv[2])))
