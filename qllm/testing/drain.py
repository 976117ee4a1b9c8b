"""Drain on stop (what SIGTERM runs): the router, or one of two workers, stopped with a grace period while a
request streams and new ones arrive."""

from __future__ import annotations

import asyncio
import time

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from qllm import serving
from qllm.testing.fleet import BE, HOST, LS, Fleet, StreamRecord, counter, run_stream
from qllm.v1 import router_pb2, router_pb2_grpc
from router import metrics as router_metrics


async def measure_drain(fleet: Fleet, grace_s: float = 10.0, max_tokens: int = 64) -> dict:
    """serving.stop on the router while a request streams: the health statuses seen, whether the request in
    flight completes, and what a new request gets meanwhile."""
    statuses: list[str] = []
    watch = fleet.health.Watch(health_pb2.HealthCheckRequest(service=""))

    async def watch_health():
        try:
            async for reply in watch:
                statuses.append(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))
        except (grpc.aio.AioRpcError, asyncio.CancelledError):  # a cancelled call raises CancelledError
            pass

    watcher = asyncio.create_task(watch_health())
    inflight = StreamRecord("drain-inflight")
    first = asyncio.Event()

    async def stream():
        try:
            async for m in fleet.router.Generate(router_pb2.GenerateRequest(
                    prompt="a request in flight during the drain", max_tokens=max_tokens, ignore_eos=True,
                    priority=LS, request_id=inflight.rid), timeout=60):
                inflight.tokens.extend(m.token_ids)
                first.set()
                if m.finished:
                    inflight.finished = True
        except grpc.aio.AioRpcError as exc:
            inflight.code, inflight.details = exc.code().name, exc.details()
        first.set()

    streaming = asyncio.create_task(stream())
    await first.wait()
    tokens_at_stop = len(inflight.tokens)
    fleet.router_service.grace_s = grace_s
    t0 = time.monotonic()
    stopping = asyncio.create_task(serving.stop(fleet.router_service, fleet.router_server))
    while "NOT_SERVING" not in statuses and time.monotonic() - t0 < 5:
        await asyncio.sleep(0.001)
    not_serving_ms = (time.monotonic() - t0) * 1000
    watch.cancel()
    # A new request during the drain, on a fresh connection and on the existing one.
    async with grpc.aio.insecure_channel(f"{HOST}:{fleet.router_port}") as ch:
        rec = await run_stream(router_pb2_grpc.RouterStub(ch), StreamRecord("drain-new-fresh"), timeout=5,
                               prompt="new during drain", max_tokens=2, ignore_eos=True)
        new_fresh = rec.code or "OK"
    rec = await run_stream(fleet.router, StreamRecord("drain-new-same"), timeout=5, prompt="new during drain",
                           max_tokens=2, ignore_eos=True)
    new_same = rec.code or "OK"
    still_streaming_when_refused = not streaming.done()
    await streaming
    done_s = time.monotonic() - t0
    await stopping
    stop_s = time.monotonic() - t0
    await watcher
    fleet.router_server = None
    return {
        "grace_s": grace_s, "health_statuses_seen": statuses,
        "ms_to_not_serving": round(not_serving_ms, 2),
        "inflight_tokens_at_stop": tokens_at_stop,
        "inflight_completed": inflight.finished and len(inflight.tokens) == max_tokens,
        "inflight_error": inflight.code,
        "new_request_fresh_connection": new_fresh, "new_request_same_connection": new_same,
        "inflight_still_streaming_when_new_refused": still_streaming_when_refused,
        "s_to_inflight_done": round(done_s, 3), "s_to_server_stopped": round(stop_s, 3),
    }


async def measure_worker_drain(fleet: Fleet, grace_s: float = 3.0, max_tokens: int = 48, new_requests: int = 6
                               ) -> dict:
    """serving.stop on one of two workers with a grace period, while a request streams on it and new requests
    keep arriving at the router: where they go, and whether any is lost."""
    requeued0 = counter(router_metrics.REQUEUED)
    inflight = StreamRecord("wdrain-inflight")
    task = asyncio.create_task(run_stream(fleet.router, inflight, prompt="in flight on the draining worker",
                                          max_tokens=max_tokens, ignore_eos=True, priority=BE))
    while not inflight.tokens:
        await asyncio.sleep(0.002)
    # The worker to drain is the one the request runs on.
    victim = next(w for w in fleet.workers if w.address == fleet.jobs()[inflight.rid].worker_address)
    victim.service.grace_s = grace_s
    t0 = time.monotonic()
    stopping = asyncio.create_task(serving.stop(victim.service, victim.server))
    # When the worker itself stopped, not when the requests it handed over finished elsewhere.
    stopped_at: list[float] = []
    stopping.add_done_callback(lambda _: stopped_at.append(time.monotonic()))
    await asyncio.sleep(0.05)
    health = health_pb2_grpc.HealthStub(victim.channel)
    try:
        status = health_pb2.HealthCheckResponse.ServingStatus.Name(
            (await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=2)).status)
    except grpc.aio.AioRpcError as exc:
        status = exc.code().name
    news = [StreamRecord(f"wdrain-new-{i}") for i in range(new_requests)]
    new_tasks = [asyncio.create_task(run_stream(fleet.router, r, prompt=f"new request {i} during a worker drain",
                                                max_tokens=max_tokens, ignore_eos=True, priority=BE))
                 for i, r in enumerate(news)]
    await asyncio.sleep(0.05)
    jobs = fleet.jobs()
    sent_to_draining = sum(1 for r in news if r.rid in jobs and jobs[r.rid].worker_address == victim.address)
    await asyncio.gather(task, *new_tasks)
    inflight_done_s = time.monotonic() - t0
    await stopping
    stop_s = stopped_at[0] - t0
    victim.server = None
    return {
        "grace_s": grace_s,
        "draining_worker_health_check": status,
        "inflight_completed": inflight.finished and len(inflight.tokens) == max_tokens,
        "new_requests": new_requests,
        "new_sent_to_draining_worker": sent_to_draining,
        "new_completed": sum(1 for r in news if r.finished and len(r.tokens) == max_tokens),
        "errors": [r.code for r in [inflight, *news] if r.code],
        "lost": sum(1 for r in [inflight, *news] if not r.finished and r.code is None),
        "requeued": int(counter(router_metrics.REQUEUED) - requeued0),
        "s_to_all_done": round(inflight_done_s, 3), "s_to_worker_stopped": round(stop_s, 3),
    }
