"""`qllm kvmanager` builds its service before its event loop starts (serving.serve_forever runs it later):
the predictor channel must still work then, i.e. be opened on the loop that uses it."""

import asyncio
import socket

import grpc
import pytest

from kvmanager.server import build_service
from predictor.ranker import HeuristicRanker
from predictor.server import build_service as build_predictor
from qllm import serving
from qllm.v1 import kvmanager_pb2, kvmanager_pb2_grpc


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_service_built_outside_the_loop_reaches_the_predictor():
    predictor_port = _free_port()
    service = build_service("ttl", predictor=f"127.0.0.1:{predictor_port}", predictor_deadline_s=2.0,
                            workers=["127.0.0.1:1"])
    with pytest.raises(RuntimeError):  # built with no event loop running, as `qllm kvmanager` does
        asyncio.get_running_loop()

    async def main():
        p_service = build_predictor(HeuristicRanker())
        p_server, _ = await serving.start(p_service, "127.0.0.1", predictor_port)
        server, port = await serving.start(service, "127.0.0.1", 0)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = kvmanager_pb2_grpc.KVManagerStub(channel)
                for k in range(3):
                    decision = await stub.ReportTurn(kvmanager_pb2.TurnReport(
                        program_id="p", worker="127.0.0.1:1", context_tokens=3000, tool_name="bash",
                        turn_index=k, prev_tool_duration_s=0.5 if k else 0.0))
                    assert decision.reason
            estimator = service.servicer.estimator
            assert estimator.fallbacks == 0 and not estimator.down
        finally:
            await serving.stop(service, server)
            await serving.stop(p_service, p_server)

    asyncio.run(main())
