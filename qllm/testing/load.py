"""Load on one fleet: many concurrent streams held by the router, memory across many tiny requests, and a
cancelled stream's KV being freed."""

from __future__ import annotations

import asyncio
import gc
import time
from typing import Any

from qllm.testing.fleet import BE, LS, Fleet, StreamRecord, error_counts, run_stream
from qllm.v1 import router_pb2, worker_pb2
from router.namespaces import client_id_of


def rss_kib() -> int:
    """This process's resident set size (VmRSS)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


async def measure_concurrent_streams(fleet: Fleet, n: int = 1000, max_tokens: int = 4) -> dict:
    """n BE streams opened at once: errors, peak open client streams, and the peaks the router held and
    queued (sampled)."""

    open_streams = peak_open = 0
    peak_queued = peak_router_held = 0
    stop = asyncio.Event()

    async def sample():
        nonlocal peak_queued, peak_router_held
        while not stop.is_set():
            ls, be = fleet.core.queues.counts()
            dispatched = sum(w.in_flight for w in fleet.core.workers)
            peak_queued = max(peak_queued, ls + be)
            peak_router_held = max(peak_router_held, ls + be + dispatched)
            await asyncio.sleep(0.005)

    async def one(i: int) -> StreamRecord:
        nonlocal open_streams, peak_open
        open_streams += 1
        peak_open = max(peak_open, open_streams)
        try:
            return await run_stream(fleet.router, StreamRecord(f"c1k-{i}"), timeout=300, prompt=f"hello {i}",
                                    max_tokens=max_tokens, ignore_eos=True, priority=BE)
        finally:
            open_streams -= 1

    sampler = asyncio.create_task(sample())
    started = time.monotonic()
    records = await asyncio.gather(*[one(i) for i in range(n)])
    elapsed = time.monotonic() - started
    stop.set()
    await sampler
    errors = error_counts(records)
    return {
        "streams": n, "max_tokens": max_tokens, "workers": len(fleet.workers),
        "worker_window": sum(fleet.core.window(w) for w in fleet.core.workers),
        "completed": sum(1 for r in records if r.finished and len(r.tokens) == max_tokens),
        "errors": errors,
        "peak_open_client_streams": peak_open,
        "peak_router_held": peak_router_held,
        "peak_router_queued": peak_queued,
        "seconds": round(elapsed, 2),
    }


async def measure_memory(fleet: Fleet, n: int = 10_000, concurrency: int = 64, warmup: int = 500) -> dict:
    """RSS before, at the peak of, and after n tiny requests (after a warm-up), and the state left behind in
    the engine and the router."""

    async def tiny(i: int, tag: str):
        fields = dict(prompt=f"tiny {i % 97} request", max_tokens=1 + i % 2, ignore_eos=True,
                      priority=LS if i % 5 == 0 else BE)
        if i % 2:
            fields["temperature"] = 0.7
        return await run_stream(fleet.router, StreamRecord(f"{tag}-{i}"), timeout=120, **fields)

    async def run(count: int, tag: str) -> tuple[int, int]:
        sem = asyncio.Semaphore(concurrency)
        ok = err = 0

        async def guarded(i):
            nonlocal ok, err
            async with sem:
                r = await tiny(i, tag)
            if r.finished and r.code is None:
                ok += 1
            else:
                err += 1

        await asyncio.gather(*[guarded(i) for i in range(count)])
        return ok, err

    await run(warmup, "mem-warm")
    gc.collect()
    await asyncio.sleep(0.2)
    baseline = rss_kib()
    tasks_before = len(asyncio.all_tasks())
    peak = baseline
    stop = asyncio.Event()

    async def sample():
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, rss_kib())
            await asyncio.sleep(0.1)

    sampler = asyncio.create_task(sample())
    started = time.monotonic()
    ok, err = await run(n, "mem")
    elapsed = time.monotonic() - started
    stop.set()
    await sampler
    gc.collect()
    await asyncio.sleep(0.2)
    after = rss_kib()
    engine = fleet.workers[0].engine
    core = engine.core
    leftovers = {
        "engine_streams": len(engine._streams),
        "scheduler_requests": len(core.scheduler.requests),
        "sampler_generators": len(core.runner.sampler._generators),
        "kv_used_tokens": core.allocator.capacity_tokens - core.allocator.free_tokens,
        "router_jobs": len(fleet.core.jobs),
        "router_queued": len(fleet.core.queues),
        "worker_client_handlers": sum(w.in_flight for w in fleet.core.workers),
        "extra_asyncio_tasks": len(asyncio.all_tasks()) - tasks_before,
    }
    return {"requests": n, "completed": ok, "errors": err, "seconds": round(elapsed, 2),
            "requests_per_s": round(n / elapsed, 1),
            "rss_baseline_mib": round(baseline / 1024, 1), "rss_peak_mib": round(peak / 1024, 1),
            "rss_after_mib": round(after / 1024, 1), "rss_growth_mib": round((after - baseline) / 1024, 1),
            "leftovers": leftovers}


async def measure_cancel(fleet: Fleet, with_companion: bool = False) -> dict:
    """Cancels a long stream; counts engine steps from the client's cancel and from the cancel reaching the
    engine to the moment the engine releases the request's KV (its `cancelled` output)."""
    w = fleet.workers[0]
    core = w.engine.core
    rid = f"cancel-{'loaded' if with_companion else 'idle'}"
    marks: dict[str, Any] = {}
    orig_cancel, orig_outputs = core.cancel, core._on_outputs

    # The worker knows the request by the router's internal id (router/namespaces.py), which carries the client's.
    def cancel(request_id):
        if client_id_of(request_id) == rid:
            marks["arrived"] = (core.num_steps, time.monotonic())
        orig_cancel(request_id)

    def on_outputs(outputs):
        for out in outputs:
            if client_id_of(out.request_id) == rid and out.finished:
                marks["released"] = (core.num_steps, time.monotonic(), out.finish_reason,
                                     core.allocator.free_tokens)
        orig_outputs(outputs)

    core.cancel, core._on_outputs = cancel, on_outputs
    companion = None
    try:
        info0 = await w.stub.Describe(worker_pb2.DescribeRequest())
        if with_companion:
            companion = fleet.router.Generate(router_pb2.GenerateRequest(
                prompt="companion " * 50, max_tokens=400, ignore_eos=True, priority=BE, request_id="companion"))
            await companion.read()
        call = fleet.router.Generate(router_pb2.GenerateRequest(prompt="long " * 200, max_tokens=1000,
                                                                ignore_eos=True, priority=BE, request_id=rid))
        for _ in range(3):
            await call.read()
        held = await w.stub.Describe(worker_pb2.DescribeRequest())
        steps_at_cancel, t_cancel = core.num_steps, time.monotonic()
        call.cancel()
        while "released" not in marks and time.monotonic() - t_cancel < 10:
            await asyncio.sleep(0.001)
        if companion is not None:
            companion.cancel()
        deadline = time.monotonic() + 10
        while True:
            info = await w.stub.Describe(worker_pb2.DescribeRequest())
            drained = info.kv_free_tokens == info.kv_capacity_tokens and info.num_running == 0
            if drained or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.002)
    finally:
        core.cancel, core._on_outputs = orig_cancel, orig_outputs
    arrived, released = marks.get("arrived"), marks.get("released")
    return {
        "companion_running": with_companion,
        "kv_capacity_tokens": info0.kv_capacity_tokens,
        "kv_free_while_streaming": held.kv_free_tokens,
        "released": released is not None,
        "finish_reason": released[2] if released else None,
        "steps_cancel_reached_engine_to_release": released[0] - arrived[0] if arrived and released else None,
        "steps_client_cancel_to_release": released[0] - steps_at_cancel if released else None,
        "ms_client_cancel_to_release": round(1000 * (released[1] - t_cancel), 2) if released else None,
        "kv_free_after": info.kv_free_tokens, "num_running_after": info.num_running,
    }
