"""qllm.v1.Predictor over grpc.aio: a thin translation between the wire and the ranker.

Torch-backed rankers run on a one-thread executor, off the event loop (calls queue there one at a time,
each using one torch thread); the heuristic runs inline.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
from prometheus_client import Counter, Histogram

from predictor.limits import InvalidInput, Limits
from predictor.ranker import LengthRanker, load_ranker
from qllm import logs, serving, settings
from qllm.v1 import predictor_pb2, predictor_pb2_grpc

SERVICE_NAME = predictor_pb2.DESCRIPTOR.services_by_name["Predictor"].full_name
log = logs.get_logger(__name__)

REQUESTS = Counter("qllm_predictor_requests_total", "Predictor RPCs", ["rpc", "code"])
BATCH = Histogram("qllm_predictor_batch_size", "Prompts per RankLengths call",
                  buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024))
LATENCY = Histogram("qllm_predictor_latency_seconds", "Predictor RPC handling time", ["rpc"],
                    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5))


class PredictorServicer(predictor_pb2_grpc.PredictorServicer):
    def __init__(self, ranker: LengthRanker, limits: Limits = Limits()):
        self.ranker = ranker
        self.limits = limits
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ranker") if ranker.uses_torch else None

    async def _score(self, prompts: list[str]) -> list[float]:
        if not prompts:
            return []
        if self._executor is None:
            return self.ranker.score(prompts)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self.ranker.score, prompts)

    async def RankLengths(self, request: predictor_pb2.RankRequest, context: grpc.aio.ServicerContext):
        start = time.perf_counter()
        prompts = list(request.prompts)
        try:
            self.limits.check_prompts(prompts)
        except InvalidInput as exc:
            REQUESTS.labels("RankLengths", "INVALID_ARGUMENT").inc()
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        scores = await self._score(prompts)
        BATCH.observe(len(prompts))
        REQUESTS.labels("RankLengths", "OK").inc()
        LATENCY.labels("RankLengths").observe(time.perf_counter() - start)
        return predictor_pb2.RankResponse(scores=scores)

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)


def build_service(ranker: LengthRanker | None = None, limits: Limits = Limits()) -> serving.Service:
    ranker = ranker if ranker is not None else load_ranker()
    servicer = PredictorServicer(ranker, limits)

    def register(server: grpc.aio.Server) -> None:
        predictor_pb2_grpc.add_PredictorServicer_to_server(servicer, server)

    async def on_stop() -> None:
        servicer.close()

    service = serving.Service(name="predictor", service_names=[SERVICE_NAME], register=register, on_stop=on_stop)
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
    service = build_service(ranker, Limits(args.max_prompts, args.max_prompt_chars))
    return serving.serve_forever(service, args.host, args.port, args.metrics_port)
