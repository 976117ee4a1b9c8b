"""qllm.v1.KVManager over grpc.aio: translates between the wire and `kvmanager.manager.PinManager`, and
carries its decisions out on the workers.

ReportTurn answers as soon as the policy has decided (one deadline-bound predictor call on the way, local
fallback); telling the worker (SetPin, ReleasePins of pins the decision dropped) runs after the answer, in
the background. A maintenance loop frees lapsed pins on their workers, refreshes each worker's KV capacity
and free memory (Describe; the pin budget is a fraction of the capacity unless a flag sets it) and unpins
the pins least likely to return first where a worker's pins exceed its budget.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import time
from collections import OrderedDict, defaultdict
from typing import Sequence

import grpc
from prometheus_client import Counter, Gauge, Histogram

from kvmanager.continuation import ContinuationModel
from kvmanager.estimates import NOT_NEEDED, PredictorEstimator
from kvmanager.ledger import Ledger, PinEntry
from kvmanager.manager import InvalidReport, Outcome, PinManager, validate
from kvmanager.ttl import DEFAULT_POLICY, POLICIES, TTLParams, Turn, make_policy
from kvmanager.workers import KnownWorkers, WorkerPins
from qllm import internal_auth, logs, serving, settings
from qllm.internal_auth import InternalToken
from qllm.targets import Targets
from qllm.v1 import kvmanager_pb2, kvmanager_pb2_grpc

SERVICE_NAME = kvmanager_pb2.DESCRIPTOR.services_by_name["KVManager"].full_name
log = logs.get_logger(__name__)

REQUESTS = Counter("qllm_kvmanager_requests_total", "KVManager RPCs", ["rpc", "code"])
DECISIONS = Counter("qllm_kvmanager_decisions_total", "Pin decisions", ["pin", "reason"])
LATENCY = Histogram("qllm_kvmanager_latency_seconds", "KVManager RPC handling time", ["rpc"],
                    buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.1))
PINS = Gauge("qllm_kvmanager_pins", "Live pins")
PINNED_TOKENS = Gauge("qllm_kvmanager_pinned_tokens", "Tokens held by live pins, all workers")
WORKER_PINNED_TOKENS = Gauge("qllm_kvmanager_worker_pinned_tokens", "Tokens held by live pins on a worker",
                             ["worker"])
WORKER_PIN_BUDGET = Gauge("qllm_kvmanager_worker_pin_budget_tokens", "Pin budget of a worker (0 = unlimited)",
                          ["worker"])
RELEASES = Counter("qllm_kvmanager_releases_total", "Pins dropped from the ledger", ["reason"])
ESTIMATES = Counter("qllm_kvmanager_estimates_total", "Tool-duration estimates by source", ["source"])
PIN_HITS = Counter("qllm_kvmanager_pin_hits_total", "Turns whose prompt reused a pin")
REUSED_TOKENS = Counter("qllm_kvmanager_reused_tokens_total", "Prompt tokens served from pins")
TTL = Histogram("qllm_kvmanager_ttl_seconds", "TTL of the pins set",
                buckets=(0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128, 300, 600, 3600, math.inf))


def _pin_pb(entry: PinEntry) -> kvmanager_pb2.Pin:
    return kvmanager_pb2.Pin(program_id=entry.program_id, worker=entry.worker, tokens=entry.tokens,
                             expires_at_unix_s=entry.expires_at, keep_score=entry.keep_score)


class KVManagerServicer(kvmanager_pb2_grpc.KVManagerServicer):
    def __init__(self, manager: PinManager, estimator: PredictorEstimator | None = None,
                 workers: WorkerPins | None = None, clock=time.time, maintain_interval_s: float = 0.5,
                 describe_interval_s: float = 2.0, max_known_workers: int = 1024,
                 known_workers: KnownWorkers | None = None):
        self.manager = manager
        # The only addresses this kvmanager calls; None = the default worker address only.
        self.known_workers = known_workers or KnownWorkers(Targets(["127.0.0.1:50061"]))
        self.estimator = estimator if estimator is not None else PredictorEstimator(None)
        self.workers = workers if workers is not None else WorkerPins()
        self.clock = clock
        self.maintain_interval_s = maintain_interval_s
        self.describe_interval_s = describe_interval_s
        self.max_known_workers = max_known_workers
        self._known: OrderedDict[str, None] = OrderedDict()  # workers reported, to Describe
        self._tasks: set[asyncio.Task] = set()
        self._loop_task: asyncio.Task | None = None

    # --- wire ------------------------------------------------------------------------------------------
    async def ReportTurn(self, request: kvmanager_pb2.TurnReport, context: grpc.aio.ServicerContext):
        start = time.perf_counter()
        turn = Turn(program_id=request.program_id, worker=request.worker, context_tokens=request.context_tokens,
                    last_turn=request.last_turn, tool_name=request.tool_name, turn_index=request.turn_index)
        try:
            validate(turn, request.prev_tool_duration_s)  # the report's own fields first
            if not await self.known_workers.knows(turn.worker):
                raise InvalidReport("worker", f"{turn.worker!r} is not one of this kvmanager's workers (--workers)")
            tool = self.manager.begin(turn, request.prev_tool_duration_s, self.clock())
        except InvalidReport as exc:
            REQUESTS.labels("ReportTurn", "INVALID_ARGUMENT").inc()
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        if tool:
            self.estimator.observe(tool, request.prev_tool_duration_s)
        if request.cached_prompt_tokens:
            PIN_HITS.inc()
            REUSED_TOKENS.inc(request.cached_prompt_tokens)
        self._know(turn.worker)
        if turn.last_turn:  # never pinned: no need to ask the predictor
            estimate = NOT_NEEDED
        else:
            estimate = await self.estimator.estimate(turn.tool_name, turn.context_tokens)
        ESTIMATES.labels(estimate.source).inc()
        outcome = self.manager.decide(turn, estimate, self.clock())
        d = outcome.decision
        DECISIONS.labels(str(d.pin).lower(), d.reason).inc()
        if d.pin:
            TTL.observe(d.ttl_s)
        self._spawn(self._apply(turn, outcome))
        REQUESTS.labels("ReportTurn", "OK").inc()
        self._gauges()
        LATENCY.labels("ReportTurn").observe(time.perf_counter() - start)
        log.debug("turn", program_id=turn.program_id, worker=turn.worker, tool=turn.tool_name, pin=d.pin,
                  ttl_s=d.ttl_s, reason=d.reason, keep_score=d.keep_score, source=estimate.source,
                  p_continue=outcome.context.p_continue if outcome.context else None,
                  pressure=outcome.context.pressure if outcome.context else None)
        return kvmanager_pb2.PinDecision(pin=d.pin, ttl_s=d.ttl_s, reason=d.reason,
                                         expires_at_unix_s=outcome.expires_at, keep_score=d.keep_score)

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
        entry = self.manager.release(request.program_id)
        if entry is not None:
            self._spawn(self._release({"cancelled": [entry]}))
        REQUESTS.labels("ReleasePin", "OK").inc()
        self._gauges()
        return kvmanager_pb2.ReleasePinResponse(released=entry is not None)

    # --- the workers -------------------------------------------------------------------------------------
    async def _apply(self, turn: Turn, outcome: Outcome) -> None:
        """Carries a decision out: frees what it dropped, sets (or frees: ttl 0) this turn's pin."""
        await self._release({"moved_or_evicted": outcome.releases})
        if turn.last_turn:
            return
        d = outcome.decision
        reply = await self.workers.set_pin(turn.worker, turn.program_id, d.ttl_s if d.pin else 0.0, d.keep_score)
        if outcome.entry is not None and reply is not None and not reply.held:
            # The worker holds no KV for it (evicted for an LS request, or never retained): nothing to keep.
            if self.manager.drop_if_current(outcome.entry):
                RELEASES.labels("not_held").inc()
                self._gauges()

    async def _release(self, dropped: dict[str, list[PinEntry]]) -> None:
        by_worker: dict[str, list[str]] = defaultdict(list)
        for reason, entries in dropped.items():
            for entry in entries:
                RELEASES.labels(reason).inc()
                by_worker[entry.worker].append(entry.program_id)
        if by_worker:
            await asyncio.gather(*(self.workers.release(w, ids) for w, ids in by_worker.items()))

    async def describe_workers(self) -> None:
        infos = await asyncio.gather(*(self.workers.describe(w) for w in list(self._known)))
        for worker, info in zip(list(self._known), infos):
            if info is not None:
                self.manager.observe_worker(worker, info.kv_capacity_tokens, info.kv_free_tokens)

    async def maintain_once(self, describe: bool = False) -> dict[str, list[PinEntry]]:
        """One pass of upkeep: (Describe the workers,) drop lapsed pins and pins over budget, free them on
        their workers. Returns what was dropped, by why."""
        if describe:
            await self.describe_workers()
        dropped = self.manager.maintain(self.clock())
        self._gauges()
        await self._release(dropped)
        return dropped

    async def _maintain_forever(self) -> None:
        last_describe = -math.inf
        while True:
            await asyncio.sleep(self.maintain_interval_s)
            describe = time.monotonic() - last_describe >= self.describe_interval_s
            if describe:
                last_describe = time.monotonic()
            try:
                await self.maintain_once(describe)
            except Exception:  # noqa: BLE001 - upkeep must go on
                log.exception("pin upkeep failed")

    def _know(self, worker: str) -> None:
        if worker in self._known:
            self._known.move_to_end(worker)
            return
        self._known[worker] = None
        while len(self._known) > self.max_known_workers:
            self._known.popitem(last=False)
        self._spawn(self._describe_new(worker))  # learn its budget before pins pile up

    async def _describe_new(self, worker: str) -> None:
        info = await self.workers.describe(worker)
        if info is not None:
            self.manager.observe_worker(worker, info.kv_capacity_tokens, info.kv_free_tokens)

    # --- plumbing ---------------------------------------------------------------------------------------
    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def settle(self) -> None:
        """Waits for the background worker calls in flight (tests, shutdown)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    def _gauges(self) -> None:
        ledger = self.manager.ledger
        PINS.set(len(ledger))
        PINNED_TOKENS.set(ledger.pinned_tokens())
        for worker in self._known:
            WORKER_PINNED_TOKENS.labels(worker).set(ledger.pinned_tokens(worker))
            WORKER_PIN_BUDGET.labels(worker).set(ledger.budget(worker))

    async def start(self) -> None:
        await self.known_workers.start()
        if self.maintain_interval_s > 0:
            self._loop_task = asyncio.get_running_loop().create_task(self._maintain_forever())

    async def stop(self) -> None:
        if self._loop_task is not None:
            self._loop_task.cancel()
        await self.known_workers.stop()
        try:
            await asyncio.wait_for(self.settle(), timeout=1.0)
        except asyncio.TimeoutError:
            pass
        for task in list(self._tasks):
            task.cancel()
        await self.estimator.close()
        await self.workers.close()


def build_service(policy: str = DEFAULT_POLICY, ttl_s: float = 2.0, max_tokens_per_worker: int = 0,
                  pin_unknown_tools: bool = True, clock=time.time, *, predictor: str = "",
                  predictor_deadline_s: float = 0.05, budget_fraction: float = 0.9, min_free_fraction: float = 0.0,
                  ttl_params: TTLParams | None = None, worker_deadline_s: float = 0.5,
                  maintain_interval_s: float = 0.5, describe_interval_s: float = 2.0,
                  credentials: grpc.ChannelCredentials | None = None, workers: Sequence[str] = ("127.0.0.1:50061",),
                  internal_token: InternalToken | None = None) -> serving.Service:
    """The kvmanager service; it calls only `workers` (HOST:PORT or dns:///NAME:PORT, as the router's
    --workers) and, with `internal_token`, its RPCs need that token and its calls carry it."""
    interceptors = internal_auth.client_interceptors(internal_token)
    manager = PinManager(make_policy(policy, ttl_s=ttl_s, pin_unknown=pin_unknown_tools, params=ttl_params),
                         Ledger(max_tokens_per_worker=max_tokens_per_worker), ContinuationModel(),
                         budget_fraction=budget_fraction, min_free_fraction=min_free_fraction)
    servicer = KVManagerServicer(manager, PredictorEstimator(predictor, deadline_s=predictor_deadline_s,
                                                             credentials=credentials, interceptors=interceptors),
                                 WorkerPins(worker_deadline_s, credentials, interceptors=interceptors), clock,
                                 maintain_interval_s, describe_interval_s,
                                 known_workers=KnownWorkers(Targets(list(workers))))

    def register(server: grpc.aio.Server) -> None:
        kvmanager_pb2_grpc.add_KVManagerServicer_to_server(servicer, server)

    service = serving.Service(name="kvmanager", service_names=[SERVICE_NAME], register=register,
                              on_start=servicer.start, on_stop=servicer.stop, internal_token=internal_token)
    service.servicer = servicer  # for tests and embedding
    return service


def configure_parser(parser: argparse.ArgumentParser) -> None:
    settings.add_service_flags(parser, port=50081, metrics_port=9181)
    settings.add(parser, "--pin-policy", default=DEFAULT_POLICY, choices=list(POLICIES),
                 help="how the KV of a finished agent turn is pinned: no-pin, fixed-ttl (Continuum's 2 s "
                      "baseline), ttl (from predicted tool durations, recompute cost, turn count, pressure), "
                      "pin-forever (oracle: no TTL, no budget)")
    settings.add(parser, "--pin-ttl-s", type=float, default=2.0, help="TTL of a pin (fixed-ttl)")
    settings.add(parser, "--pin-unknown-tools", type=bool, default=True,
                 help="fixed-ttl: pin when the next tool has no observed duration yet")
    settings.add(parser, "--max-pinned-tokens-per-worker", type=int, default=0,
                 help="pin budget per worker in tokens (0 = --pin-budget-fraction of the worker's KV capacity)")
    settings.add(parser, "--pin-budget-fraction", type=float, default=0.9,
                 help="pin budget per worker as a fraction of its KV capacity (learned from Describe); pins yield "
                      "to LS and to running requests on the worker itself, so this only bounds what they may "
                      "hold back from new admissions (0.5 cost ttl 1.36x pin-forever's JCT with a tight KV, "
                      "docs/benchmarks.md)")
    settings.add(parser, "--pin-min-free-fraction", type=float, default=0.0,
                 help="unpin (least likely to return first) while a worker's free KV is below this fraction "
                      "of its capacity (0 = off: the worker evicts pins for LS requests itself)")
    settings.add(parser, "--pin-min-recompute-s", type=float, default=TTLParams.min_recompute_s,
                 help="ttl: no pin for contexts that recompute faster than this")
    settings.add(parser, "--pin-idle-price", type=float, default=TTLParams.idle_price,
                 help="ttl: seconds of recompute one pinned token-second costs with free memory")
    settings.add(parser, "--pin-pressure-price", type=float, default=TTLParams.pressure_price,
                 help="ttl: the price added per unit of pressure/(1-pressure)")
    settings.add(parser, "--predictor", default="",
                 help="predictor HOST:PORT for tool durations and recompute costs ('' = the local model only)")
    settings.add(parser, "--predictor-deadline-ms", type=float, default=50.0,
                 help="deadline of a tool-duration prediction; past it the local model answers")
    settings.add(parser, "--worker-deadline-ms", type=float, default=500.0,
                 help="deadline of SetPin / ReleasePins / Describe calls to workers")
    settings.add(parser, "--pin-maintain-interval-s", type=float, default=0.5,
                 help="how often lapsed and over-budget pins are freed on their workers")
    settings.add(parser, "--describe-interval-s", type=float, default=2.0,
                 help="how often workers' KV capacity and free memory are refreshed")
    settings.add(parser, "--workers", default="127.0.0.1:50061",
                 help="the workers this kvmanager may call (the router's --workers: HOST:PORT,... or "
                      "dns:///NAME:PORT); a turn reported on any other address is refused")
    settings.add_client_tls_flag(parser, "workers and the predictor")


def run(args: argparse.Namespace):
    logs.configure("kvmanager", args.log_level)
    client_creds = serving.client_credentials_from(args)
    params = TTLParams(min_recompute_s=args.pin_min_recompute_s, idle_price=args.pin_idle_price,
                       pressure_price=args.pin_pressure_price)
    service = build_service(args.pin_policy, args.pin_ttl_s, args.max_pinned_tokens_per_worker,
                            args.pin_unknown_tools, predictor=args.predictor,
                            predictor_deadline_s=args.predictor_deadline_ms / 1000,
                            budget_fraction=args.pin_budget_fraction, min_free_fraction=args.pin_min_free_fraction,
                            ttl_params=params, worker_deadline_s=args.worker_deadline_ms / 1000,
                            maintain_interval_s=args.pin_maintain_interval_s,
                            describe_interval_s=args.describe_interval_s, credentials=client_creds,
                            workers=args.workers.split(","), internal_token=internal_auth.from_args(args))
    log.info("config", pin_policy=args.pin_policy, pin_ttl_s=args.pin_ttl_s, predictor=args.predictor or None,
             max_pinned_tokens_per_worker=args.max_pinned_tokens_per_worker,
             pin_budget_fraction=args.pin_budget_fraction)
    return serving.serve_forever(service, args.host, args.port, args.metrics_port,
                                   serving.credentials_from(args))
