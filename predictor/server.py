"""qllm.v1.Predictor over grpc.aio: a thin translation between the wire and the ranker, the estimate
(predictor/estimate.py) and the latency model (qllm/estimators/latency_model.py).

Torch-backed rankers run on a one-thread executor, off the event loop, one torch thread; calls that
arrive while a batch runs are scored together in the next one (predictor/batching.py). The heuristic runs
inline.
"""

from __future__ import annotations

import argparse
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
from prometheus_client import Counter, Gauge, Histogram

from predictor.batching import MicroBatcher
from predictor.estimate import estimate
from predictor.limits import InvalidInput, Limits, check_levels, check_observations, check_times, check_tool_name
from predictor.ranker import LengthRanker, load_ranker
from qllm import internal_auth, logs, serving, settings
from qllm.estimators.latency_model import LatencyModel
from qllm.estimators.tool_durations import DEFAULT_LEVELS, ToolDurationModel
from qllm.internal_auth import InternalToken
from qllm.v1 import predictor_pb2, predictor_pb2_grpc

SERVICE_NAME = predictor_pb2.DESCRIPTOR.services_by_name["Predictor"].full_name
log = logs.get_logger(__name__)

REQUESTS = Counter("qllm_predictor_requests_total", "Predictor RPCs", ["rpc", "code"])
BATCH = Histogram("qllm_predictor_batch_size", "Prompts per RankLengths call",
                  buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024))
MODEL_BATCH = Histogram("qllm_predictor_model_batch_size", "Prompts per model call (concurrent calls coalesced)",
                        buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024))
LATENCY = Histogram("qllm_predictor_latency_seconds", "Predictor RPC handling time", ["rpc"],
                    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5))
LATENCY_MODEL = Gauge("qllm_predictor_latency_model", "Latency model parameters (seconds)", ["param"])
TOOL_CALLS = Counter("qllm_predictor_tool_calls_total", "Tool-call durations learned")
TOOLS = Gauge("qllm_predictor_tools", "Tools whose call durations the predictor knows")


CHARS_PER_TOKEN = 4.0  # prompt_tokens when the caller gives only the text


class PredictorServicer(predictor_pb2_grpc.PredictorServicer):
    def __init__(self, ranker: LengthRanker, limits: Limits = Limits(), latency: LatencyModel | None = None,
                 tool_durations: ToolDurationModel | None = None):
        self.ranker = ranker
        self.limits = limits
        self.latency = latency if latency is not None else LatencyModel()
        self.tool_durations = tool_durations if tool_durations is not None else ToolDurationModel()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ranker") if ranker.uses_torch else None
        self._batcher = (MicroBatcher(ranker.score, self._executor, max(64, limits.max_prompts), MODEL_BATCH.observe)
                         if self._executor else None)

    async def _score(self, prompts: list[str], rpc: str, context: grpc.aio.ServicerContext) -> list[float]:
        if not prompts:
            return []
        try:
            if self._batcher is None:
                return self.ranker.score(prompts)
            return await self._batcher.score(prompts)
        except Exception:  # noqa: BLE001 - one failed batch must not take the service down
            log.exception("ranker failed", prompts=len(prompts))
            REQUESTS.labels(rpc, "INTERNAL").inc()
            await context.abort(grpc.StatusCode.INTERNAL, "ranker failed")

    async def RankLengths(self, request: predictor_pb2.RankRequest, context: grpc.aio.ServicerContext):
        start = time.perf_counter()
        prompts = list(request.prompts)
        try:
            self.limits.check_prompts(prompts)
        except InvalidInput as exc:
            REQUESTS.labels("RankLengths", "INVALID_ARGUMENT").inc()
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        scores = await self._score(prompts, "RankLengths", context)
        BATCH.observe(len(prompts))
        REQUESTS.labels("RankLengths", "OK").inc()
        LATENCY.labels("RankLengths").observe(time.perf_counter() - start)
        return predictor_pb2.RankResponse(scores=scores)

    async def EstimateTime(self, request: predictor_pb2.EstimateRequest, context: grpc.aio.ServicerContext):
        start = time.perf_counter()
        items = list(request.items)
        scores = [it.score if it.HasField("score") else None for it in items]
        try:
            self.limits.check_estimate_items([it.prompt for it in items], scores, request.batch_size)
        except InvalidInput as exc:
            REQUESTS.labels("EstimateTime", "INVALID_ARGUMENT").inc()
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        missing = [i for i, sc in enumerate(scores) if sc is None]
        for i, sc in zip(missing, await self._score([items[i].prompt for i in missing], "EstimateTime", context)):
            scores[i] = sc
        out = []
        for it, sc in zip(items, scores):
            prompt_tokens = it.prompt_tokens or int(round(len(it.prompt) / CHARS_PER_TOKEN))
            e = estimate(sc, self.ranker.calibration, self.latency, prompt_tokens=prompt_tokens,
                         generated_so_far=it.generated_so_far, max_tokens=it.max_tokens,
                         batch_size=request.batch_size or 1, prefill_done=it.prefill_done)
            out.append(predictor_pb2.Estimate(predicted_output_tokens=e.predicted_output_tokens,
                                              remaining_tokens=e.remaining_tokens, remaining_s=e.remaining_s,
                                              score=sc))
        REQUESTS.labels("EstimateTime", "OK").inc()
        LATENCY.labels("EstimateTime").observe(time.perf_counter() - start)
        return predictor_pb2.EstimateResponse(estimates=out)

    async def ReportLatency(self, request: predictor_pb2.LatencyReport, context: grpc.aio.ServicerContext):
        samples = [(s.prefill_tokens, s.prefill_s, s.decode_batch_size, s.decode_step_s) for s in request.samples]
        try:
            self.limits.check_latency_samples(samples)
        except InvalidInput as exc:
            REQUESTS.labels("ReportLatency", "INVALID_ARGUMENT").inc()
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        for prefill_tokens, prefill_s, batch, step_s in samples:
            if prefill_tokens:
                self.latency.observe_prefill(prefill_tokens, prefill_s)
            if batch:
                self.latency.observe_decode_step(batch, step_s)
        REQUESTS.labels("ReportLatency", "OK").inc()
        st = self.latency.state()
        for name in ("prefill_fixed_s", "prefill_s_per_token", "decode_base_s", "decode_per_seq_s"):
            LATENCY_MODEL.labels(name).set(getattr(st, name))
        return predictor_pb2.LatencyModelState(
            prefill_fixed_s=st.prefill_fixed_s, prefill_s_per_token=st.prefill_s_per_token,
            decode_base_s=st.decode_base_s, decode_per_seq_s=st.decode_per_seq_s,
            prefill_samples=st.prefill_samples, decode_samples=st.decode_samples)

    async def ObserveToolCalls(self, request: predictor_pb2.ToolCallReport, context: grpc.aio.ServicerContext):
        calls = [(c.tool_name, c.duration_s) for c in request.calls]
        try:
            check_observations(calls)
        except InvalidInput as exc:
            REQUESTS.labels("ObserveToolCalls", "INVALID_ARGUMENT").inc()
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        accepted = sum(self.tool_durations.observe(tool, duration_s) for tool, duration_s in calls)
        TOOL_CALLS.inc(accepted)
        TOOLS.set(len(self.tool_durations.tools()))
        REQUESTS.labels("ObserveToolCalls", "OK").inc()
        return predictor_pb2.ToolCallReportResponse(accepted=accepted, tools=len(self.tool_durations.tools()))

    async def PredictToolDuration(self, request: predictor_pb2.ToolDurationRequest,
                                  context: grpc.aio.ServicerContext):
        start = time.perf_counter()
        levels, times = list(request.quantiles) or list(DEFAULT_LEVELS), list(request.within_s)
        try:
            check_tool_name(request.tool_name)
            check_levels(levels)
            check_times(times)
        except InvalidInput as exc:
            REQUESTS.labels("PredictToolDuration", "INVALID_ARGUMENT").inc()
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        dist = self.tool_durations.predict(request.tool_name)
        reply = predictor_pb2.ToolDurationPrediction(
            quantiles=levels, durations_s=[dist.quantile(q) for q in levels], mean_s=dist.mean(),
            samples=dist.samples, prior=dist.prior, observed_mean_s=dist.observed_mean_s,
            p_within=[dist.cdf(t) for t in times], pooled_samples=dist.pooled_samples,
            recompute_s=self.latency.prefill_s(request.context_tokens))
        REQUESTS.labels("PredictToolDuration", "OK").inc()
        LATENCY.labels("PredictToolDuration").observe(time.perf_counter() - start)
        return reply

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)


def build_service(ranker: LengthRanker | None = None, limits: Limits = Limits(),
                  internal_token: InternalToken | None = None) -> serving.Service:
    """The predictor service; with `internal_token` every method but RankLengths (public, DESIGN.md) needs it."""
    ranker = ranker if ranker is not None else load_ranker()
    servicer = PredictorServicer(ranker, limits)

    def register(server: grpc.aio.Server) -> None:
        predictor_pb2_grpc.add_PredictorServicer_to_server(servicer, server)

    async def on_stop() -> None:
        servicer.close()

    service = serving.Service(name="predictor", service_names=[SERVICE_NAME], register=register, on_stop=on_stop,
                              internal_token=internal_token, public_methods=frozenset({f"/{SERVICE_NAME}/RankLengths"}))
    service.servicer = servicer  # for tests and embedding
    return service


def configure_parser(parser: argparse.ArgumentParser) -> None:
    settings.add_service_flags(parser, port=50071, metrics_port=9171)
    settings.add(parser, "--ranker", default="auto",
                 help="'auto' (trained artefact if present, else heuristic), 'heuristic', or an artefact path")
    settings.add(parser, "--max-prompts", type=int, default=Limits.max_prompts, help="prompts per call, at most")
    settings.add(parser, "--max-prompt-chars", type=int, default=Limits.max_prompt_chars,
                 help="characters per prompt, at most")


def run(args: argparse.Namespace):
    logs.configure("predictor", args.log_level)
    ranker = load_ranker(None if args.ranker == "auto" else args.ranker, required=args.ranker not in ("auto", "heuristic"))
    log.info("config", ranker=ranker.name, max_prompts=args.max_prompts, max_prompt_chars=args.max_prompt_chars)
    service = build_service(ranker, Limits(args.max_prompts, args.max_prompt_chars), internal_auth.from_args(args))
    return serving.serve_forever(service, args.host, args.port, args.metrics_port,
                                   serving.credentials_from(args))
