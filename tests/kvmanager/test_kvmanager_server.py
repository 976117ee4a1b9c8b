"""In-process grpc test of qllm.v1.KVManager: real server on a free port, grpc.aio client."""

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from kvmanager.server import SERVICE_NAME, build_service
from qllm import serving
from qllm.v1 import kvmanager_pb2, kvmanager_pb2_grpc


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


@pytest.fixture
async def stack():
    clock = Clock()
    service = build_service(policy="fixed-ttl", clock=clock)
    server, port = await serving.start(service, "127.0.0.1", 0)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    yield channel, clock
    await channel.close()
    await serving.stop(service, server)


async def test_report_list_release(stack):
    channel, clock = stack
    stub = kvmanager_pb2_grpc.KVManagerStub(channel)
    d = await stub.ReportTurn(kvmanager_pb2.TurnReport(program_id="p1", worker="w0", context_tokens=512,
                                                       tool_name="ls", turn_index=0))
    assert d.pin and d.ttl_s == 2.0 and d.expires_at_unix_s == pytest.approx(1002.0)
    await stub.ReportTurn(kvmanager_pb2.TurnReport(program_id="p2", worker="w1", context_tokens=64))
    pins = (await stub.ListPins(kvmanager_pb2.ListPinsRequest())).pins
    assert {(p.program_id, p.worker, p.tokens) for p in pins} == {("p1", "w0", 512), ("p2", "w1", 64)}
    pins = (await stub.ListPins(kvmanager_pb2.ListPinsRequest(worker="w1"))).pins
    assert [p.program_id for p in pins] == ["p2"]
    assert (await stub.ReleasePin(kvmanager_pb2.ReleasePinRequest(program_id="p2"))).released
    clock.now += 2.5  # p1's pin lapses
    assert len((await stub.ListPins(kvmanager_pb2.ListPinsRequest())).pins) == 0
    d = await stub.ReportTurn(kvmanager_pb2.TurnReport(program_id="p1", worker="w0", last_turn=True,
                                                       prev_tool_duration_s=0.4))
    assert not d.pin and d.reason == "last_turn"


async def test_bad_input_is_invalid_argument(stack):
    channel, _ = stack
    stub = kvmanager_pb2_grpc.KVManagerStub(channel)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.ReportTurn(kvmanager_pb2.TurnReport(worker="w0"))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "program_id" in err.value.details()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.ReportTurn(kvmanager_pb2.TurnReport(program_id="p", worker="w0", prev_tool_duration_s=-1))
    assert "prev_tool_duration_s" in err.value.details()
    # the service is still up
    assert len((await stub.ListPins(kvmanager_pb2.ListPinsRequest())).pins) == 0


async def test_health_and_reflection(stack):
    channel, _ = stack
    health = health_pb2_grpc.HealthStub(channel)
    reply = await health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME))
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    refl = reflection_pb2_grpc.ServerReflectionStub(channel)
    call = refl.ServerReflectionInfo()
    await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
    reply = await call.read()
    await call.done_writing()
    names = [s.name for s in reply.list_services_response.service]
    assert SERVICE_NAME == "qllm.v1.KVManager" and SERVICE_NAME in names
