"""Which workers the router talks to: a static list, or DNS names that resolve to many (`dns:///NAME:PORT`,
e.g. a Kubernetes headless Service), re-resolved periodically.

A worker that appears is connected and used; one that leaves the answer is no longer given new work and
is closed once what it runs is done (a broken stream re-queues its requests through RouterCore). A worker
that comes back under the same address is used again.
"""

from __future__ import annotations

import asyncio
import socket
from typing import Callable

from qllm.logs import get_logger
from router.core import RouterCore
from router.worker_client import WorkerClient

log = get_logger(__name__)

DNS_PREFIX = "dns:///"


def split_target(target: str) -> tuple[str, int]:
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"--workers: {target!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


class WorkerDiscovery:
    def __init__(self, core: RouterCore, targets: list[str], make_client: Callable[[str], WorkerClient],
                 interval_s: float = 5.0):
        self.core = core
        self.static = [t for t in targets if not t.startswith(DNS_PREFIX)]
        self.dns = [split_target(t[len(DNS_PREFIX):]) for t in targets if t.startswith(DNS_PREFIX)]
        for t in self.static:
            split_target(t)
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
        addresses = set(self.static)
        loop = asyncio.get_running_loop()
        for host, port in self.dns:
            try:
                infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            except OSError as exc:
                log.warning("worker name did not resolve; keeping the workers known", name=host, error=str(exc))
                addresses |= {a for a in self.clients if a not in self.static}
                continue
            for family, _, _, _, sockaddr in infos:
                ip = sockaddr[0]
                addresses.add(f"[{ip}]:{port}" if family == socket.AF_INET6 else f"{ip}:{port}")
        return addresses

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
