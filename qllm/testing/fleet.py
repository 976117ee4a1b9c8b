"""A router and N workers in this process, on free ports, driven from sync code through a background loop.

Predictor and kvmanager are left out (the router tolerates their absence); the services authenticate each
other with an internal token in a file, as deployed ones do.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import tempfile
import threading
from dataclasses import dataclass, field
from typing import Any

import grpc
import structlog
import torch
from grpc_health.v1 import health_pb2_grpc

from qllm import internal_auth, serving
from qllm.v1 import router_pb2, router_pb2_grpc, worker_pb2_grpc
from router import server as router_server
from router.namespaces import client_id_of
from worker import server as worker_server
from worker.engine import EngineConfig
from worker.model_loader import load_model

# The workers' engines share this process's cores with the router, the clients and the loop thread: one
# intra-op thread each keeps a step from starving the rest.
torch.set_num_threads(1)

LS, BE = 1, 2  # qllm.v1 Priority values
HOST = "127.0.0.1"


@dataclass
class WorkerHandle:
    service: serving.Service
    engine: Any
    server: grpc.aio.Server | None
    port: int
    stub: worker_pb2_grpc.WorkerStub | None = None
    channel: grpc.aio.Channel | None = None

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"


class Fleet:
    """Router + N workers in this process, on free ports. Start and stop on the loop that will use them."""

    def __init__(self, workers: int = 2, engine: dict | None = None, **router_overrides):
        self.n_workers = workers
        self.engine_kwargs = {"kv_budget_tokens": 8192, **(engine or {})}
        self._token_dir = tempfile.mkdtemp(prefix="qllm-fleet-")
        token_file = os.path.join(self._token_dir, "internal-token")
        internal_auth.write_token_file(token_file)
        self.internal_token = internal_auth.InternalToken.from_file(token_file)
        self.router_overrides = {"predictor": "", "kvmanager": "", "internal_token_file": token_file,
                                 **router_overrides}
        self.workers: list[WorkerHandle] = []

    async def start_worker(self, port: int = 0) -> WorkerHandle:
        service, engine = worker_server.build_service(load_model(None), EngineConfig(**self.engine_kwargs),
                                                      internal_token=self.internal_token)
        server, bound = await serving.start(service, HOST, port)
        handle = WorkerHandle(service, engine, server, bound)
        handle.channel = grpc.aio.insecure_channel(handle.address,
                                                   interceptors=internal_auth.client_interceptors(self.internal_token))
        handle.stub = worker_pb2_grpc.WorkerStub(handle.channel)
        return handle

    async def start(self) -> "Fleet":
        for _ in range(self.n_workers):
            self.workers.append(await self.start_worker())
        self.router_service, self.servicer = await router_server.build(router_server.default_args(
            workers=",".join(w.address for w in self.workers), **self.router_overrides))
        self.router_server, self.router_port = await serving.start(self.router_service, HOST, 0)
        self.channel = grpc.aio.insecure_channel(f"{HOST}:{self.router_port}", options=serving.GRPC_OPTIONS)
        self.router = router_pb2_grpc.RouterStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)
        # Serve once every worker is connected (the router itself starts with the first).
        for client in self.core.workers:
            await client.wait_connected(30.0)
        return self

    @property
    def core(self):
        return self.servicer.core

    def jobs(self) -> dict:
        """The router's dispatched jobs by the client's request id (the router keys them by its own ids)."""
        return {client_id_of(rid): job for rid, job in list(self.core.jobs.items())}

    async def kill_worker(self, i: int, grace_s: float = 0.0) -> None:
        """Stops worker i as SIGTERM would, with the given grace (0: its streams are cut at once)."""
        w = self.workers[i]
        w.service.grace_s = grace_s
        if w.server is not None:
            await serving.stop(w.service, w.server)
            w.server = None

    async def stop(self) -> None:
        await self.channel.close()
        if self.router_server is not None:
            self.router_service.grace_s = 0
            await serving.stop(self.router_service, self.router_server)
            self.router_server = None
        for i, w in enumerate(self.workers):
            await self.kill_worker(i)
            await w.channel.close()
        shutil.rmtree(self._token_dir, ignore_errors=True)


class LoopThread:
    """An event loop in a background thread: sync code (tests, hypothesis) runs coroutines on it."""

    def __enter__(self) -> "LoopThread":
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="fleet-loop", daemon=True)
        self.thread.start()
        return self

    def run(self, coro, timeout: float | None = 300.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def __exit__(self, *exc) -> None:
        async def cancel_rest():
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        try:
            self.run(cancel_rest(), 30)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(30)
            self.loop.close()


@contextlib.contextmanager
def quiet_logs(level: int = logging.WARNING):
    """structlog at `level` and above only (thousands of requests would otherwise log a line each);
    the previous configuration is restored afterwards."""
    old = structlog.get_config()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(level),
                        cache_logger_on_first_use=False)
    try:
        yield
    finally:
        structlog.configure(**old)


def counter(c) -> float:
    """A prometheus_client Counter's current value."""
    return c._value.get()


@dataclass
class StreamRecord:
    rid: str
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    finished: bool = False
    finish_reason: str = ""
    completion_tokens: int = 0
    code: str | None = None  # gRPC status name when the stream ended with an error
    details: str = ""


async def run_stream(stub, record: StreamRecord, timeout: float = 120.0, **fields) -> StreamRecord:
    """Streams one Generate call into `record`; an error status ends up in record.code, not raised."""
    try:
        async for m in stub.Generate(router_pb2.GenerateRequest(request_id=record.rid, **fields), timeout=timeout):
            record.tokens.extend(m.token_ids)
            record.text += m.text
            if m.finished:
                record.finished = True
                record.finish_reason = m.finish_reason
                record.completion_tokens = m.completion_tokens
    except grpc.aio.AioRpcError as exc:
        record.code, record.details = exc.code().name, exc.details()
    return record


def error_counts(records) -> dict[str, int]:
    """Status name -> how many of the records ended with it."""
    errors: dict[str, int] = {}
    for r in records:
        if r.code is not None:
            errors[r.code] = errors.get(r.code, 0) + 1
    return errors
