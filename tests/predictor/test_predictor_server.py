"""In-process grpc test of qllm.v1.Predictor: real server on a free port, grpc.aio client."""

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from predictor.limits import Limits
from predictor.ranker import HeuristicRanker, LengthRanker
from predictor.server import SERVICE_NAME, build_service
from qllm import serving
from qllm.v1 import predictor_pb2, predictor_pb2_grpc


class LenRanker(LengthRanker):
    """Stands in for a torch ranker: goes through the executor path."""

    name = "len"
    uses_torch = True

    def score(self, prompts):
        return [float(len(p)) for p in prompts]


async def _start(ranker, limits=Limits(max_prompts=64, max_prompt_chars=1000)):
    service = build_service(ranker, limits)
    server, port = await serving.start(service, "127.0.0.1", 0)
    return service, server, grpc.aio.insecure_channel(f"127.0.0.1:{port}")


@pytest.fixture(params=["heuristic", "executor"])
async def channel(request):
    ranker = HeuristicRanker() if request.param == "heuristic" else LenRanker()
    service, server, channel = await _start(ranker)
    yield channel
    await channel.close()
    await serving.stop(service, server)


async def test_rank_lengths_one_score_per_prompt(channel):
    stub = predictor_pb2_grpc.PredictorStub(channel)
    prompts = ["hi", "Write a long essay about the history of Rome, in detail.", "What is 2+2?"] * 20
    reply = await stub.RankLengths(predictor_pb2.RankRequest(prompts=prompts))
    assert len(reply.scores) == len(prompts)
    assert reply.scores[1] > reply.scores[0]
    assert len((await stub.RankLengths(predictor_pb2.RankRequest())).scores) == 0


async def test_bad_input_is_invalid_argument(channel):
    stub = predictor_pb2_grpc.PredictorStub(channel)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.RankLengths(predictor_pb2.RankRequest(prompts=["x"] * 65))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "prompts" in err.value.details()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.RankLengths(predictor_pb2.RankRequest(prompts=["ok", "y" * 1001]))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "prompts[1]" in err.value.details()
    assert len((await stub.RankLengths(predictor_pb2.RankRequest(prompts=["ok"]))).scores) == 1


async def test_health_and_reflection(channel):
    health = health_pb2_grpc.HealthStub(channel)
    reply = await health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME))
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    call = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo()
    await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
    reply = await call.read()
    await call.done_writing()
    assert SERVICE_NAME == "qllm.v1.Predictor"
    assert SERVICE_NAME in [s.name for s in reply.list_services_response.service]


async def test_estimate_time(channel):
    stub = predictor_pb2_grpc.PredictorStub(channel)
    items = [predictor_pb2.EstimateItem(prompt="hi", prompt_tokens=2),
             predictor_pb2.EstimateItem(prompt="x" * 400),  # prompt_tokens from the text
             predictor_pb2.EstimateItem(score=1.5, prompt_tokens=10, generated_so_far=20, max_tokens=30)]
    reply = await stub.EstimateTime(predictor_pb2.EstimateRequest(items=items, batch_size=4))
    assert len(reply.estimates) == 3
    assert all(e.remaining_s > 0 and e.predicted_output_tokens > 0 for e in reply.estimates)
    assert reply.estimates[2].score == pytest.approx(1.5)
    assert reply.estimates[2].remaining_tokens <= 10
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.EstimateTime(predictor_pb2.EstimateRequest(items=[predictor_pb2.EstimateItem(prompt="y" * 1001)]))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "items[0].prompt" in err.value.details()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.EstimateTime(predictor_pb2.EstimateRequest(items=[predictor_pb2.EstimateItem(score=float("nan"))]))
    assert "items[0].score" in err.value.details()


async def test_report_latency_moves_the_estimate(channel):
    stub = predictor_pb2_grpc.PredictorStub(channel)
    req = predictor_pb2.EstimateRequest(items=[predictor_pb2.EstimateItem(score=0.0, prompt_tokens=100)])
    before = (await stub.EstimateTime(req)).estimates[0].remaining_s
    samples = [predictor_pb2.LatencySample(decode_batch_size=1, decode_step_s=0.05,
                                           prefill_tokens=100, prefill_s=0.5)] * 200
    state = await stub.ReportLatency(predictor_pb2.LatencyReport(worker="w0", samples=samples))
    assert state.decode_samples == 200 and state.prefill_samples == 200
    assert state.decode_base_s + state.decode_per_seq_s == pytest.approx(0.05, rel=0.05)
    after = (await stub.EstimateTime(req)).estimates[0].remaining_s
    assert after > 5 * before
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.ReportLatency(predictor_pb2.LatencyReport(samples=[predictor_pb2.LatencySample(decode_step_s=-1)]))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "samples[0].decode_step_s" in err.value.details()


async def test_concurrent_calls_are_batched():
    import asyncio
    import threading

    class Slow(LengthRanker):
        name = "slow"
        uses_torch = True

        def __init__(self):
            self.calls = []
            self.gate = threading.Event()

        def score(self, prompts):
            self.gate.wait(5)
            self.calls.append(len(prompts))
            return [float(len(p)) for p in prompts]

    ranker = Slow()
    service, server, channel = await _start(ranker)
    try:
        stub = predictor_pb2_grpc.PredictorStub(channel)
        first = asyncio.ensure_future(stub.RankLengths(predictor_pb2.RankRequest(prompts=["a"])))
        await asyncio.sleep(0.2)  # the first call is on the executor now
        rest = [asyncio.ensure_future(stub.RankLengths(predictor_pb2.RankRequest(prompts=["b" * i])))
                for i in range(1, 11)]
        await asyncio.sleep(0.2)
        ranker.gate.set()
        replies = await asyncio.gather(first, *rest)
        assert [list(r.scores) for r in replies] == [[1.0]] + [[float(i)] for i in range(1, 11)]
        assert ranker.calls == [1, 10]  # the ten that waited went as one batch
    finally:
        await channel.close()
        await serving.stop(service, server)


async def test_a_failing_ranker_is_internal_not_a_crash():
    class Broken(LengthRanker):
        name = "broken"
        uses_torch = True

        def score(self, prompts):
            if "boom" in prompts:
                raise RuntimeError("boom")
            return [0.0] * len(prompts)

    service, server, channel = await _start(Broken())
    try:
        stub = predictor_pb2_grpc.PredictorStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.RankLengths(predictor_pb2.RankRequest(prompts=["boom"]))
        assert err.value.code() == grpc.StatusCode.INTERNAL
        assert list((await stub.RankLengths(predictor_pb2.RankRequest(prompts=["ok"]))).scores) == [0.0]
    finally:
        await channel.close()
        await serving.stop(service, server)
