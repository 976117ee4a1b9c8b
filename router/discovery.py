"""Which workers the router talks to: a static list, or DNS names that resolve to many (`dns:///NAME:PORT`,
e.g. a Kubernetes headless Service), re-resolved periodically.

A worker that appears is connected and used; one that leaves the answer is no longer given new work and
is closed once what it runs is done (a broken stream re-queues its requests through RouterCore). A worker
that comes back under the same address is used again.
"""

from __future__ import annotations

import asyncio
from typing import Callable

from qllm.logs import get_logger
from qllm.targets import DNS_PREFIX, Targets, split_target  # noqa: F401 - split_target re-exported
from router.core import RouterCore
from router.worker_client import WorkerClient

log = get_logger(__name__)


class WorkerDiscovery:
    def __init__(self, core: RouterCore, targets: list[str], make_client: Callable[[str], WorkerClient],
                 interval_s: float = 5.0):
        self.core = core
        self.targets = Targets(targets)
        self.static, self.dns = self.targets.static, self.targets.dns
        self.make_client = make_client
        self.interval_s = interval_s
        self.clients: dict[str, WorkerClient] = {}
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        await self.refresh()
        if self.dns:
            self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
        for client in list(self.clients.values()):
            await client.close()
        self.clients.clear()

    async def resolve(self) -> set[str]:
        return await self.targets.resolve(self.clients)

    async def refresh(self) -> None:
        wanted = await self.resolve()
        for address in sorted(wanted - set(self.clients)):
            client = self.make_client(address)
            self.clients[address] = client
            self.core.add_worker(client)
            client.start()
            log.info("worker added", worker=address)
        for address in sorted(set(self.clients) - wanted):
            client = self.clients.pop(address)
            self.core.remove_worker(client)
            asyncio.create_task(self._retire(client))
            log.info("worker removed", worker=address)

    async def _retire(self, client: WorkerClient) -> None:
        while client.in_flight:
            await asyncio.sleep(0.5)
        await client.close()

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.refresh()
            except Exception:  # discovery must never take the router down
                log.exception("worker discovery failed")
