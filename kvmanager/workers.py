"""The kvmanager's calls to workers: SetPin, ReleasePins and Describe at the address the router reported, when it
is one of the workers the kvmanager knows from its own configuration (`KnownWorkers`).

One cached channel per worker (the least recently used closed past `max_workers`), a short deadline per
call. Pins are advice: a failed call is logged (once per worker until it answers again) and answered as
None, never raised; the worker's own clock expires its pins and it evicts them for LS requests anyway.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import OrderedDict
from typing import Sequence

import grpc

from qllm import tls
from qllm.logs import get_logger
from qllm.targets import Targets
from qllm.v1 import worker_pb2, worker_pb2_grpc

log = get_logger(__name__)


class WorkerPins:
    def __init__(self, deadline_s: float = 0.5, credentials: grpc.ChannelCredentials | None = None,
                 max_workers: int = 1024, interceptors: Sequence[object] = ()):
        self.deadline_s = deadline_s
        self.credentials = credentials
        self.interceptors = interceptors  # the internal token (qllm/internal_auth.py)
        self.max_workers = max_workers
        self.failures = 0
        self._stubs: OrderedDict[str, tuple[grpc.aio.Channel, worker_pb2_grpc.WorkerStub]] = OrderedDict()
        self._down: set[str] = set()
        self._closing: set[asyncio.Task] = set()

    def _stub(self, address: str) -> worker_pb2_grpc.WorkerStub:
        hit = self._stubs.get(address)
        if hit is not None:
            self._stubs.move_to_end(address)
            return hit[1]
        channel = tls.open_channel(address, self.credentials, interceptors=self.interceptors)
        self._stubs[address] = (channel, worker_pb2_grpc.WorkerStub(channel))
        while len(self._stubs) > self.max_workers:
            _, (old, _) = self._stubs.popitem(last=False)
            task = asyncio.get_running_loop().create_task(old.close())
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)
        return self._stubs[address][1]

    async def _call(self, address: str, rpc: str, request):
        try:
            reply = await getattr(self._stub(address), rpc)(request, timeout=self.deadline_s)
        except grpc.aio.AioRpcError as exc:
            self.failures += 1
            if address not in self._down:
                self._down.add(address)
                log.warning("worker call failed", worker=address, rpc=rpc, code=exc.code().name)
            return None
        if address in self._down:
            self._down.discard(address)
            log.info("worker reachable again", worker=address)
        return reply

    async def set_pin(self, address: str, program_id: str, ttl_s: float,
                      keep_score: float) -> worker_pb2.SetPinResponse | None:
        return await self._call(address, "SetPin", worker_pb2.SetPinRequest(
            program_id=program_id, ttl_s=ttl_s, keep_score=keep_score))

    async def release(self, address: str, program_ids: list[str]) -> worker_pb2.ReleasePinsResponse | None:
        return await self._call(address, "ReleasePins", worker_pb2.ReleasePinsRequest(program_ids=program_ids))

    async def describe(self, address: str) -> worker_pb2.WorkerInfo | None:
        return await self._call(address, "Describe", worker_pb2.DescribeRequest())

    async def close(self) -> None:
        for channel, _ in self._stubs.values():
            await channel.close()
        self._stubs.clear()


class KnownWorkers:
    """The workers this kvmanager may call: its own --workers (static, and DNS names re-resolved every
    `interval_s`), never an address taken from a request. A TurnReport naming another address is refused,
    so a caller cannot make the kvmanager connect where it likes (server-side request forgery)."""

    def __init__(self, targets: Targets, interval_s: float = 5.0, min_refresh_s: float = 1.0):
        self.targets = targets
        self.interval_s = interval_s
        self.min_refresh_s = min_refresh_s
        self.addresses: set[str] = set(targets.static)
        self._refreshed = -math.inf
        self._task: asyncio.Task | None = None

    async def knows(self, address: str) -> bool:
        """Whether `address` is one of the workers; an unknown one re-resolves the DNS names first (a worker
        the router found before our last refresh), at most once per `min_refresh_s`."""
        if address in self.addresses:
            return True
        if self.targets.dns and time.monotonic() - self._refreshed >= self.min_refresh_s:
            await self.refresh()
        return address in self.addresses

    async def refresh(self) -> None:
        self._refreshed = time.monotonic()
        self.addresses = await self.targets.resolve(self.addresses)

    async def start(self) -> None:
        await self.refresh()
        if self.targets.dns:
            self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.refresh()
            except Exception:  # noqa: BLE001 - keep the last known set
                log.exception("worker discovery failed")
