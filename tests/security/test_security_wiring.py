"""The services' --tls-* flags through qllm.serving, and the router's TLS/mTLS client side, end to end."""

import argparse

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kvmanager import server as kvmanager_server
from qllm import serving, tls
from qllm.v1 import kvmanager_pb2, kvmanager_pb2_grpc
from router.deps import KVManagerClient


def flags(certs, mutual: bool) -> argparse.Namespace:
    return argparse.Namespace(tls_cert=str(certs / "server.crt"), tls_key=str(certs / "server.key"),
                              tls_client_ca=str(certs / "ca.crt") if mutual else None)


@pytest.mark.parametrize("mutual", [False, True])
async def test_service_serves_tls_from_its_flags(certs, mutual):
    service = kvmanager_server.build_service(workers=["w:1"])
    server, port = await serving.start(service, "127.0.0.1", 0, 0, serving.credentials_from(flags(certs, mutual)))
    try:
        client_cert = (str(certs / "client.crt"), str(certs / "client.key")) if mutual else (None, None)
        creds = tls.channel_credentials(str(certs / "ca.crt"), *client_cert)
        async with tls.open_channel(f"localhost:{port}", creds) as channel:
            reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        # The router's own client to the kvmanager, with its CA (and certificate under mTLS).
        client = KVManagerClient(f"localhost:{port}", credentials=creds)
        decision = await client.report_turn(kvmanager_pb2.TurnReport(program_id="p", worker="w:1",
                                                                     context_tokens=10))
        assert decision is not None
        await client.close()
        async with grpc.aio.insecure_channel(f"localhost:{port}") as plain:
            with pytest.raises(grpc.aio.AioRpcError):
                await kvmanager_pb2_grpc.KVManagerStub(plain).ListPins(kvmanager_pb2.ListPinsRequest(), timeout=2)
        if mutual:  # no client certificate: refused
            async with tls.open_channel(f"localhost:{port}", tls.channel_credentials(str(certs / "ca.crt"))) as ch:
                with pytest.raises(grpc.aio.AioRpcError):
                    await kvmanager_pb2_grpc.KVManagerStub(ch).ListPins(kvmanager_pb2.ListPinsRequest(), timeout=2)
    finally:
        await serving.stop(service, server)


def test_no_tls_flags_is_plaintext():
    assert serving.credentials_from(argparse.Namespace()) is None
