"""`qllm worker`: the qllm.v1.Worker gRPC service over one engine. Translates between wire and engine only."""

from __future__ import annotations

import argparse
import asyncio
import gc
import math
import os
import sys
import time

import grpc
import structlog

from qllm import internal_auth, serving, settings
from qllm.internal_auth import InternalToken
from qllm.logs import configure as configure_logging, get_logger
from qllm.contract import InvalidField, Priority
from qllm.v1 import common_pb2, worker_pb2, worker_pb2_grpc
from worker import metrics
from worker import inputs
from worker.engine import AsyncEngine, EngineConfig, RequestRejected
from worker.output_text import OutputText
from worker.latency_report import LatencyReporter
from worker.request import SamplingParams
from worker.tokenize import PromptEncoder

log = get_logger(__name__)

# The rejection of new work by a draining worker; the router reads Rejection.draining, not this text.
DRAINING_MESSAGE = "worker draining: not taking new requests"


def sampling_from_wire(msg: worker_pb2.SamplingParams) -> SamplingParams:
    """Wire to engine, values as sent: the engine checks them (AsyncEngine.check, the request contract)."""
    # proto3 cannot tell an unset patience from 0: 0 means the default, 1.0 (the router always sends it).
    # length_penalty is taken as sent (the router sends 1.0 when the client leaves it unset).
    return SamplingParams(max_tokens=msg.max_tokens, temperature=msg.temperature, top_p=msg.top_p,
                          seed=msg.seed, ignore_eos=msg.ignore_eos, num_beams=max(1, msg.num_beams),
                          patience=msg.patience or 1.0, length_penalty=msg.length_penalty,
                          stop=tuple(msg.stop), stop_token_ids=frozenset(msg.stop_token_ids),
                          logprobs=msg.logprobs, top_logprobs=msg.top_logprobs)


def logprobs_to_wire(entries: list, tokenizer) -> list[common_pb2.TokenLogprob]:
    """worker/logprobs.py TokenLogprobs -> wire, with each token's own text (decoded in one call)."""
    ids = [i for e in entries for i in (e.token_id, *(t for t, _ in e.top))]
    texts = iter(tokenizer.batch_decode([[i] for i in ids]))
    return [common_pb2.TokenLogprob(token_id=e.token_id, logprob=e.logprob, rank=e.rank, token=next(texts),
                                    top_logprobs=[common_pb2.TopLogprob(token_id=t, logprob=lp, token=next(texts))
                                                  for t, lp in e.top])
            for e in entries]


class WorkerServicer(worker_pb2_grpc.WorkerServicer):
    def __init__(self, engine: AsyncEngine, info: worker_pb2.WorkerInfo):
        self.engine = engine
        self.info = info
        self.draining = asyncio.Event()
        self.prompts = PromptEncoder(engine.encode)  # long prompts are tokenized off the event loop

    async def Describe(self, request, context):
        info = worker_pb2.WorkerInfo()
        info.CopyFrom(self.info)
        stats = self.engine.stats()
        for key, value in stats.items():
            setattr(info, key, value)
        return info

    # --- agent-program pins: the kvmanager's side -------------------------------------------------------
    async def SetPin(self, request: worker_pb2.SetPinRequest, context: grpc.aio.ServicerContext):
        if not request.program_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "program_id: must not be empty")
        if math.isnan(request.ttl_s) or math.isnan(request.keep_score):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "ttl_s/keep_score: must be numbers, not NaN")
        held, tokens = await self._on_core(self.engine.set_pin(request.program_id, request.ttl_s,
                                                               request.keep_score), context)
        return worker_pb2.SetPinResponse(held=held, tokens=tokens)

    async def ReleasePins(self, request: worker_pb2.ReleasePinsRequest, context: grpc.aio.ServicerContext):
        released, tokens = await self._on_core(self.engine.release_pins(list(request.program_ids)), context)
        return worker_pb2.ReleasePinsResponse(released=released, tokens=tokens)

    async def ListPins(self, request, context: grpc.aio.ServicerContext):
        pins = await self._on_core(self.engine.list_pins(), context)
        return worker_pb2.ListWorkerPinsResponse(pins=[
            worker_pb2.WorkerPin(program_id=pid, tokens=tokens, expires_in_s=left, keep_score=score)
            for pid, tokens, left, score in pins])

    async def _on_core(self, call, context: grpc.aio.ServicerContext, timeout_s: float = 10.0):
        """Awaits an operation the engine thread runs between steps; UNAVAILABLE if it does not come back."""
        try:
            return await asyncio.wait_for(call, timeout_s)
        except (asyncio.TimeoutError, RuntimeError) as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"engine did not answer: {exc or 'timeout'}")

    async def Serve(self, request_iterator, context):
        """One long-lived stream per router: commands in, token events out, many requests multiplexed."""
        events: asyncio.Queue = asyncio.Queue()
        tasks: dict[str, asyncio.Task] = {}

        async def read_commands():
            try:
                async for command in request_iterator:
                    kind = command.WhichOneof("kind")
                    if kind == "submit":
                        rid = command.submit.request_id
                        if self.draining.is_set():
                            # The router re-queues this elsewhere and stops sending here.
                            events.put_nowait(worker_pb2.WorkerEvent(request_id=rid, rejected=worker_pb2.Rejection(
                                code=grpc.StatusCode.UNAVAILABLE.value[0], message=DRAINING_MESSAGE,
                                draining=True)))
                            continue
                        if rid in tasks:
                            events.put_nowait(worker_pb2.WorkerEvent(request_id=rid, rejected=worker_pb2.Rejection(
                                code=grpc.StatusCode.ALREADY_EXISTS.value[0],
                                message=f"request_id: {rid!r} is already running on this stream")))
                            continue
                        task = asyncio.create_task(self._run_request(command.submit, events))
                        tasks[rid] = task
                        task.add_done_callback(lambda _t, rid=rid: tasks.pop(rid, None))
                    elif kind == "cancel":
                        task = tasks.get(command.cancel.request_id)
                        if task is not None:
                            task.cancel()
                # The router half-closed: finish what it already sent, then end the stream.
                while tasks:
                    await asyncio.wait(list(tasks.values()))
            finally:
                events.put_nowait(None)

        async def end_when_drained():
            await self.draining.wait()
            while tasks:
                await asyncio.wait(list(tasks.values()))
            events.put_nowait(None)

        reader = asyncio.create_task(read_commands())
        drainer = asyncio.create_task(end_when_drained())
        try:
            while (event := await events.get()) is not None:
                yield event
        finally:
            # Stream gone (router disconnected or cancelled): cancel its requests so their KV is freed.
            reader.cancel()
            drainer.cancel()
            for task in list(tasks.values()):
                task.cancel()

    async def _run_request(self, submit: worker_pb2.SubmitRequest, events: asyncio.Queue) -> None:
        rid = submit.request_id
        arrival = time.monotonic()
        label = "unknown"  # until the priority is read
        structlog.contextvars.bind_contextvars(request_id=rid, priority=label)
        first = True
        try:
            try:
                priority = Priority.from_wire(submit.priority)
                label = priority.label
                structlog.contextvars.bind_contextvars(priority=label)
                prompt_ids = await inputs.prompt_token_ids(submit.prompt, submit.messages, submit.prompt_token_ids,
                                                           self.engine.tokenizer, self.engine.vocab_size,
                                                           self.prompts.encode)
            except InvalidField as exc:
                raise RequestRejected("INVALID_ARGUMENT", str(exc)) from None
            sampling = sampling_from_wire(submit.sampling)
            output = OutputText(self.engine.tokenizer, sampling.stop)
            stream = self.engine.generate(rid, prompt_ids, sampling, priority, order_key=submit.length_score,
                                          program_id=submit.program_id, last_turn=submit.last_turn,
                                          predicted_output_tokens=submit.predicted_output_tokens)
            metrics.REQUESTS.labels(label).inc()
            async for out in stream:
                now = time.monotonic()
                if first and out.new_token_ids:
                    metrics.TTFT.labels(label).observe(now - arrival)
                    first = False
                metrics.TOKENS.labels(label).inc(len(out.new_token_ids))
                text, stop_string = output.push(out.new_token_ids, out.finished)
                finished = out.finished or stop_string is not None
                reason = "stop" if stop_string is not None else out.finish_reason
                if finished:
                    metrics.E2E.labels(label).observe(now - arrival)
                    metrics.FINISHED.labels(label, reason).inc()
                    log.info("finished", reason=reason, prompt_tokens=out.num_prompt_tokens,
                             cached_prompt_tokens=out.cached_prompt_tokens, output_tokens=out.num_output_tokens,
                             seconds=round(now - arrival, 4))
                delta = worker_pb2.TokenDelta(
                    token_ids=out.new_token_ids, text=text, finished=finished,
                    finish_reason=reason, prompt_tokens=out.num_prompt_tokens,
                    completion_tokens=out.num_output_tokens, cached_prompt_tokens=out.cached_prompt_tokens,
                    logprobs=logprobs_to_wire(out.logprobs, self.engine.tokenizer) if out.logprobs else None)
                if stop_string is not None:
                    delta.stop_string = stop_string
                elif out.stop_token_id is not None:
                    delta.stop_token_id = out.stop_token_id
                events.put_nowait(worker_pb2.WorkerEvent(request_id=rid, tokens=delta))
                if stop_string is not None and not out.finished:
                    # Nothing after the stop string is sent: the engine ends the request as STOP (frees its KV).
                    self.engine.end_early(rid)
                    await stream.aclose()
                    break
        except RequestRejected as exc:
            metrics.REJECTED.labels(label, exc.code).inc()
            log.info("rejected", code=exc.code, reason=exc.message)
            events.put_nowait(worker_pb2.WorkerEvent(request_id=rid, rejected=worker_pb2.Rejection(
                code=grpc.StatusCode[exc.code].value[0], message=exc.message)))
        except asyncio.CancelledError:
            log.info("cancelled")
            raise
        except Exception as exc:  # a bug in one request must not take the stream down
            log.exception("request failed")
            events.put_nowait(worker_pb2.WorkerEvent(request_id=rid, rejected=worker_pb2.Rejection(
                code=grpc.StatusCode.INTERNAL.value[0], message=f"internal error: {exc}")))


def configure_parser(parser: argparse.ArgumentParser) -> None:
    settings.add_service_flags(parser, port=50061, metrics_port=9161)
    settings.add(parser, "--model", default=None, help="local HF MoE checkpoint directory (default: embedded)")
    settings.add(parser, "--policy", default="qllm",
                 help="scheduling policy: qllm (LS preempts BE at layer boundaries and decodes at its own pace), "
                      "priority (vLLM V1's), priority-evict (priority that evicts BE for waiting LS), fcfs")
    settings.add(parser, "--device", default=None, help="cpu or cuda (default: cuda when available)")
    settings.add(parser, "--dtype", default="auto",
                 help="weights' dtype: auto (bfloat16 on a GPU or a CPU with AMX/AVX512-BF16, else float32), "
                      "float32, float16, bfloat16")
    settings.add(parser, "--max-num-seqs", type=int, default=32, help="most requests running at once")
    settings.add(parser, "--max-num-batched-tokens", type=int, default=512,
                 help="token budget of one iteration (prefill chunk size)")
    settings.add(parser, "--kv-budget-tokens", type=int, default=32768, help="KV cache budget in tokens")
    settings.add(parser, "--block-size", type=int, default=16, help="KV block size in tokens")
    settings.add(parser, "--max-be-deferral-steps", type=int, default=2,
                 help="qllm: LS-only steps for due LS tokens that may run in a row before BE gets its turn")
    settings.add(parser, "--layer-parking", type=bool, default=True,
                 help="qllm: park a running step at a layer boundary when LS work arrives or an LS token is due")
    settings.add(parser, "--inner-parking", type=bool, default=True,
                 help="qllm: park inside a layer's blocks too (decode row groups, before and between a step's "
                      "prefill parts, expert ranges)")
    settings.add(parser, "--ls-only-steps", type=bool, default=True,
                 help="qllm: LS work that arrives between steps gets a step of its own")
    settings.add(parser, "--ls-tpot-target-ms", type=float, default=-1.0,
                 help="qllm: the LS TPOT objective BE yields to LS streams for; -1 = 1.5 x the one-row decode "
                      "step measured on an idle worker (the idle floor), 0 = off (LS decodes ride BE iterations)")
    settings.add(parser, "--ls-active-max-batched-tokens", type=int, default=0,
                 help="qllm: token budget of a BE iteration while LS streams decode beside it (0 = "
                      "--max-num-batched-tokens)")
    settings.add(parser, "--ls-reserved-kv-tokens", type=int, default=1024,
                 help="qllm: KV tokens BE admission leaves free for LS (capped at 1/8 of the cache)")
    settings.add(parser, "--ls-reserved-slots", type=int, default=2,
                 help="qllm: running slots BE admission leaves free for LS")
    settings.add(parser, "--admission-output-fraction", type=float, default=1.0,
                 help="share of max_tokens whose KV admission reserves (0 = vLLM's optimistic admission)")
    settings.add(parser, "--provisional-pin-s", type=float, default=1.0,
                 help="agent programs: seconds a finished turn's KV stays pinned until the kvmanager decides")
    settings.add(parser, "--kv-policy", default="recompute", choices=["recompute", "alise"],
                 help="KV under pressure: recompute (drop a preempted request's KV, vLLM V1) or alise (per victim "
                      "the cheapest of swap to host, int8, recompute; worker/kv_tiers.py)")
    settings.add(parser, "--kv-int8", default="be", choices=["off", "be", "all"],
                 help="alise: classes whose KV may be quantized to int8 (lossy)")
    settings.add(parser, "--kv-host-budget-tokens", type=int, default=65536,
                 help="alise: host pool for swapped-out KV, in tokens (0 = no swapping)")
    settings.add(parser, "--step-trace", default="",
                 help="append one JSON line per engine step (timings, rows) to this file, for "
                      "scripts/analyze_step_trace.py ('' = none)")
    settings.add(parser, "--predictor", default="",
                 help="predictor HOST:PORT that gets this worker's measured prefill and decode-step times for its "
                      "latency model ('' = none)")
    settings.add(parser, "--latency-report-interval-s", type=float, default=2.0,
                 help="how often measured step times go to the predictor")
    settings.add_client_tls_flag(parser, "the predictor")
    settings.add(parser, "--torch-threads", type=int, default=max(1, (os.cpu_count() or 2) - 1),
                 help="torch intra-op threads (leave the control plane a core)")


def engine_config(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig(policy=args.policy, max_num_seqs=args.max_num_seqs,
                        max_num_batched_tokens=args.max_num_batched_tokens, kv_budget_tokens=args.kv_budget_tokens,
                        block_size=args.block_size, max_be_deferral_steps=args.max_be_deferral_steps,
                        layer_parking=args.layer_parking, inner_parking=args.inner_parking,
                        ls_only_steps=args.ls_only_steps,
                        ls_tpot_target_s=args.ls_tpot_target_ms / 1000 if args.ls_tpot_target_ms > 0
                        else args.ls_tpot_target_ms,
                        ls_active_max_batched_tokens=args.ls_active_max_batched_tokens,
                        ls_reserved_kv_tokens=args.ls_reserved_kv_tokens, ls_reserved_slots=args.ls_reserved_slots,
                        admission_output_fraction=args.admission_output_fraction,
                        provisional_pin_s=args.provisional_pin_s, kv_policy=args.kv_policy,
                        kv_int8=args.kv_int8, kv_host_budget_tokens=args.kv_host_budget_tokens,
                        step_trace_path=args.step_trace)


def build_service(loaded, config: EngineConfig, predictor: str = "", worker_address: str = "",
                  latency_report_interval_s: float = 2.0,
                  predictor_credentials: grpc.ChannelCredentials | None = None,
                  internal_token: InternalToken | None = None) -> tuple[serving.Service, AsyncEngine]:
    """The worker service over one engine; with `predictor`, measured step times go to its latency model.
    With `internal_token` every Worker RPC needs it (the router and the kvmanager present it)."""
    from worker.model_runner import ModelRunner

    num_blocks = max(1, config.kv_budget_tokens // config.block_size)
    runner = ModelRunner(loaded, num_blocks, config.block_size)
    engine = AsyncEngine(runner, loaded.tokenizer, loaded.eos_token_ids, loaded.max_context, config)
    info = worker_pb2.WorkerInfo(model_name=loaded.name, max_context=loaded.max_context,
                                 vocab_size=loaded.model.config.vocab_size, num_layers=runner.num_layers,
                                 policy=config.policy, device=str(loaded.device), max_num_seqs=config.max_num_seqs,
                                 has_chat_template=inputs.has_chat_template(loaded.tokenizer),
                                 eos_token_ids=loaded.eos_token_ids)
    servicer = WorkerServicer(engine, info)
    reporter = LatencyReporter(predictor, worker_address, engine.core.latency_samples, latency_report_interval_s,
                               credentials=predictor_credentials,
                               interceptors=internal_auth.client_interceptors(internal_token)) if predictor else None

    async def on_start():
        engine.start()
        # What exists now (the model, its modules, the warm-up's kernels and caches) lives as long as the worker:
        # frozen, a full collection of the cyclic GC no longer rescans it, so one that runs while serving stays
        # short (vLLM's engine core freezes its startup heap the same way).
        gc.collect()
        gc.freeze()
        if reporter is not None:
            reporter.start()

    async def on_drain():
        servicer.draining.set()

    async def on_stop():
        if reporter is not None:
            await reporter.stop()
        servicer.prompts.close()
        engine.stop()

    service = serving.Service(
        name="worker", service_names=[worker_pb2.DESCRIPTOR.services_by_name["Worker"].full_name],
        register=lambda server: worker_pb2_grpc.add_WorkerServicer_to_server(servicer, server),
        on_start=on_start, on_stop=on_stop, on_drain=on_drain, internal_token=internal_token)
    return service, engine


def run(args: argparse.Namespace):
    import torch

    from worker.model_loader import load_model
    from worker.scheduler import POLICIES

    configure_logging("worker", args.log_level)
    # The engine thread holds the GIL between torch ops; a shorter switch interval lets the event loop
    # (new requests, token streams) in sooner, which shows directly in LS time to first token.
    sys.setswitchinterval(0.001)
    if args.policy not in POLICIES:
        raise SystemExit(f"--policy: unknown policy {args.policy!r}; known: {', '.join(sorted(POLICIES))}")
    torch.set_num_threads(args.torch_threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    loaded = load_model(args.model, device=device, dtype=args.dtype)
    client_creds = serving.client_credentials_from(args)
    service, _ = build_service(loaded, engine_config(args), args.predictor, f"{args.host}:{args.port}",
                               args.latency_report_interval_s, client_creds, internal_auth.from_args(args))
    log.info("model loaded", model=loaded.name, device=str(loaded.device), dtype=str(loaded.dtype),
             policy=args.policy, torch_threads=args.torch_threads)
    return serving.serve_forever(service, args.host, args.port, args.metrics_port,
                                   serving.credentials_from(args))
