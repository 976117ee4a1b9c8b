"""The worker's measured step times reach the predictor's latency model: the warm-up's profile first, then
live steps; a predictor that is down costs nothing but dropped samples."""

import asyncio
import collections
import socket

import grpc

from predictor.ranker import HeuristicRanker
from predictor.server import build_service as build_predictor
from qllm import serving
from qllm.v1 import worker_pb2, worker_pb2_grpc
from worker import server as worker_server
from worker.engine import EngineConfig
from worker.latency_report import LatencyReporter
from worker.model_loader import load_model


async def test_warm_up_and_live_steps_reach_the_predictor():
    p_service = build_predictor(HeuristicRanker())
    p_server, p_port = await serving.start(p_service, "127.0.0.1", 0)
    latency = p_service.servicer.latency
    before = latency.state()
    w_service, engine = worker_server.build_service(load_model(None), EngineConfig(kv_budget_tokens=4096),
                                                    predictor=f"127.0.0.1:{p_port}", worker_address="w0",
                                                    latency_report_interval_s=0.05)
    w_server, w_port = await serving.start(w_service, "127.0.0.1", 0)
    try:
        for _ in range(200):  # the warm-up's steps: pure prefills (1024, 300 tokens) and decode steps
            state = latency.state()
            if state.prefill_samples and state.decode_samples:
                break
            await asyncio.sleep(0.05)
        warm = latency.state()
        assert warm.prefill_samples > 0 and warm.decode_samples > 0
        assert warm.prefill_s_per_token != before.prefill_s_per_token
        async with grpc.aio.insecure_channel(f"127.0.0.1:{w_port}") as channel:
            stub = worker_pb2_grpc.WorkerStub(channel)

            async def commands():
                yield worker_pb2.WorkerCommand(submit=worker_pb2.SubmitRequest(
                    request_id="r", prompt="measure me " * 30, priority=2,
                    sampling=worker_pb2.SamplingParams(max_tokens=12, top_p=1.0, ignore_eos=True)))
            assert [e async for e in stub.Serve(commands())][-1].tokens.finished
        for _ in range(100):
            if latency.state().decode_samples >= warm.decode_samples + 10:
                break
            await asyncio.sleep(0.05)
        assert latency.state().decode_samples >= warm.decode_samples + 10
    finally:
        await serving.stop(w_service, w_server)
        await serving.stop(p_service, p_server)


async def test_a_predictor_that_is_down_only_drops_samples():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{s.getsockname()[1]}"
    samples = collections.deque([(512, 0.05, 0, 0.0), (0, 0.0, 4, 0.01)])
    reporter = LatencyReporter(dead, "w0", samples, interval_s=60, deadline_s=0.2)
    reporter.open()
    try:
        assert await reporter.report_once() == 0
        assert reporter.down and not samples
    finally:
        await reporter.stop()
