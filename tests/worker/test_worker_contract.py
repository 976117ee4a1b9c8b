"""The worker's own checks of the request contract (qllm/contract.py), reached directly over its Serve stream as
an internal caller would, without the router in front: every bad field is refused with a clear status naming
it, never UNKNOWN, and the stream goes on serving. A draining worker marks its refusal `draining`."""

import asyncio
import math

import grpc
import pytest

from qllm import serving
from qllm.v1 import worker_pb2, worker_pb2_grpc
from worker import server as worker_server
from worker.engine import EngineConfig

KV_BUDGET = 1024


def submit(rid, prompt="hello", priority=2, prompt_token_ids=(), **sampling):
    fields = dict(max_tokens=2, top_p=1.0, ignore_eos=True)
    fields.update(sampling)
    return worker_pb2.WorkerCommand(submit=worker_pb2.SubmitRequest(
        request_id=rid, prompt=prompt, priority=priority, prompt_token_ids=prompt_token_ids,
        sampling=worker_pb2.SamplingParams(**fields)))


BAD = [  # (submit fields, the status, the field its message names)
    (dict(priority=0), "INVALID_ARGUMENT", "priority"),
    (dict(priority=7), "INVALID_ARGUMENT", "priority"),
    (dict(prompt=""), "INVALID_ARGUMENT", "prompt"),
    (dict(prompt="", prompt_token_ids=[1 << 30]), "INVALID_ARGUMENT", "prompt_token_ids"),
    (dict(max_tokens=0), "INVALID_ARGUMENT", "max_tokens"),
    (dict(top_p=0.0), "INVALID_ARGUMENT", "top_p"),
    (dict(temperature=math.nan), "INVALID_ARGUMENT", "temperature"),
    (dict(num_beams=2, patience=-1.0), "INVALID_ARGUMENT", "patience"),
    (dict(num_beams=2, length_penalty=math.inf), "INVALID_ARGUMENT", "length_penalty"),
    (dict(num_beams=2, temperature=0.5), "INVALID_ARGUMENT", "temperature"),
    (dict(num_beams=64), "INVALID_ARGUMENT", "num_beams"),
    (dict(num_beams=2, stop=["x"]), "INVALID_ARGUMENT", "stop"),
    (dict(stop=[""]), "INVALID_ARGUMENT", "stop"),
    (dict(stop_token_ids=[1 << 30]), "INVALID_ARGUMENT", "stop_token_ids"),
    (dict(top_logprobs=3), "INVALID_ARGUMENT", "top_logprobs"),
    (dict(max_tokens=100_000), "INVALID_ARGUMENT", "max_tokens"),
    (dict(max_tokens=KV_BUDGET + 1), "RESOURCE_EXHAUSTED", "max_tokens"),
]


@pytest.fixture
async def worker():
    from worker.model_loader import load_model

    service, _ = worker_server.build_service(load_model(None), EngineConfig(kv_budget_tokens=KV_BUDGET))
    server, port = await serving.start(service, "127.0.0.1", 0)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield worker_pb2_grpc.WorkerStub(channel)
    finally:
        await serving.stop(service, server)


async def test_bad_fields_are_refused_naming_the_field(worker):
    async def commands():
        for i, (fields, _, _) in enumerate(BAD):
            yield submit(f"bad{i}", **fields)
        yield submit("good")

    events = {}
    async for event in worker.Serve(commands()):
        events.setdefault(event.request_id, []).append(event)
        if event.request_id == "good" and event.tokens.finished:
            break
    for i, (fields, code, field) in enumerate(BAD):
        (event,) = events[f"bad{i}"]
        rejected = event.rejected
        assert grpc.StatusCode[code].value[0] == rejected.code, (fields, rejected)
        assert rejected.message.startswith(field + ":"), (fields, rejected)
        assert not rejected.draining
    assert events["good"][-1].tokens.finished and events["good"][-1].tokens.completion_tokens == 2


async def test_a_draining_worker_marks_its_refusal():
    class IdleEngine:
        tokenizer = None
        vocab_size = 8192

        def encode(self, prompt):
            return [1]

    servicer = worker_server.WorkerServicer(IdleEngine(), worker_pb2.WorkerInfo())
    servicer.draining.set()
    events = servicer.Serve(_one(submit("late")), None)
    event = await asyncio.wait_for(events.__anext__(), 5)
    assert event.request_id == "late" and event.rejected.draining
    assert event.rejected.code == grpc.StatusCode.UNAVAILABLE.value[0]
    await events.aclose()


async def _one(command):
    yield command
    await asyncio.sleep(3600)  # the router keeps its stream open
