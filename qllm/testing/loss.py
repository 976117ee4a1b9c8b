"""A worker lost while requests stream on it: in-process (stopped with grace 0) and against real processes
(SIGKILL). Each stream is compared with a clean run of the same request: a replay on another worker must
give the same tokens, none twice and none missing."""

from __future__ import annotations

import asyncio
import os
import signal
import tempfile
import time
import urllib.request

import grpc

from qllm.testing.fleet import BE, LS, Fleet, StreamRecord, counter, error_counts, run_stream
from qllm.v1 import router_pb2_grpc
from router import metrics as router_metrics


def loss_request(i: int, max_tokens: int) -> dict:
    fields = dict(prompt=f"Request {i} of the fleet asks about experts number {i * 7 % 13} and more.",
                  max_tokens=max_tokens, ignore_eos=True, priority=LS if i % 4 == 0 else BE)
    if i % 3 == 2:
        fields["temperature"] = 0.8  # seeded from the request id: a replay samples the same tokens
    return fields


async def measure_worker_loss(fleet: Fleet, n: int = 48, max_tokens: int = 24, kill_after_tokens: int = 4,
                              victim: int = 0) -> dict:
    """Streams n requests through the 2-worker fleet, stops `victim` (grace 0) once every request streaming
    on it has at least `kill_after_tokens` tokens, and checks each stream against a clean run."""
    requests = {f"loss-{i}": loss_request(i, max_tokens) for i in range(n)}
    # Clean reference: the same requests (same ids, so the same sampling seeds), same load, nobody killed.
    ref = await asyncio.gather(*[run_stream(fleet.router, StreamRecord(rid), **f) for rid, f in requests.items()])
    assert all(r.finished for r in ref), [r for r in ref if not r.finished][:2]
    reference = {r.rid: r.tokens for r in ref}

    requeued0, unavailable0 = counter(router_metrics.REQUEUED), counter(router_metrics.LOST)
    records = {rid: StreamRecord(rid) for rid in requests}
    tasks = [asyncio.create_task(run_stream(fleet.router, records[rid], **f)) for rid, f in requests.items()]
    victim_address = fleet.workers[victim].address
    deadline = time.monotonic() + 60
    on_victim: list[str] = []
    while time.monotonic() < deadline:
        on_victim = [rid for rid, job in fleet.jobs().items()
                     if job.worker is not None and job.worker.address == victim_address]
        if on_victim and all(len(records[rid].tokens) >= kill_after_tokens for rid in on_victim):
            break
        await asyncio.sleep(0.002)
    tokens_before_kill = {rid: len(records[rid].tokens) for rid in on_victim}
    t_kill = time.monotonic()
    await fleet.kill_worker(victim, grace_s=0.0)
    done, pending = await asyncio.wait(tasks, timeout=120)
    for t in pending:
        t.cancel()
    elapsed = time.monotonic() - t_kill

    out = list(records.values())
    completed = [r for r in out if r.finished and r.code is None]
    errors = error_counts(out)
    lost = [r.rid for r in out if not r.finished and r.code is None]
    mismatched = [r.rid for r in completed if r.tokens != reference[r.rid]]
    wrong_length = [r.rid for r in completed if len(r.tokens) != max_tokens or r.completion_tokens != max_tokens]
    replayed = [rid for rid in on_victim if records[rid].finished]
    # After the loss the fleet still serves.
    after = await run_stream(fleet.router, StreamRecord("loss-after"), prompt="still serving?", max_tokens=3,
                             ignore_eos=True)
    return {
        "requests": n, "max_tokens": max_tokens,
        "on_killed_worker": len(on_victim),
        "tokens_streamed_before_kill": {"min": min(tokens_before_kill.values(), default=0),
                                        "max": max(tokens_before_kill.values(), default=0)},
        "completed": len(completed),
        "requeued": int(counter(router_metrics.REQUEUED) - requeued0),
        "unavailable": errors.get("UNAVAILABLE", 0),
        "unavailable_metric": int(counter(router_metrics.LOST) - unavailable0),
        "other_errors": {k: v for k, v in errors.items() if k != "UNAVAILABLE"},
        "lost": len(lost),
        "replayed_completed": len(replayed),
        "replayed_exact": sum(1 for rid in replayed if records[rid].tokens == reference[rid]),
        "mismatched_vs_clean_run": mismatched,
        "wrong_length": wrong_length,
        "seconds_from_kill_to_all_done": round(elapsed, 3),
        "served_after_loss": after.finished,
    }


def measure_sigkill(n: int = 48, max_tokens: int = 96, port_offset: int = 1300, log_dir: str | None = None) -> dict:
    """The loss measurement against real processes (qllm.up.Stack: predictor, kvmanager, 2 workers, router):
    worker0 gets SIGKILL once every request has streamed a few tokens. The re-queue count is read from the
    router's /metrics. Runs its own event loop."""
    from qllm.up import ROUTER_PORT, Stack, StackConfig

    config = StackConfig(workers=2, port_offset=port_offset, metrics=True, log_dir=log_dir or tempfile.mkdtemp())
    metrics_url = f"http://{config.host}:{config.metrics_port(config.port(ROUTER_PORT))}/metrics"

    def requeued() -> float:
        for line in urllib.request.urlopen(metrics_url, timeout=5).read().decode().splitlines():
            if line.startswith("qllm_router_requeued_total "):
                return float(line.split()[1])
        return 0.0

    async def run() -> dict:
        async with grpc.aio.insecure_channel(config.router_address) as channel:
            stub = router_pb2_grpc.RouterStub(channel)
            requests = {f"kill-{i}": loss_request(i, max_tokens) for i in range(n)}
            ref = await asyncio.gather(*[run_stream(stub, StreamRecord(rid), **f) for rid, f in requests.items()])
            reference = {r.rid: r.tokens for r in ref}
            before = requeued()
            records = {rid: StreamRecord(rid) for rid in requests}
            tasks = [asyncio.create_task(run_stream(stub, records[rid], **f)) for rid, f in requests.items()]
            while not all(len(r.tokens) >= 4 for r in records.values()):
                await asyncio.sleep(0.002)
            proc = next(p for name, _, p in stack.procs if name == "worker0")
            os.kill(proc.pid, signal.SIGKILL)
            t_kill = time.monotonic()
            await asyncio.wait(tasks, timeout=120)
            out = list(records.values())
            return {
                "requests": n, "max_tokens": max_tokens,
                "completed": sum(1 for r in out if r.finished and r.code is None),
                "requeued": int(requeued() - before),
                "errors": sorted({r.code for r in out if r.code}),
                "lost": sum(1 for r in out if not r.finished and r.code is None),
                "exact_vs_clean_run": sum(1 for r in out if r.finished and r.tokens == reference[r.rid]),
                "seconds_from_kill_to_all_done": round(time.monotonic() - t_kill, 3),
            }

    with Stack(config) as stack:
        return asyncio.run(run())
