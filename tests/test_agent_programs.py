"""Agent programs end to end, in-process: router -> worker (pins the turn's KV) -> router reports the turn ->
kvmanager decides -> worker's SetPin; the next turn reuses the pinned prefix and gives the same tokens as a
full recompute; the last turn frees everything."""

import asyncio

import grpc
import pytest
import pytest_asyncio

from kvmanager import server as kvmanager_server
from qllm import internal_auth, serving
from qllm.v1 import router_pb2, router_pb2_grpc, worker_pb2, worker_pb2_grpc
from router import server as router_server
from router.namespaces import program_key
from worker import server as worker_server
from worker.engine import EngineConfig
from worker.model_loader import load_model

pytestmark = pytest.mark.asyncio(loop_scope="module")

BE = 2


async def start_stack(policy: str, token_file: str):
    servers = []
    token = internal_auth.InternalToken.from_file(token_file)
    w_service, engine = worker_server.build_service(load_model(None), EngineConfig(kv_budget_tokens=8192,
                                                                                   provisional_pin_s=30.0),
                                                    internal_token=token)
    w, wport = await serving.start(w_service, "127.0.0.1", 0)
    servers.append((w_service, w))
    k_service = kvmanager_server.build_service(policy, maintain_interval_s=0.05, workers=[f"127.0.0.1:{wport}"],
                                               internal_token=token)
    k, kport = await serving.start(k_service, "127.0.0.1", 0)
    servers.append((k_service, k))
    r_service, _ = await router_server.build(router_server.default_args(
        workers=f"127.0.0.1:{wport}", predictor="", kvmanager=f"127.0.0.1:{kport}", internal_token_file=token_file))
    r, rport = await serving.start(r_service, "127.0.0.1", 0)
    servers.append((r_service, r))
    channels = [grpc.aio.insecure_channel(f"127.0.0.1:{rport}"),
                grpc.aio.insecure_channel(f"127.0.0.1:{wport}", interceptors=internal_auth.client_interceptors(token))]
    return servers, channels, router_pb2_grpc.RouterStub(channels[0]), worker_pb2_grpc.WorkerStub(channels[1])


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def ttl_stack(internal_token_file):
    servers, channels, router, worker = await start_stack("pin-forever", internal_token_file)
    yield router, worker
    for c in channels:
        await c.close()
    for service, server in reversed(servers):
        await serving.stop(service, server)


async def generate(router, **fields):
    msgs = [m async for m in router.Generate(router_pb2.GenerateRequest(
        max_tokens=6, ignore_eos=True, priority=BE, **fields))]
    assert msgs[-1].finished
    return msgs


async def wait_for(predicate, timeout_s=10.0):
    for _ in range(int(timeout_s / 0.02)):
        if await predicate():
            return True
        await asyncio.sleep(0.02)
    return False


async def test_turns_reuse_the_pin_the_kvmanager_keeps(ttl_stack):
    router, worker = ttl_stack
    prompt = "You are a coding agent. Task: list the files, then open the failing test. " * 4
    turns, prompts = [], []
    for k in range(3):
        prompts.append(prompt)
        msgs = await generate(router, prompt=prompt, program_id="prog-1", tool_name="bash", last_turn=(k == 2),
                              request_id=f"prog-1-{k}")
        turns.append(msgs)
        if k < 2:
            # The kvmanager's SetPin (pin-forever: no expiry) replaces the worker's provisional lifetime.
            async def confirmed():
                pins = (await worker.ListPins(worker_pb2.ListWorkerPinsRequest())).pins
                # The worker knows the program by the router's key for it (router/namespaces.py).
                return any(p.program_id == program_key("anonymous", "prog-1") and p.expires_in_s == float("inf")
                           for p in pins)
            assert await wait_for(confirmed)
        prompt = prompt + "".join(m.text for m in msgs) + f" tool output {k}: ok, 3 files."
    first, second, third = (t[-1] for t in turns)
    assert first.cached_prompt_tokens == 0
    assert second.cached_prompt_tokens > 0.8 * second.prompt_tokens
    assert third.cached_prompt_tokens > 0.8 * third.prompt_tokens
    # The same prompt without a program (no pin, full prefill) gives the same tokens.
    for k, msgs in enumerate(turns[1:], start=1):
        fresh = await generate(router, prompt=prompts[k], request_id=f"fresh-{k}")
        assert [t for m in fresh for t in m.token_ids] == [t for m in msgs for t in m.token_ids]

    async def freed():
        info = await worker.Describe(worker_pb2.DescribeRequest())
        return info.num_pins == 0 and info.kv_free_tokens == info.kv_capacity_tokens
    assert await wait_for(freed)


async def test_no_pin_frees_the_kv_at_turn_end(internal_token_file):
    servers, channels, router, worker = await start_stack("no-pin", internal_token_file)
    try:
        await generate(router, prompt="agent turn one " * 20, program_id="p2", tool_name="search")

        async def freed():
            return (await worker.Describe(worker_pb2.DescribeRequest())).num_pins == 0
        assert await wait_for(freed)
        msgs = await generate(router, prompt="agent turn one " * 20 + "result", program_id="p2", last_turn=True)
        assert msgs[-1].cached_prompt_tokens == 0
    finally:
        for c in channels:
            await c.close()
        for service, server in reversed(servers):
            await serving.stop(service, server)
