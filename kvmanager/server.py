"""qllm.v1.KVManager over grpc.aio: a thin translation between the wire and `kvmanager.manager.PinManager`."""

from __future__ import annotations

import argparse
import time

import grpc
from prometheus_client import Counter, Gauge, Histogram

from kvmanager.ledger import Ledger, PinEntry
from kvmanager.manager import InvalidReport, PinManager
from kvmanager.ttl import DEFAULT_POLICY, POLICIES, ToolDurations, Turn, make_policy
from qllm import logs, serving, settings
from qllm.v1 import kvmanager_pb2, kvmanager_pb2_grpc

SERVICE_NAME = kvmanager_pb2.DESCRIPTOR.services_by_name["KVManager"].full_name
log = logs.get_logger(__name__)

REQUESTS = Counter("qllm_kvmanager_requests_total", "KVManager RPCs", ["rpc", "code"])
DECISIONS = Counter("qllm_kvmanager_decisions_total", "Pin decisions", ["pin", "reason"])
LATENCY = Histogram("qllm_kvmanager_latency_seconds", "KVManager RPC handling time", ["rpc"],
                    buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05))
PINS = Gauge("qllm_kvmanager_pins", "Live pins")
PINNED_TOKENS = Gauge("qllm_kvmanager_pinned_tokens", "Tokens held by live pins, all workers")


def _pin_pb(entry: PinEntry) -> kvmanager_pb2.Pin:
    return kvmanager_pb2.Pin(program_id=entry.program_id, worker=entry.worker, tokens=entry.tokens,
                             expires_at_unix_s=entry.expires_at)


class KVManagerServicer(kvmanager_pb2_grpc.KVManagerServicer):
    def __init__(self, manager: PinManager, clock=time.time):
        self.manager = manager
        self.clock = clock

    def _gauges(self) -> None:
        PINS.set(len(self.manager.ledger))
        PINNED_TOKENS.set(self.manager.ledger.pinned_tokens())

    async def ReportTurn(self, request: kvmanager_pb2.TurnReport, context: grpc.aio.ServicerContext):
        start = time.perf_counter()
        turn = Turn(program_id=request.program_id, worker=request.worker, context_tokens=request.context_tokens,
                    last_turn=request.last_turn, tool_name=request.tool_name, turn_index=request.turn_index)
        try:
            outcome = self.manager.report(turn, request.prev_tool_duration_s, self.clock())
        except InvalidReport as exc:
            REQUESTS.labels("ReportTurn", "INVALID_ARGUMENT").inc()
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        d = outcome.decision
        DECISIONS.labels(str(d.pin).lower(), d.reason).inc()
        REQUESTS.labels("ReportTurn", "OK").inc()
        self._gauges()
        LATENCY.labels("ReportTurn").observe(time.perf_counter() - start)
        log.debug("turn", program_id=turn.program_id, worker=turn.worker, tool=turn.tool_name, pin=d.pin,
                  ttl_s=d.ttl_s, reason=d.reason)
        return kvmanager_pb2.PinDecision(pin=d.pin, ttl_s=d.ttl_s, reason=d.reason,
                                         expires_at_unix_s=outcome.expires_at)

    async def ListPins(self, request: kvmanager_pb2.ListPinsRequest, context: grpc.aio.ServicerContext):
        start = time.perf_counter()
        pins = self.manager.pins(self.clock(), request.worker or None)
        REQUESTS.labels("ListPins", "OK").inc()
        self._gauges()
        LATENCY.labels("ListPins").observe(time.perf_counter() - start)
        return kvmanager_pb2.ListPinsResponse(pins=[_pin_pb(e) for e in pins])

    async def ReleasePin(self, request: kvmanager_pb2.ReleasePinRequest, context: grpc.aio.ServicerContext):
        if not request.program_id:
            REQUESTS.labels("ReleasePin", "INVALID_ARGUMENT").inc()
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "program_id: must not be empty")
        released = self.manager.release(request.program_id)
        REQUESTS.labels("ReleasePin", "OK").inc()
        self._gauges()
        return kvmanager_pb2.ReleasePinResponse(released=released)


def build_service(policy: str = DEFAULT_POLICY, ttl_s: float = 2.0, max_tokens_per_worker: int = 0,
                  pin_unknown_tools: bool = True, clock=time.time) -> serving.Service:
    manager = PinManager(make_policy(policy, ttl_s=ttl_s, pin_unknown=pin_unknown_tools),
                         Ledger(max_tokens_per_worker=max_tokens_per_worker), ToolDurations())
    servicer = KVManagerServicer(manager, clock)

    def register(server: grpc.aio.Server) -> None:
        kvmanager_pb2_grpc.add_KVManagerServicer_to_server(servicer, server)

    service = serving.Service(name="kvmanager", service_names=[SERVICE_NAME], register=register)
    service.servicer = servicer  # for tests and embedding
    return service


def configure_parser(parser: argparse.ArgumentParser) -> None:
    settings.add_service_flags(parser, port=50081, metrics_port=9181)
    settings.add(parser, "--pin-policy", default=DEFAULT_POLICY, choices=list(POLICIES),
                 help="how the KV of a finished agent turn is pinned")
    settings.add(parser, "--pin-ttl-s", type=float, default=2.0, help="TTL of a pin (fixed-ttl)")
    settings.add(parser, "--max-pinned-tokens-per-worker", type=int, default=0,
                 help="refuse pins over this many tokens per worker (0 = unlimited)")
    settings.add(parser, "--pin-unknown-tools", type=bool, default=True,
                 help="pin when the next tool has no observed duration yet")


def run(args: argparse.Namespace):
    logs.configure("kvmanager", args.log_level)
    service = build_service(args.pin_policy, args.pin_ttl_s, args.max_pinned_tokens_per_worker,
                            args.pin_unknown_tools)
    log.info("config", pin_policy=args.pin_policy, pin_ttl_s=args.pin_ttl_s,
             max_pinned_tokens_per_worker=args.max_pinned_tokens_per_worker)
    return serving.serve_forever(service, args.host, args.port, args.metrics_port,
                                   serving.credentials_from(args))
