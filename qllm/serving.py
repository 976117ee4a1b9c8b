"""The part every qllm service shares: a grpc.aio server with health checking, reflection, Prometheus
metrics over HTTP, and a graceful stop on SIGINT/SIGTERM (health NOT_SERVING first, then drain).

Two server interceptors run before every servicer: the internal-token check of the service's internal
methods (qllm/internal_auth.py, when the service has a token) and the decode guard that answers
undecodable requests with INVALID_ARGUMENT (qllm/decoding.py)."""

from __future__ import annotations

import asyncio
import signal
from dataclasses import dataclass, field
from typing import Awaitable, Callable, Sequence

import grpc
from google.protobuf import descriptor_pool
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import start_http_server

from qllm import tls
from qllm.decoding import DecodeGuard
from qllm.internal_auth import InternalAuthInterceptor, InternalToken
from qllm.logs import get_logger

log = get_logger(__name__)

# Messages up to 64 MiB: a prompt may be long, and the server rejects oversized prompts itself with a
# clear INVALID_ARGUMENT rather than a transport error.
GRPC_OPTIONS = [
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    # As a server: accept the peers' keepalive pings (every 20 s, idle or not) and their flow-control probes
    # on long-lived streams (the router's worker streams). gRPC's default expects at most one ping per 5
    # minutes without data and answers more with a GOAWAY (too_many_pings), which dropped those streams; the
    # services' peers are qllm's own, so ping strikes are not counted.
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
    ("grpc.http2.max_ping_strikes", 0),
]


@dataclass
class Service:
    """What one qllm process serves: its full proto service names and a callback that adds servicers."""

    name: str
    service_names: Sequence[str]
    register: Callable[[grpc.aio.Server], None]
    on_start: Callable[[], Awaitable[None]] | None = None
    on_stop: Callable[[], Awaitable[None]] | None = None
    # Called once health says NOT_SERVING and before the server stops: a service that holds long-lived
    # streams (the worker) stops taking new work on them here and ends them once their work is done.
    on_drain: Callable[[], Awaitable[None]] | None = None
    grace_s: float = 5.0
    health: health.aio.HealthServicer = field(default_factory=health.aio.HealthServicer)
    # Set: the methods of `service_names` need this internal token (qllm/internal_auth.py), except those in
    # `public_methods` (full names, "/qllm.v1.Predictor/RankLengths"). Health and reflection stay open.
    internal_token: InternalToken | None = None
    public_methods: frozenset[str] = frozenset()

    def is_internal(self, method: str) -> bool:
        return method not in self.public_methods and any(method.startswith(f"/{name}/")
                                                         for name in self.service_names)


def _internal_methods(service: Service) -> list[str]:
    pool = descriptor_pool.Default()
    methods = []
    for name in service.service_names:
        try:
            methods += [f"/{name}/{m.name}" for m in pool.FindServiceByName(name).methods]
        except KeyError:
            continue
    return [m for m in methods if service.is_internal(m)]


def all_methods(service_descriptor) -> frozenset[str]:
    """The full method names of a proto service (for `Service.public_methods`)."""
    return frozenset(f"/{service_descriptor.full_name}/{m.name}" for m in service_descriptor.methods)


def credentials_from(args) -> grpc.ServerCredentials | None:
    """TLS server credentials from a service's --tls-* flags (None = plaintext); files are re-read on
    rotation."""
    return tls.server_credentials(getattr(args, "tls_cert", None), getattr(args, "tls_key", None),
                                  getattr(args, "tls_client_ca", None), reload=True)


def client_credentials_from(args) -> grpc.ChannelCredentials | None:
    """TLS credentials for the calls a service makes, from its --tls-ca (and --tls-cert/--tls-key as the
    client certificate); None = plaintext."""
    if not getattr(args, "tls_ca", None):
        return None
    return tls.channel_credentials(args.tls_ca, getattr(args, "tls_cert", None), getattr(args, "tls_key", None))


async def start(service: Service, host: str, port: int, metrics_port: int = 0,
                credentials: grpc.ServerCredentials | None = None) -> tuple[grpc.aio.Server, int]:
    """Starts the server and returns it with the port it bound (port 0 picks a free one); TLS when
    credentials are given."""
    interceptors = [DecodeGuard()]
    if service.internal_token is not None:
        interceptors.insert(0, InternalAuthInterceptor(service.internal_token, service.is_internal))
    elif _internal_methods(service):
        log.warning("NO INTERNAL TOKEN: this service's internal RPCs accept any caller; set "
                    "--internal-token-file / QLLM_INTERNAL_TOKEN_FILE (qllm up and deploy/ do)", service=service.name)
    server = grpc.aio.server(options=GRPC_OPTIONS, interceptors=interceptors)
    service.register(server)
    health_pb2_grpc.add_HealthServicer_to_server(service.health, server)
    names = [*service.service_names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
             reflection.SERVICE_NAME]
    reflection.enable_server_reflection(names, server)
    bound = tls.add_port(server, f"{host}:{port}", credentials)
    if bound == 0:
        raise RuntimeError(f"could not bind {host}:{port}")
    if service.on_start is not None:
        await service.on_start()
    await server.start()
    for name in ("", *service.service_names):
        await service.health.set(name, health_pb2.HealthCheckResponse.SERVING)
    if metrics_port:
        start_http_server(metrics_port, addr=host)
    log.info("listening", service=service.name, address=f"{host}:{bound}", metrics_port=metrics_port or None,
             tls=credentials is not None, internal_token=service.internal_token is not None)
    return server, bound


async def stop(service: Service, server: grpc.aio.Server) -> None:
    """Stops admitting (health NOT_SERVING), lets in-flight calls finish within the grace period, then stops."""
    for name in ("", *service.service_names):
        await service.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    if service.on_drain is not None:
        await service.on_drain()
    await server.stop(service.grace_s)
    if service.on_stop is not None:
        await service.on_stop()
    log.info("stopped", service=service.name)


async def serve_forever(service: Service, host: str, port: int, metrics_port: int = 0,
                        credentials: grpc.ServerCredentials | None = None) -> None:
    server, _ = await start(service, host, port, metrics_port, credentials)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stopping.set)
    await stopping.wait()
    await stop(service, server)
