"""qllm.security wired into a real grpc.aio handler, as the router would: metadata in, status codes out."""

from __future__ import annotations

import json

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from qllm.security import AuthError, RateLimiter, hash_key, load_key_file

KEYS = {"ls-user": "qllm_ls", "be-user": "qllm_be"}


class GuardedHealth(health.aio.HealthServicer):
    """Check() guarded like Router/Generate: authenticate, rate limit, then the priority (from the service
    name here, for the test's sake)."""

    def __init__(self, keyring, limiter):
        super().__init__()
        self.keyring = keyring
        self.limiter = limiter

    async def Check(self, request, context):
        try:
            tenant = self.keyring.authenticate(context.invocation_metadata())
            self.limiter.check(tenant)
            tenant.check_priority(request.service or "BE")
        except AuthError as err:
            await context.abort(grpc.StatusCode[err.code], err.message)
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)


@pytest.fixture
async def stub(tmp_path):
    path = tmp_path / "keys.json"
    path.write_text(json.dumps({
        "tenants": {"ls-user": {"priorities": ["LS", "BE"]},
                    "be-user": {"priorities": ["BE"], "rate_limit": {"requests_per_s": 0.001, "burst": 2}}},
        "keys": [{"tenant": t, "sha256": hash_key(k)} for t, k in KEYS.items()],
    }))
    server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(GuardedHealth(load_key_file(path), RateLimiter()), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    yield health_pb2_grpc.HealthStub(channel)
    await channel.close()
    await server.stop(None)


async def call(stub, priority: str, key: str | None):
    metadata = [("authorization", f"Bearer {key}")] if key else None
    return await stub.Check(health_pb2.HealthCheckRequest(service=priority), metadata=metadata, timeout=10)


async def expect(stub, priority, key, code: grpc.StatusCode, needle: str):
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call(stub, priority, key)
    assert err.value.code() == code and needle in err.value.details(), err.value.details()


async def test_status_codes_over_grpc(stub):
    assert (await call(stub, "LS", KEYS["ls-user"])).status == health_pb2.HealthCheckResponse.SERVING
    await expect(stub, "LS", None, grpc.StatusCode.UNAUTHENTICATED, "authorization: missing")
    await expect(stub, "LS", "qllm_wrong", grpc.StatusCode.UNAUTHENTICATED, "unknown API key")
    await expect(stub, "LS", KEYS["be-user"], grpc.StatusCode.PERMISSION_DENIED, "priority: ")  # uses a token
    assert (await call(stub, "BE", KEYS["be-user"])).status == health_pb2.HealthCheckResponse.SERVING
    # The burst of 2 is spent: refused at once rather than queued.
    await expect(stub, "BE", KEYS["be-user"], grpc.StatusCode.RESOURCE_EXHAUSTED, "rate limit: tenant 'be-user'")
    # Other tenants are not affected.
    assert (await call(stub, "BE", KEYS["ls-user"])).status == health_pb2.HealthCheckResponse.SERVING
