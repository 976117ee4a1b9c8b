"""Where the kvmanager's tool-duration predictions and recompute costs come from.

`LocalEstimator` (pure) answers from an in-process qllm.estimators tool-duration model and the default latency
model. `PredictorEstimator` asks the predictor service (`PredictToolDuration`, which also prices the
recompute with the predictor's live latency model) under a short deadline, and falls back to its local
estimator when the predictor is unset, down or late: a turn always gets a decision, never an error (after a
failure the local model answers alone for `retry_after_s`, so a slow predictor does not cost every turn its
deadline). Every observation goes to both (to the predictor in the background), so the local model is warm
when needed; of two answers the better informed one (more observations of the tool, then of all tools) gives the
distribution, and the predictor's recompute time is used whenever it answered.
"""

from __future__ import annotations

import asyncio
import math
import time
from typing import Sequence

import grpc

from kvmanager.manager import Estimate
from kvmanager.ttl import DurationQuantiles
from qllm import tls
from qllm.estimators.latency_model import LatencyModel
from qllm.estimators.tool_durations import DEFAULT_LEVELS, ToolDurationModel
from qllm.logs import get_logger
from qllm.reachability import Reachability
from qllm.v1 import predictor_pb2, predictor_pb2_grpc

log = get_logger(__name__)

# For turns that are never pinned (the last one): nothing to predict.
NOT_NEEDED = Estimate(DurationQuantiles((0.5,), (0.0,), 0.0), 0.0, "none")


def _quantiles(levels, values, mean_s, samples, prior, observed_mean_s) -> DurationQuantiles:
    ordered, last = [], 0.0
    for v in values:  # non-decreasing whatever the rounding of the answer
        last = max(last, float(v))
        ordered.append(last)
    return DurationQuantiles(tuple(float(q) for q in levels), tuple(ordered), float(mean_s), int(samples),
                             bool(prior), float(observed_mean_s))


class LocalEstimator:
    def __init__(self, model: ToolDurationModel | None = None, latency: LatencyModel | None = None,
                 levels: tuple[float, ...] = DEFAULT_LEVELS):
        self.model = model if model is not None else ToolDurationModel()
        self.latency = latency if latency is not None else LatencyModel()
        self.levels = levels

    def observe(self, tool: str, duration_s: float) -> None:
        self.model.observe(tool, duration_s)

    def estimate(self, tool: str, context_tokens: int) -> Estimate:
        d = self.model.predict(tool)
        return Estimate(_quantiles(self.levels, d.quantiles(self.levels), d.mean(), d.samples, d.prior,
                                   d.observed_mean_s), self.latency.prefill_s(context_tokens), "local")

    def informed(self, tool: str) -> tuple[int, int]:
        return self.model.count(tool) if tool else 0, self.model.pooled_count


class PredictorEstimator:
    def __init__(self, address: str | None, local: LocalEstimator | None = None, deadline_s: float = 0.05,
                 credentials: grpc.ChannelCredentials | None = None, max_pending: int = 256,
                 retry_after_s: float = 2.0, clock=time.monotonic, interceptors: Sequence[object] = ()):
        self.address = address or None
        self.local = local if local is not None else LocalEstimator()
        self.deadline_s = deadline_s
        self.credentials = credentials
        self.interceptors = interceptors  # the internal token (qllm/internal_auth.py)
        # Opened on first use: a grpc.aio channel belongs to the event loop it is made on, and the service is
        # built before `qllm kvmanager` starts its loop.
        self.channel: grpc.aio.Channel | None = None
        self._stub: predictor_pb2_grpc.PredictorStub | None = None
        self.max_pending = max_pending
        self._reachability = Reachability(log, "predictor", self.address, "tool durations from the local model")
        self.retry_after_s = retry_after_s  # after a failed prediction, answer locally this long
        self.clock = clock
        self._skip_until = -math.inf
        self.fallbacks = 0  # estimates answered locally because the predictor failed
        self._pending: list[predictor_pb2.ToolCall] = []
        self._flushing: asyncio.Task | None = None

    @property
    def stub(self) -> predictor_pb2_grpc.PredictorStub | None:
        if self._stub is None and self.address:
            self.channel = tls.open_channel(self.address, self.credentials, interceptors=self.interceptors)
            self._stub = predictor_pb2_grpc.PredictorStub(self.channel)
        return self._stub

    @property
    def down(self) -> bool:
        return self._reachability.down

    def _mark(self, ok: bool, error: grpc.aio.AioRpcError | None = None) -> None:
        self._reachability.mark(ok, error)

    def observe(self, tool: str, duration_s: float) -> None:
        """Learns locally now; the predictor gets it in the background (batched while a report is in flight;
        dropped, not queued without bound, while it is unreachable)."""
        self.local.observe(tool, duration_s)
        if self.stub is None:
            return
        if len(self._pending) < self.max_pending:
            self._pending.append(predictor_pb2.ToolCall(tool_name=tool, duration_s=duration_s))
        if self._flushing is None or self._flushing.done():
            self._flushing = asyncio.get_running_loop().create_task(self._flush())

    async def _flush(self) -> None:
        while self._pending:
            calls, self._pending = self._pending, []
            try:
                await self.stub.ObserveToolCalls(predictor_pb2.ToolCallReport(calls=calls),
                                                 timeout=max(self.deadline_s, 0.5))
            except grpc.aio.AioRpcError as exc:
                self._mark(False, exc)
                return
            self._mark(True)

    async def estimate(self, tool: str, context_tokens: int) -> Estimate:
        if self.stub is None:
            return self.local.estimate(tool, context_tokens)
        if self.clock() < self._skip_until:  # a predictor that just failed is not waited for on every turn
            self.fallbacks += 1
            return self.local.estimate(tool, context_tokens)
        try:
            reply = await self.stub.PredictToolDuration(predictor_pb2.ToolDurationRequest(
                tool_name=tool, quantiles=self.local.levels, context_tokens=context_tokens), timeout=self.deadline_s)
        except grpc.aio.AioRpcError as exc:
            self._mark(False, exc)
            self._skip_until = self.clock() + self.retry_after_s
            self.fallbacks += 1
            return self.local.estimate(tool, context_tokens)
        self._mark(True)
        if (reply.samples, reply.pooled_samples) < self.local.informed(tool):
            return Estimate(self.local.estimate(tool, 0).durations, reply.recompute_s, "local")
        durations = _quantiles(reply.quantiles, reply.durations_s, reply.mean_s, reply.samples, reply.prior,
                               reply.observed_mean_s)
        return Estimate(durations, reply.recompute_s, "predictor")

    async def close(self) -> None:
        if self._flushing is not None and not self._flushing.done():
            self._flushing.cancel()
        if self.channel is not None:
            await self.channel.close()
