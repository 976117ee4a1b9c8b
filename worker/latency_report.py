"""Sends the engine's measured step times to the predictor, whose latency model (prefill seconds vs tokens,
decode step seconds vs batch size) prices execution-time estimates (ALISE's speculative order) and the
kvmanager's recompute costs.

The first report carries the warm-up's steps: the start-up profile of this worker on this machine; after
that, every `interval_s`, what the engine measured since (decode-only steps and pure prefill steps; steps
that mix both are left out as they cannot be split). Advice only: a predictor that is down costs a log
line, never a request; samples are dropped, not queued without bound, while it is unreachable.
"""

from __future__ import annotations

import asyncio
import collections
from typing import Sequence

import grpc

from qllm import tls
from qllm.logs import get_logger
from qllm.reachability import Reachability
from qllm.v1 import predictor_pb2, predictor_pb2_grpc

log = get_logger(__name__)

MAX_SAMPLES_PER_REPORT = 512


class LatencyReporter:
    def __init__(self, address: str, worker: str, samples: collections.deque, interval_s: float = 2.0,
                 deadline_s: float = 1.0, credentials: grpc.ChannelCredentials | None = None,
                 interceptors: Sequence[object] = ()):
        self.address = address
        self.worker = worker
        self.samples = samples
        self.interval_s = interval_s
        self.deadline_s = deadline_s
        self.credentials = credentials
        self.interceptors = interceptors  # the internal token (qllm/internal_auth.py)
        self.sent = 0
        self._reachability = Reachability(log, "predictor", address, "latency samples dropped")
        self._channel: grpc.aio.Channel | None = None
        self._task: asyncio.Task | None = None

    @property
    def down(self) -> bool:
        return self._reachability.down

    def open(self) -> None:
        # The channel belongs to the loop it is opened on: open it on the serving loop, not at build time.
        self._channel = tls.open_channel(self.address, self.credentials, interceptors=self.interceptors)
        self._stub = predictor_pb2_grpc.PredictorStub(self._channel)

    def start(self) -> None:
        self.open()
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        if self._channel is not None:
            await self._channel.close()

    async def _run(self) -> None:
        while True:
            await self.report_once()
            await asyncio.sleep(self.interval_s)

    async def report_once(self) -> int:
        """Sends what was measured since the last report; returns how many samples went."""
        batch = []
        while self.samples and len(batch) < MAX_SAMPLES_PER_REPORT:
            prefill_tokens, prefill_s, batch_size, step_s = self.samples.popleft()
            batch.append(predictor_pb2.LatencySample(prefill_tokens=prefill_tokens, prefill_s=prefill_s,
                                                     decode_batch_size=batch_size, decode_step_s=step_s))
        if not batch:
            return 0
        try:
            await self._stub.ReportLatency(predictor_pb2.LatencyReport(worker=self.worker, samples=batch),
                                           timeout=self.deadline_s)
        except grpc.aio.AioRpcError as exc:
            self._reachability.mark(False, exc)
            return 0
        self._reachability.mark(True)
        self.sent += len(batch)
        return len(batch)
