"""qllm.tls: TLS and mutual TLS over a real grpc.aio server and client (health checks)."""

from __future__ import annotations

import os
import shutil

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from qllm import tls
from qllm.tls import TLSConfigError, channel_credentials, server_credentials

TIMEOUT = 10.0


async def start_server(creds):
    server = grpc.aio.server()
    servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    await servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    port = tls.add_port(server, "127.0.0.1:0", creds)
    assert port > 0
    await server.start()
    return server, port


async def check(port: int, creds, server_name: str | None = None) -> int:
    # A local subchannel pool: no connection is shared between the test's channels.
    options = [("grpc.use_local_subchannel_pool", 1)]
    async with tls.open_channel(f"127.0.0.1:{port}", creds, options, server_name=server_name) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=TIMEOUT)
        return reply.status


async def refused(port: int, creds, server_name: str | None = None) -> grpc.StatusCode:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await check(port, creds, server_name)
    return err.value.code()


def test_nothing_configured_means_plaintext():
    assert server_credentials(None, None) is None
    assert server_credentials("", "") is None
    assert channel_credentials() is None
    assert channel_credentials(None, None, None) is None


def test_inconsistent_settings_name_the_flag(certs):
    cases = [
        (lambda: server_credentials(None, None, certs / "ca.crt"), "--tls-client-ca:"),
        (lambda: server_credentials(certs / "server.crt", None), "--tls-key:"),
        (lambda: server_credentials(None, certs / "server.key"), "--tls-cert:"),
        (lambda: server_credentials(certs / "server.key", certs / "server.key"), "--tls-cert:"),  # key as cert
        (lambda: server_credentials(certs / "server.crt", certs / "server.crt"), "--tls-key:"),  # cert as key
        (lambda: server_credentials(certs / "server.crt", certs / "server.key", certs / "nope.crt"),
         "--tls-client-ca:"),
        (lambda: channel_credentials(certs / "ca.crt", certs / "client.crt"), "--tls-cert:"),
        (lambda: channel_credentials(None, certs / "client.crt", certs / "client.key"), "--tls-ca:"),
        (lambda: channel_credentials(certs / "absent.crt"), "--tls-ca:"),
    ]
    for make, flag in cases:
        with pytest.raises(TLSConfigError) as err:
            make()
        assert str(err.value).startswith(flag), str(err.value)
    # The system trust store needs no file.
    assert channel_credentials("system") is not None


async def test_tls_health_check(certs, other_certs):
    server, port = await start_server(server_credentials(certs / "server.crt", certs / "server.key"))
    try:
        ok = channel_credentials(certs / "ca.crt")
        assert await check(port, ok) == health_pb2.HealthCheckResponse.SERVING
        # A client may present a certificate even when the server does not ask for one.
        with_cert = channel_credentials(certs / "ca.crt", certs / "client.crt", certs / "client.key")
        assert await check(port, with_cert) == health_pb2.HealthCheckResponse.SERVING
        # Plaintext against a TLS port, and a client that does not trust the server's CA, both fail.
        assert await refused(port, None) == grpc.StatusCode.UNAVAILABLE
        assert await refused(port, channel_credentials(other_certs / "ca.crt")) == grpc.StatusCode.UNAVAILABLE
        assert await refused(port, channel_credentials("system")) == grpc.StatusCode.UNAVAILABLE
    finally:
        await server.stop(None)


async def test_mutual_tls(certs, other_certs):
    creds = server_credentials(certs / "server.crt", certs / "server.key", client_ca=certs / "ca.crt")
    server, port = await start_server(creds)
    try:
        client = channel_credentials(certs / "ca.crt", certs / "client.crt", certs / "client.key")
        assert await check(port, client) == health_pb2.HealthCheckResponse.SERVING
        # The server certificate carries clientAuth too, so a service may use it to dial its peers.
        peer = channel_credentials(certs / "ca.crt", certs / "server.crt", certs / "server.key")
        assert await check(port, peer) == health_pb2.HealthCheckResponse.SERVING
        # No client certificate: refused.
        assert await refused(port, channel_credentials(certs / "ca.crt")) == grpc.StatusCode.UNAVAILABLE
        # A client certificate from another CA: refused.
        stranger = channel_credentials(certs / "ca.crt", other_certs / "client.crt", other_certs / "client.key")
        assert await refused(port, stranger) == grpc.StatusCode.UNAVAILABLE
        # Plaintext: refused.
        assert await refused(port, None) == grpc.StatusCode.UNAVAILABLE
        # A client that trusts only another CA refuses the server.
        wrong_ca = channel_credentials(other_certs / "ca.crt", certs / "client.crt", certs / "client.key")
        assert await refused(port, wrong_ca) == grpc.StatusCode.UNAVAILABLE
    finally:
        await server.stop(None)


async def test_server_name_override(make_pki):
    pki = make_pki("DNS:qllm-router.qllm.svc.cluster.local")  # no IP SAN: dialling 127.0.0.1 does not match
    server, port = await start_server(server_credentials(pki / "server.crt", pki / "server.key"))
    try:
        creds = channel_credentials(pki / "ca.crt")
        assert await refused(port, creds) == grpc.StatusCode.UNAVAILABLE
        assert await check(port, creds, server_name="qllm-router.qllm.svc.cluster.local") == \
            health_pb2.HealthCheckResponse.SERVING
    finally:
        await server.stop(None)


async def test_reload_picks_up_rotated_certificates(tmp_path, certs, other_certs):
    live = tmp_path / "live"
    live.mkdir()
    for name in ("server.crt", "server.key", "ca.crt"):
        shutil.copy(certs / name, live / name)
    creds = server_credentials(live / "server.crt", live / "server.key", client_ca=live / "ca.crt", reload=True)
    server, port = await start_server(creds)
    old = channel_credentials(certs / "ca.crt", certs / "client.crt", certs / "client.key")
    new = channel_credentials(other_certs / "ca.crt", other_certs / "client.crt", other_certs / "client.key")
    try:
        assert await check(port, old) == health_pb2.HealthCheckResponse.SERVING
        assert await refused(port, new) == grpc.StatusCode.UNAVAILABLE
        assert creds.reloader.reloads == 0

        # A half-written rotation (a key that is not PEM) keeps the previous set in service.
        (live / "server.key").write_text("rotating...")
        assert await check(port, old) == health_pb2.HealthCheckResponse.SERVING
        assert creds.reloader.failures >= 1

        # Rotate to the other CA, as a Secret update would: the next connection uses the new files.
        for name in ("server.crt", "server.key", "ca.crt"):
            tmp = live / f".{name}.tmp"
            shutil.copy(other_certs / name, tmp)
            os.replace(tmp, live / name)
        assert await check(port, new) == health_pb2.HealthCheckResponse.SERVING
        assert await refused(port, old) == grpc.StatusCode.UNAVAILABLE
        assert creds.reloader.reloads == 1
    finally:
        await server.stop(None)
