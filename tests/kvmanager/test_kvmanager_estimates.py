"""kvmanager.estimates against a real predictor service and a slow fake one."""

import asyncio

import grpc
import pytest

from kvmanager.estimates import LocalEstimator, PredictorEstimator
from predictor.ranker import HeuristicRanker
from predictor.server import build_service as build_predictor
from qllm import serving
from qllm.v1 import predictor_pb2, predictor_pb2_grpc


class SlowPredictor(predictor_pb2_grpc.PredictorServicer):
    def __init__(self):
        self.calls = 0

    async def PredictToolDuration(self, request, context):
        self.calls += 1
        await asyncio.sleep(1.0)
        return predictor_pb2.ToolDurationPrediction()


class Clock:
    now = 0.0

    def __call__(self):
        return self.now


async def test_predictor_answers_and_learns_what_the_kvmanager_observes():
    service = build_predictor(HeuristicRanker())
    server, port = await serving.start(service, "127.0.0.1", 0)
    est = PredictorEstimator(f"127.0.0.1:{port}", deadline_s=2.0)
    try:
        for _ in range(20):
            est.observe("pytest", 8.0)
        while est._flushing is not None and not est._flushing.done():
            await asyncio.sleep(0.01)
        assert service.servicer.tool_durations.count("pytest") == 20 and est.local.model.count("pytest") == 20
        e = await est.estimate("pytest", 1000)
        assert e.source == "predictor" and e.durations.samples == 20
        assert e.durations.cdf(8.0) > 0.9 and e.recompute_s == pytest.approx(est.local.latency.prefill_s(1000))
        # a predictor that knows less (restarted, say) than the local model: the local distribution answers
        for _ in range(5):
            est.local.observe("only-local", 1.0)
        e = await est.estimate("only-local", 1000)
        assert e.source == "local" and e.durations.samples == 5 and e.recompute_s > 0
    finally:
        await est.close()
        await serving.stop(service, server)


async def test_a_slow_predictor_costs_one_deadline_then_the_local_model_answers():
    slow = SlowPredictor()
    server = grpc.aio.server()
    predictor_pb2_grpc.add_PredictorServicer_to_server(slow, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    clock = Clock()
    est = PredictorEstimator(f"127.0.0.1:{port}", LocalEstimator(), deadline_s=0.05, retry_after_s=5.0, clock=clock)
    try:
        for _ in range(3):
            assert (await est.estimate("ls", 100)).source == "local"
        assert slow.calls == 1 and est.down and est.fallbacks == 3
        clock.now = 6.0  # time to try the predictor again
        await est.estimate("ls", 100)
        assert slow.calls == 2
    finally:
        await est.close()
        await server.stop(0)


async def test_no_predictor_is_local_only():
    est = PredictorEstimator("")
    est.observe("ls", 0.5)
    e = await est.estimate("ls", 100)
    assert e.source == "local" and e.durations.samples == 1 and est.stub is None
    await est.close()
