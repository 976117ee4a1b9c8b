"""`qllm router`: the public qllm.v1.Router service. Validates, queues, forwards, streams back."""

from __future__ import annotations

import argparse
import asyncio
import time
import uuid
import zlib

import grpc
import structlog

from qllm import internal_auth, serving, settings
from qllm.contract import PRIORITY_LABELS, InvalidField, Priority
from qllm.logs import configure as configure_logging, get_logger
from qllm.security import AuthError, KeyRing, RateLimiter, load_key_file, open_access
from qllm.v1 import kvmanager_pb2, router_pb2, router_pb2_grpc, worker_pb2
from router import metrics
from router.core import RESTART, Job, NoWorker, Overloaded, RouterCore, status_code
from router.discovery import WorkerDiscovery
from router.deps import KVManagerClient, PredictorClient
from router.namespaces import RequestIds, program_key
from router.programs import ProgramTracker
from router.model_info import model_info
from router.validation import Limits, text_for_prediction, validate
from router.worker_client import WorkerClient

log = get_logger(__name__)


class RouterServicer(router_pb2_grpc.RouterServicer):
    def __init__(self, core: RouterCore, limits: Limits, predictor: PredictorClient, kvmanager: KVManagerClient,
                 keyring: KeyRing | None = None, limiter: RateLimiter | None = None,
                 be_length_estimates: str = "order"):
        self.core = core
        # What BE requests tell the worker of their output length (--be-length-estimates).
        self.be_length_estimates = be_length_estimates
        self.limits = limits
        self.predictor = predictor
        self.kvmanager = kvmanager
        self.keyring = keyring or open_access()
        self.limiter = limiter or RateLimiter()
        self.programs = ProgramTracker()
        self.request_ids = RequestIds()
        self._background: set[asyncio.Task] = set()

    def _spawn(self, coro) -> None:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def Generate(self, request: router_pb2.GenerateRequest, context: grpc.aio.ServicerContext):
        arrival = time.monotonic()
        try:
            # Who is asking and whether they are over their rate come before anything about the request.
            tenant = self.keyring.authenticate(context.invocation_metadata())
            self.limiter.check(tenant)
            priority = validate(request, self.limits)
            tenant.check_priority(priority.label)
        except InvalidField as exc:
            metrics.REJECTED.labels("INVALID_ARGUMENT").inc()
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except AuthError as exc:
            metrics.REJECTED.labels(exc.code).inc()
            await context.abort(grpc.StatusCode[exc.code], exc.message)
        rid = request.request_id or uuid.uuid4().hex  # the client's label: its logs and responses carry it
        # Inside qllm the request and its program are keyed per tenant: another tenant's same names never
        # reach them (router/namespaces.py).
        internal_id = self.request_ids.new(tenant.name, rid)
        program = program_key(tenant.name, request.program_id)
        label = priority.label
        is_ls = priority is Priority.LATENCY_SENSITIVE
        structlog.contextvars.bind_contextvars(request_id=rid, priority=label, tenant=tenant.name)
        submit = worker_pb2.SubmitRequest(
            request_id=internal_id, prompt=request.prompt, priority=priority, program_id=program,
            last_turn=request.last_turn, messages=request.messages, prompt_token_ids=request.prompt_token_ids,
            sampling=worker_pb2.SamplingParams(
                max_tokens=request.max_tokens, temperature=request.temperature,
                top_p=request.top_p if request.HasField("top_p") else 1.0,
                seed=request.seed if request.HasField("seed") else zlib.crc32(rid.encode()),
                ignore_eos=request.ignore_eos, num_beams=request.num_beams,
                patience=request.patience if request.HasField("patience") else 1.0,
                length_penalty=request.length_penalty if request.HasField("length_penalty") else 1.0,
                stop=request.stop, stop_token_ids=request.stop_token_ids, logprobs=request.logprobs,
                top_logprobs=request.top_logprobs))
        job = Job(internal_id, is_ls, submit, arrival=arrival)
        turn = None
        if program:
            turn = self.programs.turn_arrived(program, arrival)
            job.arrival = turn.order_arrival          # program-level FCFS within the class
            job.preferred_worker = turn.preferred_worker
        # LS goes first whatever its length, so only BE is ranked.
        if not is_ls:
            await self._set_order_key(job, request)
        try:
            self.core.submit(job, context.time_remaining())
        except NoWorker as exc:
            metrics.REJECTED.labels("UNAVAILABLE").inc()
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        except Overloaded as exc:
            metrics.REJECTED.labels("RESOURCE_EXHAUSTED").inc()
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
        metrics.REQUESTS.labels(label).inc()
        finished = False
        first = True
        sent = 0       # tokens the client has
        position = 0   # tokens of the current attempt seen so far (a re-queued request starts over)
        sent_chars = text_position = 0   # the same for text, which may lag the tokens (held-back stop strings)
        try:
            while True:
                event = await job.events.get()
                if event is RESTART:
                    position = text_position = 0
                    log.info("re-queued after losing its worker; replaying", sent_tokens=sent)
                    continue
                if event.WhichOneof("kind") == "rejected":
                    code = status_code(event.rejected.code)
                    metrics.REJECTED.labels(code.name).inc()
                    finished = True
                    await context.abort(code, event.rejected.message)
                delta = event.tokens
                token_ids, text, logprobs = list(delta.token_ids), delta.text, delta.logprobs
                # A replay re-generates (same seed, same tokens and text) what the client already has: skip it.
                skip = max(0, min(len(token_ids), sent - position))
                skip_chars = max(0, min(len(text), sent_chars - text_position))
                position += len(token_ids)
                text_position += len(text)
                if skip or skip_chars:
                    token_ids, text, logprobs = token_ids[skip:], text[skip_chars:], logprobs[skip:]
                    if not token_ids and not text and not delta.finished:
                        continue
                sent += len(token_ids)
                sent_chars += len(text)
                now = time.monotonic()
                if first and token_ids:
                    metrics.TTFT.labels(label).observe(now - arrival)
                    first = False
                metrics.TOKENS.labels(label).inc(len(token_ids))
                if delta.finished:
                    finished = True
                    metrics.E2E.labels(label).observe(now - arrival)
                    metrics.FINISHED.labels(label, delta.finish_reason).inc()
                    if program:
                        self.programs.turn_dispatched(program, job.worker_address)
                        self.programs.turn_finished(program, request.last_turn)
                        self._spawn(self._report_turn(request, program,
                                                      delta.prompt_tokens + delta.completion_tokens,
                                                      delta.cached_prompt_tokens, job, turn))
                response = router_pb2.GenerateResponse(
                    text=text, token_ids=token_ids, finished=delta.finished,
                    finish_reason=delta.finish_reason, request_id=rid, prompt_tokens=delta.prompt_tokens,
                    completion_tokens=delta.completion_tokens,
                    cached_prompt_tokens=delta.cached_prompt_tokens if delta.finished else 0, logprobs=logprobs)
                matched = delta.WhichOneof("matched_stop")
                if matched:
                    setattr(response, matched, getattr(delta, matched))
                yield response
                if delta.finished:
                    return
        finally:
            if not finished:
                # The client went away (or the call was cancelled): stop the work and free its KV.
                log.info("client cancelled")
                metrics.FINISHED.labels(label, "cancelled").inc()
                self.core.cancel(job)

    async def GetModelInfo(self, request: router_pb2.GetModelInfoRequest, context: grpc.aio.ServicerContext):
        try:
            tenant = self.keyring.authenticate(context.invocation_metadata())
        except AuthError as exc:
            await context.abort(grpc.StatusCode[exc.code], exc.message)
        return model_info(self.core.workers, self.limits, tenant, self.core.max_be_queue)

    async def _set_order_key(self, job: Job, request: router_pb2.GenerateRequest) -> None:
        """Asks the predictor for what the BE order sorts by. A predictor that is down or past its deadline
        leaves the key unset: the request is then served in arrival order, never failed (so is input the
        predictor cannot read: token ids)."""
        order = self.core.queues.be_order
        prompt = text_for_prediction(request)
        await self._set_length_estimate(job, request, prompt)
        if prompt is None:
            if order == "oracle":
                job.true_length = request.max_tokens
            return
        if order == "ltr":
            scores = await self.predictor.rank([prompt])
            job.length_score = scores[0] if scores else None
            job.submit.length_score = job.length_score or 0.0
        elif order == "speculative":
            estimate = await self.predictor.estimate(prompt, request.max_tokens)
            if estimate is not None:
                job.est_remaining_s = estimate.remaining_s
                # The worker re-estimates from it as tokens stream (a preempted request that has produced
                # most of its output is nearly done). --be-length-estimates oracle keeps the true length.
                if self.be_length_estimates != "oracle":
                    job.submit.predicted_output_tokens = estimate.predicted_output_tokens
        elif order == "oracle":
            job.true_length = request.max_tokens  # the bench sends ignore_eos, so this is the true length
        else:
            # Arrival order needs no score before dispatch: ask in the background, off the request's path.
            self._spawn(self._record_score(prompt))

    async def _set_length_estimate(self, job: Job, request: router_pb2.GenerateRequest, prompt: str | None) -> None:
        """--be-length-estimates beyond the speculative order's own: the worker orders waiting BE work and ALISE
        prices KV victims by the predicted length, or (oracle) by max_tokens, the true length under ignore_eos.
        No estimate (predictor down, token-id input) leaves it unset: the worker then uses the max_tokens budget."""
        if self.be_length_estimates == "oracle":
            job.submit.predicted_output_tokens = request.max_tokens
        # (the speculative order asks the predictor itself)
        elif (self.be_length_estimates == "predictor" and prompt is not None
              and self.core.queues.be_order != "speculative"):
            estimate = await self.predictor.estimate(prompt, request.max_tokens)
            if estimate is not None:
                job.submit.predicted_output_tokens = estimate.predicted_output_tokens

    async def _record_score(self, prompt: str) -> None:
        scores = await self.predictor.rank([prompt])
        if scores:
            log.debug("predicted length score", score=scores[0])

    async def _report_turn(self, request: router_pb2.GenerateRequest, program: str, tokens: int, cached_tokens: int,
                           job: Job, turn) -> None:
        decision = await self.kvmanager.report_turn(kvmanager_pb2.TurnReport(
            program_id=program, worker=job.worker_address, context_tokens=tokens,
            last_turn=request.last_turn, tool_name=request.tool_name, turn_index=turn.turn_index,
            prev_tool_duration_s=turn.prev_tool_duration_s, cached_prompt_tokens=cached_tokens))
        if decision is not None:
            log.info("pin decision", program_id=request.program_id, pin=decision.pin, ttl_s=decision.ttl_s)


def configure_parser(parser: argparse.ArgumentParser) -> None:
    settings.add_service_flags(parser, port=50051, metrics_port=9151)
    settings.add(parser, "--workers", default="127.0.0.1:50061",
                 help="comma-separated worker HOST:PORT list, or dns:///NAME:PORT for every address NAME resolves "
                      "to (re-resolved every few seconds: a Kubernetes headless Service)")
    settings.add(parser, "--predictor", default="127.0.0.1:50071", help="predictor HOST:PORT ('' = none)")
    settings.add(parser, "--kvmanager", default="127.0.0.1:50081", help="kvmanager HOST:PORT ('' = none)")
    settings.add(parser, "--queue-mode", default="class", choices=["class", "fifo"],
                 help="class: LS before BE; fifo: one arrival-ordered queue (FCFS baseline)")
    settings.add(parser, "--max-inflight-per-worker", type=int, default=0,
                 help="BE requests released to a worker at most at once (0 = the worker's max_num_seqs)")
    settings.add(parser, "--be-order", default="arrival", choices=["arrival", "ltr", "speculative", "oracle"],
                 help="order within the BE queue: arrival, ltr (shortest predicted first), speculative "
                      "(least estimated time first), oracle (true length; benchmarks only)")
    settings.add(parser, "--be-length-estimates", default="order", choices=["order", "predictor", "oracle"],
                 help="the output length each BE request carries to the worker (which orders waiting BE work and "
                      "prices ALISE's KV victims by what is left of it): order = only the speculative order's "
                      "predictor estimate; predictor = the predictor's estimate whatever the order; oracle = "
                      "max_tokens, the true length when the client sets ignore_eos (benchmarks only)")
    settings.add(parser, "--starvation-threshold", type=int, default=32,
                 help="BE request passed over this many times is promoted (0 = off)")
    settings.add(parser, "--promotion-rounds", type=int, default=8, help="how long a promotion lasts")
    settings.add(parser, "--default-priority", default="BE", choices=PRIORITY_LABELS,
                 help="class of requests that leave priority unspecified")
    settings.add(parser, "--max-prompt-bytes", type=int, default=1 << 20, help="largest accepted prompt")
    settings.add(parser, "--max-be-queue", type=int, default=4096,
                 help="BE requests queued in the router at most; more get RESOURCE_EXHAUSTED (0 = unbounded)")
    settings.add(parser, "--max-requeues", type=int, default=2,
                 help="times a request whose worker was lost is re-run elsewhere before UNAVAILABLE")
    settings.add(parser, "--requeue-timeout-s", type=float, default=30.0,
                 help="how long a re-queued request may wait for a worker before UNAVAILABLE")
    settings.add(parser, "--drain-grace-s", type=float, default=30.0,
                 help="on SIGTERM: health NOT_SERVING, in-flight requests get this long to finish")
    settings.add(parser, "--api-keys", default=None,
                 help="API key file (JSON or TOML: tenants, their classes and rate limits); unset = open access")
    settings.add_client_tls_flag(parser, "workers, predictor and kvmanager")
    settings.add(parser, "--predictor-deadline-ms", type=float, default=300.0,
                 help="predictor call deadline (past it a BE request is served in arrival order)")


def default_args(**overrides) -> argparse.Namespace:
    """The router's settings as its flags' defaults, with overrides (for in-process stacks and tests)."""
    parser = argparse.ArgumentParser()
    configure_parser(parser)
    args = parser.parse_args([])
    for key, value in overrides.items():
        setattr(args, key, value)
    return args


async def build(args: argparse.Namespace) -> tuple[serving.Service, RouterServicer]:
    client_creds = serving.client_credentials_from(args)
    # The router's calls to workers, predictor and kvmanager carry the internal token.
    interceptors = internal_auth.client_interceptors(internal_auth.from_args(args))
    targets = [a.strip() for a in args.workers.split(",") if a.strip()]
    if not targets:
        raise SystemExit("--workers: at least one worker address is needed")
    core = RouterCore([], args.queue_mode, args.max_inflight_per_worker, be_order=args.be_order,
                      max_requeues=args.max_requeues, requeue_timeout_s=args.requeue_timeout_s,
                      max_be_queue=args.max_be_queue, starvation_threshold=args.starvation_threshold,
                      promotion_rounds=args.promotion_rounds)
    discovery = WorkerDiscovery(core, targets, lambda address: WorkerClient(address, credentials=client_creds,
                                                                                 interceptors=interceptors))
    workers = core.workers
    limits = Limits(max_prompt_bytes=args.max_prompt_bytes, default_priority=Priority.from_label(args.default_priority))
    predictor = PredictorClient(args.predictor or None, args.predictor_deadline_ms / 1000, client_creds, interceptors)
    kvmanager = KVManagerClient(args.kvmanager or None, credentials=client_creds, interceptors=interceptors)
    if args.api_keys:
        keyring = load_key_file(args.api_keys)
        log.info("API keys loaded", file=args.api_keys, tenants=sorted(keyring.tenants))
    else:
        keyring = open_access()
        log.warning("NO API KEY FILE: open access, anyone who reaches this port may send LS traffic; "
                    "set --api-keys / QLLM_API_KEYS")
    servicer = RouterServicer(core, limits, predictor, kvmanager, keyring, RateLimiter(),
                              be_length_estimates=args.be_length_estimates)

    async def on_start():
        await discovery.start()
        # Serve as soon as one worker is up; its Describe answer sets the model limits.
        if workers:
            await asyncio.wait([asyncio.create_task(w.wait_connected(60.0)) for w in workers],
                               return_when=asyncio.FIRST_COMPLETED)
        connected = [w for w in workers if w.info is not None]
        if connected:
            limits.max_context = connected[0].info.max_context
            limits.vocab_size = connected[0].info.vocab_size
            limits.has_chat_template = connected[0].info.has_chat_template
        else:
            log.warning("no worker reachable yet; serving anyway", workers=args.workers)

    async def on_stop():
        await discovery.stop()
        await predictor.close()
        await kvmanager.close()

    service = serving.Service(
        name="router", service_names=[router_pb2.DESCRIPTOR.services_by_name["Router"].full_name],
        register=lambda server: router_pb2_grpc.add_RouterServicer_to_server(servicer, server),
        on_start=on_start, on_stop=on_stop, grace_s=args.drain_grace_s,
        # Public: tenants are authenticated by the servicer (API keys), not by the internal token.
        public_methods=serving.all_methods(router_pb2.DESCRIPTOR.services_by_name["Router"]))
    return service, servicer


def run(args: argparse.Namespace):
    configure_logging("router", args.log_level)

    async def main():
        service, _ = await build(args)
        await serving.serve_forever(service, args.host, args.port, args.metrics_port,
                                   serving.credentials_from(args))

    return main()
