"""The predictor's tool-duration RPCs over a real grpc.aio server."""

import math

import grpc
import pytest

from predictor.ranker import HeuristicRanker
from predictor.server import build_service
from qllm.estimators.tool_durations import DEFAULT_LEVELS
from qllm import serving
from qllm.v1 import predictor_pb2, predictor_pb2_grpc


@pytest.fixture
async def stub():
    service = build_service(HeuristicRanker())
    server, port = await serving.start(service, "127.0.0.1", 0)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    yield predictor_pb2_grpc.PredictorStub(channel)
    await channel.close()
    await serving.stop(service, server)


async def test_observe_then_predict(stub):
    first = await stub.PredictToolDuration(predictor_pb2.ToolDurationRequest(tool_name="search"))
    assert first.prior and first.samples == 0 and first.pooled_samples == 0
    assert list(first.quantiles) == pytest.approx(DEFAULT_LEVELS)
    assert len(first.durations_s) == len(DEFAULT_LEVELS)
    assert first.durations_s[9] == pytest.approx(2.0, rel=1e-3)  # the fixed prior's median
    calls = [predictor_pb2.ToolCall(tool_name="search", duration_s=5.0 + 0.01 * i) for i in range(50)]
    calls += [predictor_pb2.ToolCall(tool_name="ls", duration_s=0.2)] * 50
    reply = await stub.ObserveToolCalls(predictor_pb2.ToolCallReport(calls=calls))
    assert reply.accepted == 100 and reply.tools == 2
    p = await stub.PredictToolDuration(predictor_pb2.ToolDurationRequest(
        tool_name="search", quantiles=[0.5, 0.9], within_s=[1.0, 6.0]))
    assert not p.prior and p.samples == 50 and p.pooled_samples == 100
    assert list(p.quantiles) == pytest.approx([0.5, 0.9])
    assert 5.0 <= p.durations_s[0] <= 5.5 and 5.0 <= p.durations_s[1] <= 5.5
    assert p.observed_mean_s == pytest.approx(5.245)
    assert p.p_within[0] < 0.02 and p.p_within[1] > 0.97
    assert p.recompute_s == 0.0  # not asked


async def test_recompute_follows_the_latency_model(stub):
    small = await stub.PredictToolDuration(predictor_pb2.ToolDurationRequest(context_tokens=100))
    big = await stub.PredictToolDuration(predictor_pb2.ToolDurationRequest(context_tokens=4000))
    assert 0 < small.recompute_s < big.recompute_s
    samples = [predictor_pb2.LatencySample(prefill_tokens=1000, prefill_s=1.0),
               predictor_pb2.LatencySample(prefill_tokens=2000, prefill_s=2.0)] * 200
    await stub.ReportLatency(predictor_pb2.LatencyReport(samples=samples))
    slow = await stub.PredictToolDuration(predictor_pb2.ToolDurationRequest(context_tokens=4000))
    assert slow.recompute_s == pytest.approx(4.0, rel=0.1)


@pytest.mark.parametrize("request_,field", [
    (predictor_pb2.ToolDurationRequest(tool_name="x" * 300), "tool_name"),
    (predictor_pb2.ToolDurationRequest(quantiles=[0.5, 1.5]), "quantiles[1]"),
    (predictor_pb2.ToolDurationRequest(quantiles=[math.nan]), "quantiles[0]"),
    (predictor_pb2.ToolDurationRequest(within_s=[-1.0]), "within_s[0]"),
])
async def test_bad_predictions_are_invalid_argument(stub, request_, field):
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.PredictToolDuration(request_)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and field in err.value.details()


async def test_bad_observations_are_invalid_argument_and_learn_nothing(stub):
    for calls, field in [([predictor_pb2.ToolCall(tool_name="ls", duration_s=1.0), predictor_pb2.ToolCall()],
                          "calls[1].tool_name"),
                         ([predictor_pb2.ToolCall(tool_name="ls", duration_s=-3.0)], "calls[0].duration_s"),
                         ([predictor_pb2.ToolCall(tool_name="ls", duration_s=math.inf)], "calls[0].duration_s")]:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.ObserveToolCalls(predictor_pb2.ToolCallReport(calls=calls))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and field in err.value.details()
    p = await stub.PredictToolDuration(predictor_pb2.ToolDurationRequest(tool_name="ls"))
    assert p.prior and p.pooled_samples == 0
