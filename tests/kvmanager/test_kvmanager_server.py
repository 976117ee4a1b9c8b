"""In-process grpc tests of qllm.v1.KVManager: a real kvmanager server, a fake Worker servicer for the pin
RPCs it calls, and a real (or a dead) predictor."""

import math
import socket

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from kvmanager.server import SERVICE_NAME, build_service
from predictor.ranker import HeuristicRanker
from predictor.server import build_service as build_predictor
from qllm import serving
from qllm.v1 import kvmanager_pb2, kvmanager_pb2_grpc, worker_pb2, worker_pb2_grpc


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


class FakeWorker(worker_pb2_grpc.WorkerServicer):
    """The pin side of a worker: records SetPin / ReleasePins, answers Describe with set figures."""

    def __init__(self, capacity=100_000, free=100_000):
        self.capacity, self.free = capacity, free
        self.set_pins: list[tuple[str, float, float]] = []
        self.released: list[list[str]] = []
        self.not_held: set[str] = set()
        self.describes = 0

    async def SetPin(self, request, context):
        self.set_pins.append((request.program_id, request.ttl_s, request.keep_score))
        held = request.program_id not in self.not_held and request.ttl_s > 0
        return worker_pb2.SetPinResponse(held=held, tokens=100 if held else 0)

    async def ReleasePins(self, request, context):
        self.released.append(list(request.program_ids))
        return worker_pb2.ReleasePinsResponse(released=len(request.program_ids))

    async def Describe(self, request, context):
        self.describes += 1
        return worker_pb2.WorkerInfo(kv_capacity_tokens=self.capacity, kv_free_tokens=self.free)


async def _serve(register):
    server = grpc.aio.server()
    register(server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"


def _dead_address() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


class Stack:
    def __init__(self, policy="ttl", predictor="none", **kwargs):
        self.policy, self.predictor_mode, self.kwargs = policy, predictor, kwargs
        self.clock = Clock()
        self.worker = FakeWorker()
        # Addresses with nothing behind them that the kvmanager is configured with (a worker that is down).
        self.extra_workers = [_dead_address() for _ in range(2)]

    async def __aenter__(self):
        self.worker_server, self.worker_address = await _serve(
            lambda s: worker_pb2_grpc.add_WorkerServicer_to_server(self.worker, s))
        self.predictor_service = None
        address = ""
        if self.predictor_mode == "up":
            self.predictor_service = build_predictor(HeuristicRanker())
            self.predictor_server, port = await serving.start(self.predictor_service, "127.0.0.1", 0)
            address = f"127.0.0.1:{port}"
        elif self.predictor_mode == "down":
            address = _dead_address()
        self.service = build_service(self.policy, clock=self.clock, predictor=address, maintain_interval_s=0,
                                     **{"workers": [self.worker_address, *self.extra_workers], **self.kwargs})
        self.server, port = await serving.start(self.service, "127.0.0.1", 0)
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        self.stub = kvmanager_pb2_grpc.KVManagerStub(self.channel)
        self.servicer = self.service.servicer
        return self

    async def __aexit__(self, *exc):
        await self.channel.close()
        await serving.stop(self.service, self.server)
        if self.predictor_service is not None:
            await serving.stop(self.predictor_service, self.predictor_server)
        await self.worker_server.stop(0)

    async def report(self, program_id, tool="ls", tokens=2000, idx=0, prev=0.0, last=False, worker=None):
        decision = await self.stub.ReportTurn(kvmanager_pb2.TurnReport(
            program_id=program_id, worker=worker or self.worker_address, context_tokens=tokens, tool_name=tool,
            turn_index=idx, prev_tool_duration_s=prev, last_turn=last))
        await self.servicer.settle()
        return decision

    async def teach(self, tool, durations):
        """Programs whose tool `tool` took each of `durations` (learned from the gaps reported)."""
        for i, d in enumerate(durations):
            await self.report(f"teach-{tool}-{i}", tool=tool, idx=0)
            await self.report(f"teach-{tool}-{i}", tool="", idx=1, prev=d, last=True)

    async def pins(self):
        return {p.program_id: p for p in (await self.stub.ListPins(kvmanager_pb2.ListPinsRequest())).pins}


async def test_fixed_ttl_report_list_release():
    async with Stack("fixed-ttl") as s:
        d = await s.report("p1", tool="ls", tokens=512)
        assert d.pin and d.ttl_s == 2.0 and d.expires_at_unix_s == pytest.approx(1002.0)
        assert s.worker.set_pins[-1][:2] == ("p1", 2.0)
        await s.report("p2", tool="", tokens=64)
        pins = await s.pins()
        assert {(p.program_id, p.tokens) for p in pins.values()} == {("p1", 512), ("p2", 64)}
        assert (await s.stub.ReleasePin(kvmanager_pb2.ReleasePinRequest(program_id="p2"))).released
        await s.servicer.settle()
        assert s.worker.released[-1] == ["p2"]
        s.clock.now += 2.5  # p1's pin lapses
        assert await s.pins() == {}
        d = await s.report("p1", tool="", last=True, prev=0.4)
        assert not d.pin and d.reason == "last_turn"


async def test_ttl_sets_the_decided_ttl_on_the_worker_and_frees_no_pins():
    async with Stack("ttl", predictor="up") as s:
        await s.teach("pytest", [8.0 + 0.01 * i for i in range(30)])
        d = await s.report("p", tool="pytest", tokens=4000)
        assert d.pin and d.reason == "ttl" and 8.3 < d.ttl_s < 10.0 and d.keep_score > 0.5
        assert s.worker.set_pins[-1] == ("p", pytest.approx(d.ttl_s), pytest.approx(d.keep_score))
        assert d.expires_at_unix_s == pytest.approx(s.clock.now + d.ttl_s)
        # the predictor learned the durations (through ObserveToolCalls)
        assert s.predictor_service.servicer.tool_durations.count("pytest") == 30
        # a context too cheap to recompute: SetPin with ttl 0 frees the worker's provisional pin at once
        d = await s.report("q", tool="pytest", tokens=20)
        assert not d.pin and d.reason == "cheap_context"
        assert s.worker.set_pins[-1][:2] == ("q", 0.0)


async def test_no_pin_frees_every_turn_and_pin_forever_pins_without_ttl():
    async with Stack("no-pin") as s:
        assert not (await s.report("p")).pin
        assert s.worker.set_pins == [("p", 0.0, 0.0)]
    async with Stack("pin-forever") as s:
        d = await s.report("p")
        assert d.pin and math.isinf(d.ttl_s) and math.isinf(s.worker.set_pins[-1][1])
        s.clock.now += 1e6
        assert (await s.servicer.maintain_once(describe=True))["expired"] == []


async def test_expired_pins_are_released_on_their_worker():
    async with Stack("fixed-ttl") as s:
        await s.report("a")
        s.clock.now += 1.0
        await s.report("b")
        s.clock.now += 1.5  # a lapsed (at +2), b not (at +3)
        dropped = await s.servicer.maintain_once()
        assert [e.program_id for e in dropped["expired"]] == ["a"]
        assert s.worker.released == [["a"]]
        assert set(await s.pins()) == {"b"}


async def test_pressure_unpins_the_least_likely_to_return_first():
    async with Stack("ttl") as s:
        await s.teach("ls", [0.5] * 30)
        await s.teach("search", [1.0 + 2 * i for i in range(30)])  # 1 s to 60 s
        for pid, tool in (("s1", "search"), ("l1", "ls"), ("s2", "search"), ("l2", "ls")):
            assert (await s.report(pid, tool=tool, tokens=2000)).pin
        s.clock.now += 5.0  # the ls programs would be back by now if they were coming
        s.worker.capacity, s.worker.free = 6_000, 3_000  # budget: 0.9 x 6000 = 5400, 2600 under 8000 pinned
        dropped = await s.servicer.maintain_once(describe=True)
        assert sorted(e.program_id for e in dropped["pressure"]) == ["l1", "l2"]
        assert sorted(s.worker.released[-1]) == ["l1", "l2"]
        assert set(await s.pins()) == {"s1", "s2"}


async def test_a_pin_the_worker_does_not_hold_is_dropped():
    async with Stack("fixed-ttl") as s:
        s.worker.not_held.add("gone")
        assert (await s.report("gone")).pin
        assert await s.pins() == {}
        await s.report("kept")
        assert set(await s.pins()) == {"kept"}


async def test_predictor_down_or_worker_down_still_answers():
    async with Stack("ttl", predictor="down", predictor_deadline_s=0.5) as s:
        await s.teach("ls", [0.5] * 5)
        d = await s.report("p", tool="ls")
        assert d.pin and d.reason == "ttl"
        assert s.servicer.estimator.down and s.servicer.estimator.fallbacks > 0
        d = await s.report("w", tool="ls", worker=s.extra_workers[0])
        assert d.pin  # the worker call fails in the background; the decision stands
        assert s.servicer.workers.failures >= 1


async def test_program_moving_worker_frees_its_old_pin():
    async with Stack("fixed-ttl") as s:
        await s.report("p", idx=0)
        other = s.extra_workers[1]
        await s.report("p", idx=1, prev=0.3, worker=other)
        assert s.worker.released == [["p"]]
        assert [p.worker for p in (await s.pins()).values()] == [other]


async def test_a_worker_address_it_was_not_configured_with_is_refused_and_never_called():
    """Issue 16 (server-side request forgery): ReportTurn took the worker address from the request and
    connected to it. An address outside the kvmanager's --workers is now INVALID_ARGUMENT naming `worker`,
    and nothing connects to it."""
    trap = FakeWorker()
    trap_server, trap_address = await _serve(lambda s: worker_pb2_grpc.add_WorkerServicer_to_server(trap, s))
    try:
        async with Stack("pin-forever") as s:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await s.report("p", worker=trap_address)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert err.value.details().startswith("worker:") and trap_address in err.value.details()
            d = await s.report("p")                       # a configured worker is still served
            assert d.pin and s.worker.set_pins[-1][0] == "p"
            await s.servicer.maintain_once(describe=True)
            assert await s.pins() == {"p": (await s.pins())["p"]}
        assert trap.set_pins == [] and trap.released == [] and trap.describes == 0
    finally:
        await trap_server.stop(0)


async def test_known_workers_come_from_configuration_and_dns_only():
    from kvmanager.workers import KnownWorkers
    from qllm.targets import Targets

    known = KnownWorkers(Targets(["10.0.0.7:50061", "dns:///localhost:50061"]), min_refresh_s=0.0)
    await known.start()
    try:
        assert await known.knows("10.0.0.7:50061") and await known.knows("127.0.0.1:50061")
        assert not await known.knows("127.0.0.1:50062") and not await known.knows("169.254.169.254:80")
    finally:
        await known.stop()


async def test_bad_input_is_invalid_argument():
    async with Stack("ttl") as s:
        for report, field in [(kvmanager_pb2.TurnReport(worker="w0"), "program_id"),
                              (kvmanager_pb2.TurnReport(program_id="p", worker="w0", prev_tool_duration_s=-1),
                               "prev_tool_duration_s"),
                              (kvmanager_pb2.TurnReport(program_id="p"), "worker")]:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await s.stub.ReportTurn(report)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and field in err.value.details()
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await s.stub.ReleasePin(kvmanager_pb2.ReleasePinRequest())
        assert "program_id" in err.value.details()
        assert await s.pins() == {}  # the service is still up


async def test_health_and_reflection():
    async with Stack("ttl") as s:
        reply = await health_pb2_grpc.HealthStub(s.channel).Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        call = reflection_pb2_grpc.ServerReflectionStub(s.channel).ServerReflectionInfo()
        await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
        reply = await call.read()
        await call.done_writing()
        assert SERVICE_NAME == "qllm.v1.KVManager"
        assert SERVICE_NAME in [x.name for x in reply.list_services_response.service]
