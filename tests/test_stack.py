"""The four services in-process on free ports: a Generate streamed end to end through router and worker."""

import asyncio

import grpc
import pytest
import pytest_asyncio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from kvmanager import server as kvmanager_server
from predictor import server as predictor_server
from qllm import internal_auth, serving
from qllm.v1 import router_pb2, router_pb2_grpc, worker_pb2, worker_pb2_grpc
from router import server as router_server
from worker import server as worker_server
from worker.engine import EngineConfig
from worker.model_loader import load_model

pytestmark = pytest.mark.asyncio(loop_scope="module")

LS, BE = 1, 2


router_args = router_server.default_args


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def stack(internal_token, internal_token_file):
    servers = []
    worker_service, engine = worker_server.build_service(load_model(None), EngineConfig(kv_budget_tokens=8192),
                                                         internal_token=internal_token)
    w, wport = await serving.start(worker_service, "127.0.0.1", 0)
    servers.append((worker_service, w))
    p_service = predictor_server.build_service(internal_token=internal_token)
    p, pport = await serving.start(p_service, "127.0.0.1", 0)
    servers.append((p_service, p))
    k_service = kvmanager_server.build_service(workers=[f"127.0.0.1:{wport}"], internal_token=internal_token)
    k, kport = await serving.start(k_service, "127.0.0.1", 0)
    servers.append((k_service, k))
    r_service, _ = await router_server.build(router_args(
        workers=f"127.0.0.1:{wport}", predictor=f"127.0.0.1:{pport}", kvmanager=f"127.0.0.1:{kport}",
        internal_token_file=internal_token_file))
    r, rport = await serving.start(r_service, "127.0.0.1", 0)
    servers.append((r_service, r))
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{rport}")
    yield {"router": router_pb2_grpc.RouterStub(channel), "channel": channel, "engine": engine,
           "worker": worker_pb2_grpc.WorkerStub(grpc.aio.insecure_channel(
               f"127.0.0.1:{wport}", interceptors=internal_auth.client_interceptors(internal_token))),
           "rport": rport, "wport": wport, "token_file": internal_token_file}
    await channel.close()
    for service, server in reversed(servers):
        await serving.stop(service, server)


async def collect(stub, **fields):
    return [m async for m in stub.Generate(router_pb2.GenerateRequest(**fields))]


async def test_generate_streams_tokens_end_to_end(stack):
    msgs = await collect(stack["router"], prompt="Tell me about mixture of experts.", max_tokens=12,
                         ignore_eos=True, priority=LS, request_id="e2e-1")
    assert len(msgs) == 12
    assert all(len(m.token_ids) == 1 for m in msgs)
    assert [m.finished for m in msgs] == [False] * 11 + [True]
    assert msgs[-1].finish_reason == "length" and msgs[-1].completion_tokens == 12
    assert all(m.request_id == "e2e-1" for m in msgs)
    assert "".join(m.text for m in msgs) == stack["engine"].tokenizer.decode(
        [t for m in msgs for t in m.token_ids], skip_special_tokens=True)


async def test_greedy_is_deterministic_across_classes(stack):
    a = await collect(stack["router"], prompt="Same prompt", max_tokens=8, ignore_eos=True, priority=LS)
    b = await collect(stack["router"], prompt="Same prompt", max_tokens=8, ignore_eos=True, priority=BE)
    assert [m.token_ids for m in a] == [m.token_ids for m in b]


BAD_INPUTS = [
    (dict(prompt="", max_tokens=4), "prompt"),
    (dict(prompt="   ", max_tokens=4), "prompt"),
    (dict(prompt="x" * ((1 << 20) + 1), max_tokens=4), "prompt"),
    (dict(prompt="hi", max_tokens=0), "max_tokens"),
    (dict(prompt="hi", max_tokens=5000), "max_tokens"),
    (dict(prompt="hello " * 3000, max_tokens=2000), "max_tokens"),
    (dict(prompt="hi", max_tokens=4, temperature=-1.0), "temperature"),
    (dict(prompt="hi", max_tokens=4, top_p=0.0), "top_p"),
    (dict(prompt="hi", max_tokens=4, top_p=1.5), "top_p"),
    (dict(prompt="hi", max_tokens=4, priority=7), "priority"),
    (dict(prompt="hi", max_tokens=4, num_beams=100), "num_beams"),
    (dict(prompt="hi", max_tokens=4, patience=-1.0), "patience"),
    (dict(prompt="hi", max_tokens=4, last_turn=True), "last_turn"),
]


@pytest.mark.parametrize("fields,field", BAD_INPUTS)
async def test_bad_input_is_invalid_argument_naming_the_field(stack, fields, field):
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await collect(stack["router"], **fields)
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert exc.value.details().startswith(f"{field}:"), exc.value.details()
    # ... and the server still serves the next request.
    ok = await collect(stack["router"], prompt="still there?", max_tokens=2, ignore_eos=True)
    assert ok[-1].finished


async def test_cancel_frees_kv_on_the_worker(stack):
    call = stack["router"].Generate(router_pb2.GenerateRequest(prompt="long " * 200, max_tokens=1000,
                                                               ignore_eos=True, priority=BE))
    await call.read()
    info = await stack["worker"].Describe(worker_pb2.DescribeRequest())
    assert info.kv_free_tokens < info.kv_capacity_tokens
    call.cancel()
    for _ in range(200):
        info = await stack["worker"].Describe(worker_pb2.DescribeRequest())
        if info.kv_free_tokens == info.kv_capacity_tokens and info.num_running == 0:
            break
        await asyncio.sleep(0.02)
    assert info.kv_free_tokens == info.kv_capacity_tokens and info.num_running == 0


async def test_concurrent_requests_all_finish(stack):
    results = await asyncio.gather(*[
        collect(stack["router"], prompt=f"request number {i} " * (i + 1), max_tokens=6, ignore_eos=True,
                priority=LS if i % 2 else BE) for i in range(10)])
    assert all(r[-1].finished and r[-1].completion_tokens == 6 for r in results)


async def test_reflection_lists_services(stack):
    stub = reflection_pb2_grpc.ServerReflectionStub(stack["channel"])
    names = []
    async for reply in stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])):
        names = [s.name for s in reply.list_services_response.service]
    assert {"qllm.v1.Router", "grpc.health.v1.Health"} <= set(names)


async def test_health_is_serving(stack):
    stub = health_pb2_grpc.HealthStub(stack["channel"])
    for service in ("", "qllm.v1.Router"):
        reply = await stub.Check(health_pb2.HealthCheckRequest(service=service))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_router_serves_when_predictor_and_kvmanager_are_down(stack):
    service, _ = await router_server.build(router_args(
        workers=f"127.0.0.1:{stack['wport']}", predictor="127.0.0.1:1", kvmanager="127.0.0.1:1",
        internal_token_file=stack["token_file"]))
    server, port = await serving.start(service, "127.0.0.1", 0)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            msgs = await collect(router_pb2_grpc.RouterStub(channel), prompt="agent turn", max_tokens=3,
                                 ignore_eos=True, program_id="prog-1", tool_name="search")
        assert msgs[-1].finished and msgs[-1].completion_tokens == 3
    finally:
        await serving.stop(service, server)


async def test_api_keys_tenants_and_rate_limits(stack, tmp_path):
    import json

    from qllm.security import hash_key

    keys = {"chat": "qllm_chat_key", "batch": "qllm_batch_key"}
    (tmp_path / "keys.json").write_text(json.dumps({
        "tenants": {"chat": {"priorities": ["LS", "BE"]},
                    "batch": {"priorities": ["BE"], "rate_limit": {"requests_per_s": 0.01, "burst": 2}}},
        "keys": [{"id": name, "tenant": name, "sha256": hash_key(key)} for name, key in keys.items()]}))
    service, _ = await router_server.build(router_args(
        workers=f"127.0.0.1:{stack['wport']}", predictor="", kvmanager="", api_keys=str(tmp_path / "keys.json"),
        internal_token_file=stack["token_file"]))
    server, port = await serving.start(service, "127.0.0.1", 0)

    def auth(name):
        return (("authorization", f"Bearer {keys[name]}"),)

    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = router_pb2_grpc.RouterStub(channel)
            req = dict(prompt="hello", max_tokens=2, ignore_eos=True)
            with pytest.raises(grpc.aio.AioRpcError) as exc:
                [m async for m in stub.Generate(router_pb2.GenerateRequest(**req, priority=LS))]
            assert exc.value.code() == grpc.StatusCode.UNAUTHENTICATED
            ok = [m async for m in stub.Generate(router_pb2.GenerateRequest(**req, priority=LS),
                                                 metadata=auth("chat"))]
            assert ok[-1].finished
            with pytest.raises(grpc.aio.AioRpcError) as exc:  # a BE-only tenant asking for LS
                [m async for m in stub.Generate(router_pb2.GenerateRequest(**req, priority=LS),
                                                metadata=auth("batch"))]
            assert exc.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert exc.value.details().startswith("priority:")
            # burst 2, one used above: one more BE passes, the next is over the rate at once.
            ok = [m async for m in stub.Generate(router_pb2.GenerateRequest(**req, priority=BE),
                                                 metadata=auth("batch"))]
            assert ok[-1].finished
            with pytest.raises(grpc.aio.AioRpcError) as exc:
                [m async for m in stub.Generate(router_pb2.GenerateRequest(**req, priority=BE),
                                                metadata=auth("batch"))]
            assert exc.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        await serving.stop(service, server)
