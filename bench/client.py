"""Replays a workload against a server and records, per request, when it was sent, each token's arrival and
its end. The replay loop is transport-free; a `Sender` does one request (gRPC Router here, OpenAI-compatible
HTTP in bench/openai_client.py).

Open loop (`replay`): each request is sent at its arrival offset whatever the server is doing, as real
traffic is. Everything still running at `duration + drain_cap` is cancelled (the RPC or connection is closed,
so the server can stop work) and recorded as cancelled, never dropped.
Closed loop (`replay_sequential`): one request at a time, for the idle LS floor.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from typing import AsyncIterator, Callable, Protocol, Sequence

from bench.stats import RequestRecord
from bench.workload import BE, LS, RequestSpec
from qllm.client import Client, QLLMError

Clock = Callable[[], float]


class Sender(Protocol):
    label: str

    async def send(self, spec: RequestSpec, rec: RequestRecord, now: Clock) -> None:
        """Sends one request and fills rec (token times, finished_s, finish_reason, error). Must close the
        request on the server when cancelled."""

    async def close(self) -> None: ...


def record_for(spec: RequestSpec) -> RequestRecord:
    return RequestRecord(index=spec.index, cls=spec.cls, arrival_s=spec.arrival_s,
                         prompt_tokens=spec.prompt_tokens, max_tokens=spec.max_tokens)


def add_tokens(rec: RequestRecord, n: int, t: float) -> None:
    if n <= 0:
        return
    if rec.first_token_s is None:
        rec.first_token_s = t
    rec.token_times_s.extend([t] * n)


def reconcile_count(rec: RequestRecord, server_count: int | None) -> None:
    """Where the server reports more output tokens than the stream showed one by one (several tokens in one
    message), the missing ones count at the last message's time; TPOT then divides by the true count, as
    vLLM's benchmark does."""
    if server_count and rec.token_times_s and server_count > rec.output_tokens:
        rec.token_times_s.extend([rec.token_times_s[-1]] * (server_count - rec.output_tokens))


async def _run_one(sender: Sender, spec: RequestSpec, rec: RequestRecord, now: Clock) -> None:
    rec.sent_s = now()
    try:
        await sender.send(spec, rec, now)
    except asyncio.CancelledError:
        rec.cancelled = True
        rec.finished_s = now()
        rec.finish_reason = rec.finish_reason or "cancelled-by-bench"
        raise
    except Exception as exc:  # a transport failure of this request only
        rec.error = rec.error or f"{type(exc).__name__}: {exc}"
        rec.finished_s = now()
    if rec.finished_s is None:
        rec.finished_s = now()


def progress_bar(total: int, label: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=label, unit="req", disable=not enabled, file=sys.stderr, leave=True,
                dynamic_ncols=True)


async def replay(sender: Sender, specs: Sequence[RequestSpec], *, duration_s: float, drain_cap_s: float,
                 progress: bool = True, label: str = "") -> list[RequestRecord]:
    """Open-loop replay; returns one record per spec, in spec order."""
    t0 = time.perf_counter()

    def now() -> float:
        return time.perf_counter() - t0

    records = [record_for(s) for s in specs]
    bar = progress_bar(len(specs), label or sender.label, progress)
    inflight = 0

    async def one(spec: RequestSpec, rec: RequestRecord) -> None:
        nonlocal inflight
        delay = spec.arrival_s - now()
        if delay > 0:
            try:
                await asyncio.sleep(delay)
            except asyncio.CancelledError:
                # finished_s = when the bench gave up on it: its TTFT counts as at least this (bench/stats.py)
                rec.cancelled, rec.finish_reason, rec.finished_s = True, "not-sent-before-drain-cap", now()
                raise
        inflight += 1
        try:
            await _run_one(sender, spec, rec, now)
        finally:
            inflight -= 1
            if not rec.cancelled:
                bar.update(1)
                bar.set_postfix(inflight=inflight, t=f"{now():.0f}s", refresh=False)

    tasks = [asyncio.create_task(one(s, r)) for s, r in zip(specs, records)]
    try:
        deadline = max(duration_s, max((s.arrival_s for s in specs), default=0.0)) + drain_cap_s
        pending = await wait_then_cancel(tasks, deadline - now())
        if pending:
            bar.set_postfix(cancelled=sum(r.cancelled for r in records), refresh=False)
            bar.update(len(pending))
    finally:
        for task in tasks:
            task.cancel()
        bar.close()
    return records


async def replay_sequential(sender: Sender, specs: Sequence[RequestSpec], *, duration_s: float | None = None,
                            per_request_cap_s: float = 60.0, gap_s: float = 0.05, progress: bool = True,
                            label: str = "") -> list[RequestRecord]:
    """Closed loop: sends the specs one after another (arrival offsets ignored) until they run out or
    `duration_s` has passed. Records carry arrival_s = the actual send offset."""
    t0 = time.perf_counter()

    def now() -> float:
        return time.perf_counter() - t0

    records: list[RequestRecord] = []
    bar = progress_bar(len(specs), label or sender.label, progress)
    try:
        for spec in specs:
            if duration_s is not None and now() >= duration_s:
                break
            rec = record_for(spec)
            rec.arrival_s = now()
            records.append(rec)
            task = asyncio.create_task(_run_one(sender, spec, rec, now))
            done, _ = await asyncio.wait([task], timeout=per_request_cap_s)
            if not done:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
            bar.update(1)
            if gap_s:
                await asyncio.sleep(gap_s)
    finally:
        bar.close()
    return records


# ----------------------------------------------------------------------------------------------- gRPC


CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
]


async def wait_then_cancel(tasks: list[asyncio.Task], timeout_s: float) -> set[asyncio.Task]:
    """Waits up to timeout_s for the tasks, cancels those still running (the drain cap) and waits for them
    to unwind; returns them."""
    if not tasks:
        return set()
    _, pending = await asyncio.wait(tasks, timeout=max(0.0, timeout_s))
    for task in pending:
        task.cancel()
    if pending:
        await asyncio.gather(*pending, return_exceptions=True)
    return pending


async def consume_generate(messages: AsyncIterator, rec: RequestRecord, now: Clock) -> list[str]:
    """Reads one Router/Generate stream (qllm.client's generate_raw) into rec (token times, finish reason, the
    server's counts, cached prompt tokens where the record keeps them, or the error); returns the texts of its
    messages. Cancelled, it closes the stream, which cancels the RPC."""
    parts: list[str] = []
    finished = False
    server_count = None
    try:
        async with contextlib.aclosing(messages):
            async for msg in messages:
                add_tokens(rec, len(msg.token_ids), now())
                parts.append(msg.text)
                if msg.finished:
                    finished = True
                    rec.finish_reason = msg.finish_reason
                    rec.server_prompt_tokens = msg.prompt_tokens or None
                    if hasattr(rec, "cached_prompt_tokens"):
                        rec.cached_prompt_tokens = msg.cached_prompt_tokens
                    server_count = msg.completion_tokens or None
    except QLLMError as exc:
        rec.error = f"{exc.code.name}: {exc.message}"
    rec.finished_s = now()
    reconcile_count(rec, server_count)
    if not rec.error:
        if not finished:
            rec.error = "stream ended without a finished message"
        elif rec.finish_reason in ("error", "cancelled"):
            rec.error = f"finish_reason={rec.finish_reason}"
    return parts


class GrpcSender:
    """qllm.v1.Router/Generate through qllm.client. One client (channel) per class, so BE streams never queue
    LS ones in the client's HTTP/2 connection."""

    def __init__(self, address: str, *, request_id_prefix: str = "bench", temperature: float = 0.0,
                 ignore_eos: bool = True, timeout_s: float | None = None):
        from qllm.v1 import common_pb2, router_pb2

        self._pb = router_pb2
        self.label = address
        self.address = address
        self.prefix = request_id_prefix
        self.temperature = temperature
        self.ignore_eos = ignore_eos
        self.timeout_s = timeout_s
        self._priority = {LS: common_pb2.PRIORITY_LATENCY_SENSITIVE, BE: common_pb2.PRIORITY_BEST_EFFORT}
        self._clients = {cls: Client(address, timeout_s=timeout_s, channel_options=CHANNEL_OPTIONS)
                         for cls in (LS, BE)}

    async def send(self, spec: RequestSpec, rec: RequestRecord, now: Clock) -> None:
        request = self._pb.GenerateRequest(
            prompt=spec.prompt, max_tokens=spec.max_tokens, priority=self._priority[spec.cls],
            ignore_eos=self.ignore_eos, temperature=self.temperature, request_id=f"{self.prefix}-{spec.index}")
        await consume_generate(self._clients[spec.cls].generate_raw(request), rec, now)

    async def close(self) -> None:
        for client in self._clients.values():
            await client.close()
