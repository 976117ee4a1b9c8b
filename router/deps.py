"""Clients for the router's advisory dependencies: the predictor and the kvmanager.

Both are optional for correctness: when one is down or slower than its deadline the router carries on
(arrival order, no pins) and says so once in the log, not once per request.
"""

from __future__ import annotations

from typing import Sequence

import grpc

from qllm import tls
from qllm.logs import get_logger
from qllm.reachability import Reachability
from qllm.v1 import kvmanager_pb2, kvmanager_pb2_grpc, predictor_pb2, predictor_pb2_grpc
from router import metrics

log = get_logger(__name__)


class _Dependency:
    name = "dependency"

    def __init__(self, address: str | None, deadline_s: float, credentials: grpc.ChannelCredentials | None = None,
                 interceptors: Sequence[object] = ()):
        self.address = address
        self.deadline_s = deadline_s
        self.channel = tls.open_channel(address, credentials, interceptors=interceptors) if address else None
        self._reachability = Reachability(log, self.name, address, "continuing without it",
                                          lambda ok: metrics.DEPENDENCY_DOWN.labels(self.name).set(0 if ok else 1))

    def _mark(self, ok: bool, error: grpc.aio.AioRpcError | None = None) -> None:
        self._reachability.mark(ok, error)

    async def close(self) -> None:
        if self.channel is not None:
            await self.channel.close()


class PredictorClient(_Dependency):
    name = "predictor"

    def __init__(self, address: str | None, deadline_s: float = 0.3, credentials=None, interceptors=()):
        super().__init__(address, deadline_s, credentials, interceptors)
        self.stub = predictor_pb2_grpc.PredictorStub(self.channel) if self.channel else None

    async def rank(self, prompts: list[str]) -> list[float] | None:
        if self.stub is None:
            return None
        try:
            reply = await self.stub.RankLengths(predictor_pb2.RankRequest(prompts=prompts), timeout=self.deadline_s)
        except grpc.aio.AioRpcError as exc:
            self._mark(False, exc)
            return None
        self._mark(True)
        return list(reply.scores)


    async def estimate(self, prompt: str, max_tokens: int) -> predictor_pb2.Estimate | None:
        """ALISE's estimate of a request: predicted output tokens and execution seconds (from the predicted
        length and the latency model the workers keep measured)."""
        if self.stub is None:
            return None
        try:
            reply = await self.stub.EstimateTime(predictor_pb2.EstimateRequest(
                items=[predictor_pb2.EstimateItem(prompt=prompt, max_tokens=max_tokens)]), timeout=self.deadline_s)
        except grpc.aio.AioRpcError as exc:
            self._mark(False, exc)
            return None
        self._mark(True)
        return reply.estimates[0] if reply.estimates else None


class KVManagerClient(_Dependency):
    name = "kvmanager"

    def __init__(self, address: str | None, deadline_s: float = 0.2, credentials=None, interceptors=()):
        super().__init__(address, deadline_s, credentials, interceptors)
        self.stub = kvmanager_pb2_grpc.KVManagerStub(self.channel) if self.channel else None

    async def report_turn(self, report: kvmanager_pb2.TurnReport) -> kvmanager_pb2.PinDecision | None:
        if self.stub is None:
            return None
        try:
            decision = await self.stub.ReportTurn(report, timeout=self.deadline_s)
        except grpc.aio.AioRpcError as exc:
            self._mark(False, exc)
            return None
        self._mark(True)
        return decision
