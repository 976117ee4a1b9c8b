"""Issue 16's attacks by a hostile tenant, against an in-process stack with an API-key file (tenant A: LS+BE,
tenant B: BE only) whose services authenticate each other with an internal token. Each test is one attack:
what the attacker gets, and the victim's request completing unharmed."""

import asyncio
import json

import grpc
import pytest
import pytest_asyncio

from kvmanager import server as kvmanager_server
from predictor import server as predictor_server
from qllm import internal_auth, serving
from qllm.security import hash_key
from qllm.v1 import (kvmanager_pb2, kvmanager_pb2_grpc, predictor_pb2, predictor_pb2_grpc, router_pb2,
                     router_pb2_grpc, worker_pb2, worker_pb2_grpc)
from router import server as router_server
from router.namespaces import program_key
from worker import server as worker_server
from worker.engine import EngineConfig
from worker.model_loader import load_model

pytestmark = pytest.mark.asyncio(loop_scope="module")

LS, BE = 1, 2
KEYS = {"tenant-a": "qllm_key_of_tenant_a", "tenant-b": "qllm_key_of_tenant_b"}


def auth(tenant):
    return (("authorization", f"Bearer {KEYS[tenant]}"),)


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def stack(internal_token, internal_token_file, tmp_path_factory):
    keys = tmp_path_factory.mktemp("keys") / "keys.json"
    keys.write_text(json.dumps({
        "tenants": {"tenant-a": {"priorities": ["LS", "BE"]}, "tenant-b": {"priorities": ["BE"]}},
        "keys": [{"id": t, "tenant": t, "sha256": hash_key(k)} for t, k in KEYS.items()]}))
    servers = []
    w_service, _ = worker_server.build_service(load_model(None), EngineConfig(kv_budget_tokens=8192,
                                                                              provisional_pin_s=30.0),
                                               internal_token=internal_token)
    w, wport = await serving.start(w_service, "127.0.0.1", 0)
    servers.append((w_service, w))
    p_service = predictor_server.build_service(internal_token=internal_token)
    p, pport = await serving.start(p_service, "127.0.0.1", 0)
    servers.append((p_service, p))
    k_service = kvmanager_server.build_service("pin-forever", maintain_interval_s=0.05,
                                               workers=[f"127.0.0.1:{wport}"], internal_token=internal_token)
    k, kport = await serving.start(k_service, "127.0.0.1", 0)
    servers.append((k_service, k))
    # Two BE requests on the worker at once: a third waits in the router's queue.
    r_service, _ = await router_server.build(router_server.default_args(
        workers=f"127.0.0.1:{wport}", predictor=f"127.0.0.1:{pport}", kvmanager=f"127.0.0.1:{kport}",
        api_keys=str(keys), internal_token_file=internal_token_file, max_inflight_per_worker=2))
    r, rport = await serving.start(r_service, "127.0.0.1", 0)
    servers.append((r_service, r))
    channels = {name: grpc.aio.insecure_channel(f"127.0.0.1:{port}")
                for name, port in [("router", rport), ("worker", wport), ("kvmanager", kport), ("predictor", pport)]}
    trusted = grpc.aio.insecure_channel(f"127.0.0.1:{wport}", interceptors=internal_auth.client_interceptors(
        internal_token))
    yield {"router": router_pb2_grpc.RouterStub(channels["router"]), "channels": channels,
           "trusted_worker": worker_pb2_grpc.WorkerStub(trusted), "token": internal_token,
           "worker_address": f"127.0.0.1:{wport}"}
    for channel in [*channels.values(), trusted]:
        await channel.close()
    for service, server in reversed(servers):
        await serving.stop(service, server)


class Stream:
    """One Generate call read in the background: its messages, and its status if it failed."""

    def __init__(self, router, tenant, **fields):
        fields.setdefault("priority", BE)
        fields.setdefault("ignore_eos", True)
        self.call = router.Generate(router_pb2.GenerateRequest(**fields), metadata=auth(tenant), timeout=60)
        self.msgs: list = []
        self.error: grpc.aio.AioRpcError | None = None
        self.first = asyncio.Event()
        self.task = asyncio.create_task(self._read())

    async def _read(self):
        try:
            async for m in self.call:
                self.msgs.append(m)
                self.first.set()
        except grpc.aio.AioRpcError as exc:
            self.error = exc
        self.first.set()
        return self

    async def done(self):
        return await asyncio.wait_for(self.task, 60)

    @property
    def tokens(self):
        return [t for m in self.msgs for t in m.token_ids]

    def completed(self, max_tokens):
        return (self.error is None and self.msgs and self.msgs[-1].finished
                and len(self.tokens) == max_tokens == self.msgs[-1].completion_tokens)


async def generate(router, tenant, **fields):
    return await Stream(router, tenant, **fields).done()


# --- 1. request ids ---------------------------------------------------------------------------------------

async def test_another_tenant_reusing_a_running_request_id(stack):
    """Was: B got ALREADY_EXISTS and A's stream hung until its deadline. Now both run to the end."""
    victim = Stream(stack["router"], "tenant-a", prompt="the victim's long request", max_tokens=24, request_id="x")
    await asyncio.wait_for(victim.first.wait(), 30)
    attacker = await generate(stack["router"], "tenant-b", prompt="the attacker's request", max_tokens=4,
                              request_id="x")
    await victim.done()
    assert attacker.completed(4), attacker.error
    assert victim.completed(24), victim.error
    assert {m.request_id for m in victim.msgs} == {m.request_id for m in attacker.msgs} == {"x"}


async def test_another_tenant_reusing_a_queued_request_id(stack):
    """Was: with A's "x" still queued at the router, B got UNKNOWN "request 'x' is already queued". Now both
    run to the end."""
    blockers = [Stream(stack["router"], "tenant-a", prompt=f"blocker {i}", max_tokens=16) for i in range(2)]
    for b in blockers:
        await asyncio.wait_for(b.first.wait(), 30)
    victim = Stream(stack["router"], "tenant-a", prompt="queued victim", max_tokens=6, request_id="q")
    await asyncio.sleep(0.05)
    attacker = await generate(stack["router"], "tenant-b", prompt="queued attacker", max_tokens=3, request_id="q")
    await victim.done()
    for b in blockers:
        await b.done()
    assert attacker.completed(3), attacker.error
    assert victim.completed(6), victim.error
    assert all(b.completed(16) for b in blockers)


async def test_one_tenant_sending_the_same_id_twice(stack):
    """A client id is a label: two live requests of one tenant under one id are two requests."""
    first = Stream(stack["router"], "tenant-a", prompt="first of two", max_tokens=10, request_id="dup")
    await asyncio.wait_for(first.first.wait(), 30)
    second = await generate(stack["router"], "tenant-a", prompt="second of two", max_tokens=5, request_id="dup")
    await first.done()
    assert first.completed(10) and second.completed(5)


# --- 2. agent programs --------------------------------------------------------------------------------------

async def test_another_tenants_program_id_reaches_neither_its_kv_nor_its_pin(stack):
    """Was: B's turn under A's program_id reused A's pinned KV (cached_prompt_tokens = A's whole prompt: a
    prefix probe of A's prompt) and B's last_turn dropped A's pin. Now B's program is B's own."""
    prompt = "You are tenant A's agent. Secret plan: refactor the billing module, then run the tests. " * 3
    a1 = await generate(stack["router"], "tenant-a", prompt=prompt, program_id="prog", tool_name="bash",
                        max_tokens=6)
    assert a1.completed(6)
    a_key = program_key("tenant-a", "prog")

    async def a_pinned():
        pins = (await stack["trusted_worker"].ListPins(worker_pb2.ListWorkerPinsRequest())).pins
        return any(p.program_id == a_key and p.expires_in_s == float("inf") for p in pins)
    for _ in range(250):
        if await a_pinned():
            break
        await asyncio.sleep(0.02)
    assert await a_pinned()

    probe = await generate(stack["router"], "tenant-b", prompt=prompt + " and my suffix", program_id="prog",
                           max_tokens=2)
    assert probe.completed(2) and probe.msgs[-1].cached_prompt_tokens == 0
    drop = await generate(stack["router"], "tenant-b", prompt=prompt + " and more", program_id="prog",
                          last_turn=True, max_tokens=2)
    assert drop.completed(2)  # (it may reuse B's own pin of its first turn)
    assert await a_pinned()

    next_prompt = prompt + "".join(m.text for m in a1.msgs) + " tool output: 3 tests pass."
    a2 = await generate(stack["router"], "tenant-a", prompt=next_prompt, program_id="prog", last_turn=True,
                        max_tokens=4)
    assert a2.completed(4)
    assert a2.msgs[-1].cached_prompt_tokens > 0.8 * a1.msgs[-1].prompt_tokens  # A's pin served A's next turn


# --- 4. bad bytes and non-finite numbers ------------------------------------------------------------------

def raw_call(channel, method, response_type):
    return channel.unary_stream(method, request_serializer=lambda b: b,
                                response_deserializer=response_type.FromString)


async def expect_status(call, code, starts):
    with pytest.raises(grpc.aio.AioRpcError) as err:
        result = call()
        if hasattr(result, "__aiter__"):
            [m async for m in result]
        else:
            await result
    assert err.value.code() == code, err.value
    assert err.value.details().startswith(starts), err.value.details()
    return err.value.details()


async def test_bad_bytes_and_non_finite_numbers_are_invalid_argument_and_harm_nobody(stack):
    """Was: garbage bytes and invalid UTF-8 in `prompt` gave UNKNOWN "Unexpected <class DecodeError>";
    `temperature: Infinity` was accepted."""
    bystander = Stream(stack["router"], "tenant-a", prompt="an innocent request", max_tokens=30)
    await asyncio.wait_for(bystander.first.wait(), 30)
    channel = stack["channels"]["router"]
    generate_raw = raw_call(channel, "/qllm.v1.Router/Generate", router_pb2.GenerateResponse)
    await expect_status(lambda: generate_raw(b"\xff\xff\xff\xff\x0f", metadata=auth("tenant-b"), timeout=10),
                        grpc.StatusCode.INVALID_ARGUMENT, "request: 5 bytes are not a valid qllm.v1.GenerateRequest")
    bad_prompt = router_pb2.GenerateRequest(prompt="PLACEHOLDER", max_tokens=2).SerializeToString().replace(
        b"PLACEHOLDER", b"bad \xff\xfe bytes")
    await expect_status(lambda: generate_raw(bad_prompt, metadata=auth("tenant-b"), timeout=10),
                        grpc.StatusCode.INVALID_ARGUMENT, "prompt: invalid UTF-8 at byte 4")
    for value in (float("inf"), float("-inf"), float("nan")):
        await expect_status(lambda: stack["router"].Generate(router_pb2.GenerateRequest(
            prompt="hello", max_tokens=2, temperature=value, priority=BE), metadata=auth("tenant-b"), timeout=10),
            grpc.StatusCode.INVALID_ARGUMENT, "temperature:")

    # The internal services answer undecodable input the same way (with the token: past authentication).
    token = (("x-qllm-internal-token", stack["token"].current),)
    workers = stack["channels"]["worker"]
    command = worker_pb2.WorkerCommand(submit=worker_pb2.SubmitRequest(request_id="PLACEHOLDER", prompt="hi"))
    bad_command = command.SerializeToString().replace(b"PLACEHOLDER", b"\xc3\x28 id bytes")

    async def one_bad_command():
        yield bad_command
    serve = workers.stream_stream("/qllm.v1.Worker/Serve", request_serializer=lambda b: b,
                                  response_deserializer=worker_pb2.WorkerEvent.FromString)
    await expect_status(lambda: serve(one_bad_command(), metadata=token, timeout=10),
                        grpc.StatusCode.INVALID_ARGUMENT, "submit.request_id: invalid UTF-8 at byte 0")
    describe = workers.unary_unary("/qllm.v1.Worker/Describe", request_serializer=lambda b: b,
                                   response_deserializer=worker_pb2.WorkerInfo.FromString)
    await expect_status(lambda: describe(b"\x08", metadata=token, timeout=10), grpc.StatusCode.INVALID_ARGUMENT,
                        "request: 1 bytes are not a valid qllm.v1.DescribeRequest")
    report = stack["channels"]["kvmanager"].unary_unary(
        "/qllm.v1.KVManager/ReportTurn", request_serializer=lambda b: b,
        response_deserializer=kvmanager_pb2.PinDecision.FromString)
    await expect_status(lambda: report(b"\x0a\x05ab", metadata=token, timeout=10), grpc.StatusCode.INVALID_ARGUMENT,
                        "request: 4 bytes are not a valid qllm.v1.TurnReport")
    rank = stack["channels"]["predictor"].unary_unary(
        "/qllm.v1.Predictor/RankLengths", request_serializer=lambda b: b,
        response_deserializer=predictor_pb2.RankResponse.FromString)
    await expect_status(lambda: rank(b"\x0a\x02\xff\xfe", timeout=10), grpc.StatusCode.INVALID_ARGUMENT,
                        "prompts: invalid UTF-8 at byte 0")

    await bystander.done()
    assert bystander.completed(30), bystander.error
    ok = await generate(stack["router"], "tenant-b", prompt="after the attacks", max_tokens=2)
    assert ok.completed(2)


# --- 3. the internal services ---------------------------------------------------------------------------

async def test_internal_rpcs_refuse_callers_without_the_token(stack):
    """Was: anyone reaching the worker port ran LS generations on Worker/Serve, listed every tenant's pins
    and set or released them; the kvmanager and the predictor's internal methods were as open."""
    wrong = (("x-qllm-internal-token", "not-the-token-" + "x" * 20),)
    worker = worker_pb2_grpc.WorkerStub(stack["channels"]["worker"])
    kvmanager = kvmanager_pb2_grpc.KVManagerStub(stack["channels"]["kvmanager"])
    predictor = predictor_pb2_grpc.PredictorStub(stack["channels"]["predictor"])

    async def serve_one(metadata):
        async def commands():
            yield worker_pb2.WorkerCommand(submit=worker_pb2.SubmitRequest(
                request_id="direct", prompt="an LS generation that skips the router", priority=LS,
                sampling=worker_pb2.SamplingParams(max_tokens=2, top_p=1.0)))
        return [e async for e in worker.Serve(commands(), metadata=metadata, timeout=10)]

    attempts = [
        lambda md: serve_one(md),
        lambda md: worker.ListPins(worker_pb2.ListWorkerPinsRequest(), metadata=md, timeout=10),
        lambda md: worker.SetPin(worker_pb2.SetPinRequest(program_id=program_key("tenant-a", "prog"),
                                                          ttl_s=float("inf")), metadata=md, timeout=10),
        lambda md: worker.ReleasePins(worker_pb2.ReleasePinsRequest(program_ids=["tenant-a/prog"]), metadata=md,
                                      timeout=10),
        lambda md: worker.Describe(worker_pb2.DescribeRequest(), metadata=md, timeout=10),
        lambda md: kvmanager.ListPins(kvmanager_pb2.ListPinsRequest(), metadata=md, timeout=10),
        lambda md: kvmanager.ReportTurn(kvmanager_pb2.TurnReport(program_id="p", worker=stack["worker_address"],
                                                                 context_tokens=10), metadata=md, timeout=10),
        lambda md: kvmanager.ReleasePin(kvmanager_pb2.ReleasePinRequest(program_id="p"), metadata=md, timeout=10),
        lambda md: predictor.ReportLatency(predictor_pb2.LatencyReport(), metadata=md, timeout=10),
        lambda md: predictor.ObserveToolCalls(predictor_pb2.ToolCallReport(), metadata=md, timeout=10),
        lambda md: predictor.EstimateTime(predictor_pb2.EstimateRequest(), metadata=md, timeout=10),
        lambda md: predictor.PredictToolDuration(predictor_pb2.ToolDurationRequest(tool_name="bash"), metadata=md,
                                                 timeout=10),
    ]
    before = (await stack["trusted_worker"].Describe(worker_pb2.DescribeRequest())).num_pins
    for attempt in attempts:
        for metadata in (None, wrong):
            details = await expect_status(lambda: attempt(metadata), grpc.StatusCode.UNAUTHENTICATED,
                                          "x-qllm-internal-token:")
            assert ("missing" if metadata is None else "wrong") in details
    # Nothing was run or changed, and the services still answer qllm's own callers.
    info = await stack["trusted_worker"].Describe(worker_pb2.DescribeRequest())
    assert info.num_pins == before and info.num_running == 0
    # RankLengths is public (DESIGN.md); health checking and reflection stay open.
    assert len((await predictor.RankLengths(predictor_pb2.RankRequest(prompts=["a", "b"]))).scores) == 2
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
    for name in ("worker", "kvmanager", "predictor"):
        reply = await health_pb2_grpc.HealthStub(stack["channels"][name]).Check(health_pb2.HealthCheckRequest())
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    reflection = reflection_pb2_grpc.ServerReflectionStub(stack["channels"]["worker"])

    async def list_services():
        yield reflection_pb2.ServerReflectionRequest(list_services="")
    answers = [a async for a in reflection.ServerReflectionInfo(list_services())]
    assert "qllm.v1.Worker" in {s.name for s in answers[0].list_services_response.service}
