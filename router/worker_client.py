"""A router's connection to one worker: one long-lived bidirectional Serve stream carrying every request.

Submits and cancels are written to the stream; events coming back are routed to the request's handler by
request id. When the stream breaks, every request on it is failed with UNAVAILABLE (none is dropped
silently) and the client reconnects in the background.
"""

from __future__ import annotations

import asyncio
from typing import Callable, Sequence

import grpc

from qllm import tls
from qllm.logs import get_logger
from qllm.serving import GRPC_OPTIONS
from qllm.v1 import worker_pb2, worker_pb2_grpc

log = get_logger(__name__)

EventHandler = Callable[[worker_pb2.WorkerEvent], None]


class WorkerClient:
    def __init__(self, address: str, reconnect_s: float = 1.0, credentials: grpc.ChannelCredentials | None = None,
                 interceptors: Sequence[object] = ()):
        self.address = address
        self.reconnect_s = reconnect_s
        self.channel = tls.open_channel(address, credentials, GRPC_OPTIONS, interceptors=interceptors)
        self.stub = worker_pb2_grpc.WorkerStub(self.channel)
        self.info: worker_pb2.WorkerInfo | None = None
        self.healthy = False
        self._handlers: dict[str, EventHandler] = {}
        # Called with the ids of the requests a broken stream took down, so the router can re-queue them;
        # without it they are failed with UNAVAILABLE.
        self.on_lost: Callable[["WorkerClient", list[str]], None] | None = None
        # Called when the stream (re)opens, so work queued while no worker was up gets released.
        self.on_ready: Callable[[], None] | None = None
        self._outgoing: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None
        self._connected = asyncio.Event()
        self._refused = False  # the worker refused our internal token last time

    @property
    def in_flight(self) -> int:
        return len(self._handlers)

    def start(self) -> None:
        self._task = asyncio.create_task(self._maintain())

    async def wait_connected(self, timeout: float) -> bool:
        try:
            await asyncio.wait_for(self._connected.wait(), timeout)
        except asyncio.TimeoutError:
            return False
        return True

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
        await self.channel.close()

    async def _maintain(self) -> None:
        while True:
            try:
                self.info = await self.stub.Describe(worker_pb2.DescribeRequest(), timeout=5.0)
                outgoing: asyncio.Queue = asyncio.Queue()
                call = self.stub.Serve(self._commands(outgoing))
                self._outgoing = outgoing
                self.healthy = True
                self._connected.set()
                if self.on_ready is not None:
                    self.on_ready()
                log.info("worker connected", worker=self.address, model=self.info.model_name,
                         policy=self.info.policy)
                async for event in call:
                    handler = self._handlers.get(event.request_id)
                    if handler is not None:
                        handler(event)
                log.warning("worker stream ended", worker=self.address)
            except asyncio.CancelledError:
                self.on_lost = None  # shutting down: nothing to re-queue onto
                self._fail_all("router shutting down")
                raise
            except grpc.aio.AioRpcError as exc:
                refused = exc.code() == grpc.StatusCode.UNAUTHENTICATED
                if self.healthy or (refused and not self._refused):
                    # A refused token is a configuration error, said once rather than retried silently.
                    log.warning("worker unreachable", worker=self.address, code=exc.code().name,
                                details=exc.details() if refused else None)
                self._refused = refused
            self.healthy = False
            self._connected.clear()
            self._outgoing = None
            self._fail_all(f"worker {self.address} became unavailable")
            await asyncio.sleep(self.reconnect_s)

    @staticmethod
    async def _commands(outgoing: asyncio.Queue):
        while True:
            command = await outgoing.get()
            if command is None:
                return
            yield command

    def _fail_all(self, message: str) -> None:
        handlers, self._handlers = self._handlers, {}
        if self.on_lost is not None and handlers:
            self.on_lost(self, list(handlers))
            return
        for rid, handler in handlers.items():
            handler(worker_pb2.WorkerEvent(request_id=rid, rejected=worker_pb2.Rejection(
                code=grpc.StatusCode.UNAVAILABLE.value[0], message=message)))

    def submit(self, submit: worker_pb2.SubmitRequest, handler: EventHandler) -> None:
        if self._outgoing is None:
            raise ConnectionError(f"worker {self.address} is not connected")
        self._handlers[submit.request_id] = handler
        self._outgoing.put_nowait(worker_pb2.WorkerCommand(submit=submit))

    def done(self, request_id: str) -> None:
        self._handlers.pop(request_id, None)

    def cancel(self, request_id: str) -> None:
        if self._handlers.pop(request_id, None) is not None and self._outgoing is not None:
            self._outgoing.put_nowait(worker_pb2.WorkerCommand(cancel=worker_pb2.CancelRequest(
                request_id=request_id)))
