"""Fleet and robustness figures for the closing note (issue 9), all on CPU with the embedded default.

  .venv/bin/python scripts/measure_fleet.py [--only loss,streams,fuzz,cancel,memory,drain,worker-drain,beam-edge]
                                            [--json OUT]

Every service runs in this process (router + workers as grpc.aio servers on free ports, on one event loop in
a background thread; predictor and kvmanager left out, which the router tolerates). Each measurement returns
a dict; tests/test_fleet.py and tests/test_robustness.py call the same functions and assert on the figures.

1. loss    router + 2 workers, one worker stopped with grace 0 while requests stream: completed /
           re-queued (qllm_router_requeued_total) / UNAVAILABLE / lost, and whether every replayed stream
           equals a clean run of the same request (same tokens, none twice).
2. streams 1,000 concurrent Generate streams (BE, max_tokens 4, ignore_eos) held by the router: errors,
           peak open streams, peak router queue.
3. fuzz    hypothesis-generated requests, valid and malformed: the status each gets against what the contract
           says, and the router still serving afterwards.
4. cancel  a cancelled stream's KV: engine steps between the cancel reaching the engine and the KV being
           freed, and Describe's kv_free_tokens back at capacity.
5. memory  process RSS (VmRSS) before, at the peak of, and after 10,000 tiny requests; leftover state.
6. drain   serving.stop on the router with a grace period while a request is in flight: health
           NOT_SERVING, the in-flight request completes, new requests refused.
   worker-drain  the same on one of two workers while new requests keep coming: where they go, what the
           grace cuts (re-queued and replayed on the other worker), whether anything is lost.
   sigkill   (only when asked: --only sigkill) the loss measurement against subprocesses, worker0 SIGKILLed.
   beam-edge  beam search with extreme finite length_penalty / patience (explicit examples only).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import grpc
import structlog
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from qllm import internal_auth, serving
from qllm.limits import MAX_ABS_LENGTH_PENALTY, MAX_PATIENCE
from qllm.v1 import router_pb2, router_pb2_grpc, worker_pb2, worker_pb2_grpc
from router import metrics as router_metrics
from router import server as router_server
from router.namespaces import client_id_of
from worker import server as worker_server
from worker.engine import EngineConfig
from worker.model_loader import load_model

torch.set_num_threads(1)

LS, BE = 1, 2
HOST = "127.0.0.1"


def rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


router_args = router_server.default_args


@dataclass
class WorkerHandle:
    service: serving.Service
    engine: Any
    server: grpc.aio.Server | None
    port: int
    stub: worker_pb2_grpc.WorkerStub | None = None
    channel: grpc.aio.Channel | None = None

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"


class Fleet:
    """Router + N workers in this process, on free ports. Start and stop on the loop that will use them."""

    def __init__(self, workers: int = 2, engine: dict | None = None, **router_overrides):
        self.n_workers = workers
        self.engine_kwargs = {"kv_budget_tokens": 8192, **(engine or {})}
        # The services authenticate each other as deployed ones do: an internal token in a file.
        self._token_dir = tempfile.mkdtemp(prefix="qllm-fleet-")
        token_file = os.path.join(self._token_dir, "internal-token")
        internal_auth.write_token_file(token_file)
        self.internal_token = internal_auth.InternalToken.from_file(token_file)
        self.router_overrides = {"predictor": "", "kvmanager": "", "internal_token_file": token_file,
                                 **router_overrides}
        self.workers: list[WorkerHandle] = []

    async def start_worker(self, port: int = 0) -> WorkerHandle:
        service, engine = worker_server.build_service(load_model(None), EngineConfig(**self.engine_kwargs),
                                                      internal_token=self.internal_token)
        server, bound = await serving.start(service, HOST, port)
        handle = WorkerHandle(service, engine, server, bound)
        handle.channel = grpc.aio.insecure_channel(handle.address,
                                                   interceptors=internal_auth.client_interceptors(self.internal_token))
        handle.stub = worker_pb2_grpc.WorkerStub(handle.channel)
        return handle

    async def start(self) -> "Fleet":
        for _ in range(self.n_workers):
            self.workers.append(await self.start_worker())
        self.router_service, self.servicer = await router_server.build(router_args(
            workers=",".join(w.address for w in self.workers), **self.router_overrides))
        self.router_server, self.router_port = await serving.start(self.router_service, HOST, 0)
        self.channel = grpc.aio.insecure_channel(f"{HOST}:{self.router_port}", options=serving.GRPC_OPTIONS)
        self.router = router_pb2_grpc.RouterStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)
        # Serve once every worker is connected (the router itself starts with the first).
        for client in self.core.workers:
            await client.wait_connected(30.0)
        return self

    @property
    def core(self):
        return self.servicer.core

    def jobs(self) -> dict:
        """The router's dispatched jobs by the client's request id (the router keys them by its own ids)."""
        return {client_id_of(rid): job for rid, job in list(self.core.jobs.items())}

    @property
    def tokenizer(self):
        return self.workers[0].engine.tokenizer

    async def kill_worker(self, i: int, grace_s: float = 0.0) -> None:
        """Stops worker i as SIGTERM would, with the given grace (0: its streams are cut at once)."""
        w = self.workers[i]
        w.service.grace_s = grace_s
        if w.server is not None:
            await serving.stop(w.service, w.server)
            w.server = None

    async def stop(self) -> None:
        await self.channel.close()
        if self.router_server is not None:
            self.router_service.grace_s = 0
            await serving.stop(self.router_service, self.router_server)
            self.router_server = None
        for i, w in enumerate(self.workers):
            await self.kill_worker(i)
            await w.channel.close()
        shutil.rmtree(self._token_dir, ignore_errors=True)


class LoopThread:
    """An event loop in a background thread: sync code (tests, hypothesis) runs coroutines on it."""

    def __enter__(self) -> "LoopThread":
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="fleet-loop", daemon=True)
        self.thread.start()
        return self

    def run(self, coro, timeout: float | None = 300.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def __exit__(self, *exc) -> None:
        async def cancel_rest():
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        try:
            self.run(cancel_rest(), 30)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(30)
            self.loop.close()


@contextlib.contextmanager
def quiet_logs(level: int = logging.WARNING):
    """structlog at `level` and above only (thousands of requests would otherwise log a line each);
    the previous configuration is restored afterwards."""
    old = structlog.get_config()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(level),
                        cache_logger_on_first_use=False)
    try:
        yield
    finally:
        structlog.configure(**old)


def counter(c) -> float:
    return c._value.get()


# --- 1. a worker lost mid-load ------------------------------------------------------------------------------
@dataclass
class StreamRecord:
    rid: str
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    finished: bool = False
    finish_reason: str = ""
    completion_tokens: int = 0
    code: str | None = None  # gRPC status name when the stream ended with an error
    details: str = ""


async def run_stream(stub, record: StreamRecord, timeout: float = 120.0, **fields) -> StreamRecord:
    try:
        async for m in stub.Generate(router_pb2.GenerateRequest(request_id=record.rid, **fields), timeout=timeout):
            record.tokens.extend(m.token_ids)
            record.text += m.text
            if m.finished:
                record.finished = True
                record.finish_reason = m.finish_reason
                record.completion_tokens = m.completion_tokens
    except grpc.aio.AioRpcError as exc:
        record.code, record.details = exc.code().name, exc.details()
    return record


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
    errors: dict[str, int] = {}
    for r in out:
        if r.code is not None:
            errors[r.code] = errors.get(r.code, 0) + 1
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


# --- 2. 1,000 concurrent streams ----------------------------------------------------------------------------
async def measure_concurrent_streams(fleet: Fleet, n: int = 1000, max_tokens: int = 4) -> dict:
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
    errors: dict[str, int] = {}
    for r in records:
        if r.code is not None:
            errors[r.code] = errors.get(r.code, 0) + 1
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


# --- 3. malformed requests ----------------------------------------------------------------------------------
MAX_PROMPT_BYTES = 1 << 20
MAX_CONTEXT = 4096
MAX_BEAMS = 8


def request_strategy():
    """A valid, cheap request (max_tokens 1-3), then none, one or a few of its fields replaced by a value
    drawn from that field's bad and edge values (some of which are valid: the oracle decides)."""
    from hypothesis import strategies as st

    f32 = st.floats(width=32, allow_nan=True, allow_infinity=True)
    edge = st.sampled_from([0.0, -0.0, -1.0, math.nan, math.inf, -math.inf, 1e-45, 1e-40, 3e38, 1.0000001])
    valid = st.fixed_dictionaries({
        "prompt": st.one_of(st.text(min_size=1, max_size=40).filter(str.strip),
                            st.sampled_from(["hello", "<|endoftext|>", "\x00", "\ufeff", "🙂" * 5, "a\u0301" * 3,
                                             "\u202eright to left", "tab\tnew\nline"])),
        "max_tokens": st.integers(1, 3),
        "priority": st.sampled_from([0, 1, 2]),
        "ignore_eos": st.booleans(),
        "request_id": st.one_of(st.just(""), st.text(max_size=12)),
        "program_id": st.one_of(st.just(""), st.text(min_size=1, max_size=8)),
        "last_turn": st.just(False),
        "num_beams": st.sampled_from([0, 0, 1, 2]),
    }, optional={
        "temperature": st.one_of(st.just(0.0), st.floats(0.125, 2.0, width=32)),
        "top_p": st.floats(0.0625, 1.0, width=32),
        "patience": st.floats(0.5, 2.0, width=32),
        "seed": st.integers(0, 2**64 - 1),
        "length_penalty": st.floats(-2.0, 2.0, width=32),
    })
    bad = {
        "prompt": st.one_of(st.just(""), st.text(alphabet=" \t\n\r\u3000\u00a0\u2028\u205f", min_size=1, max_size=8),
                            st.integers(1, 4096).map(lambda k: "x" * (MAX_PROMPT_BYTES + k)),  # over the byte limit
                            st.integers(2100, 2600).map(lambda k: "hello " * k),  # over the worker's KV budget
                            st.integers(4100, 4200).map(lambda k: "hello " * k)),  # over the model context
        "max_tokens": st.one_of(st.just(0), st.integers(2049, MAX_CONTEXT + 8), st.integers(MAX_CONTEXT, 2**32 - 1)),
        "temperature": st.one_of(edge, f32),
        "top_p": st.one_of(edge, f32),
        "priority": st.one_of(st.integers(3, 2**31 - 1), st.integers(-2**31, -1)),
        "num_beams": st.one_of(st.integers(2, MAX_BEAMS), st.integers(MAX_BEAMS + 1, 2**32 - 1)),
        "patience": st.one_of(edge, f32),
        "last_turn": st.just(True),  # with program_id cleared below
        "request_id": st.integers(257, 1000).map(lambda k: "r" * k),
        "length_penalty": st.one_of(edge, f32),
    }

    @st.composite
    def requests(draw):
        fields = draw(valid)
        for name in draw(st.lists(st.sampled_from(sorted(bad)), max_size=3, unique=True)):
            fields[name] = draw(bad[name])
            if name == "last_turn":
                fields["program_id"] = ""
        return fields

    return requests()


def expected_outcome(fields: dict, n_prompt_tokens: int, kv_capacity: int) -> tuple[set[str], set[str]]:
    """What the contract (README, Errors) says a request gets: the acceptable status codes and the fields
    the message may name. `bad` must be refused by the router; `doubtful` may be (values the contract leaves
    open: extreme or non-finite patience or length_penalty, sampling together with beam search)."""
    bad: set[str] = set()
    doubtful: set[str] = set()
    prompt = fields["prompt"]
    if not prompt.strip() or len(prompt.encode("utf-8")) > MAX_PROMPT_BYTES:
        bad.add("prompt")
    mt = fields["max_tokens"]
    if mt == 0 or mt >= MAX_CONTEXT:
        bad.add("max_tokens")
    t = fields.get("temperature", 0.0)
    if not math.isfinite(t) or t < 0:
        bad.add("temperature")
    elif fields["num_beams"] > 1 and t > 0:
        doubtful.add("temperature")
    if "top_p" in fields and not (0.0 < fields["top_p"] <= 1.0):
        bad.add("top_p")
    if fields["priority"] not in (0, 1, 2):
        bad.add("priority")
    if fields["num_beams"] > MAX_BEAMS:
        bad.add("num_beams")
    if "patience" in fields and not 0 < fields["patience"] <= MAX_PATIENCE:
        bad.add("patience")
    if "length_penalty" in fields and not abs(fields["length_penalty"]) <= MAX_ABS_LENGTH_PENALTY:  # also NaN
        bad.add("length_penalty")
    if fields["last_turn"] and not fields["program_id"]:
        bad.add("last_turn")
    if len(fields["request_id"]) > 256:
        bad.add("request_id")
    if bad:
        return {"INVALID_ARGUMENT"}, bad | doubtful
    codes, names = set(), set(doubtful)
    if doubtful:
        codes.add("INVALID_ARGUMENT")
    # Past the router: what the worker decides.
    if n_prompt_tokens == 0:
        return codes | {"INVALID_ARGUMENT"}, names | {"prompt"}
    if n_prompt_tokens + mt > MAX_CONTEXT:
        return codes | {"INVALID_ARGUMENT"}, names | {"max_tokens", "prompt"}
    if n_prompt_tokens + mt > kv_capacity:
        return codes | {"RESOURCE_EXHAUSTED"}, names | {"max_tokens"}
    if fields["num_beams"] > 1:
        # Beam search: served, or refused as not implemented (naming the field) where the worker lacks it.
        return codes | {"OK", "UNIMPLEMENTED"}, names | {"num_beams"}
    return codes | {"OK"}, names


def base_request(**fields) -> dict:
    return {"prompt": "hello", "max_tokens": 2, "priority": 0, "ignore_eos": True, "request_id": "",
            "program_id": "", "last_turn": False, "num_beams": 0, **fields}


# Edge values every run tries first (hypothesis' explicit examples): floats at the ends of float32.
EDGE_EXAMPLES = [base_request(temperature=t) for t in (1e-45, 1e-40, 1e-30, 3e38, math.inf)] + [
    base_request(temperature=1.0, top_p=1e-45),
    base_request(prompt="hello " * 4100, max_tokens=1),
    base_request(prompt="\x00"), base_request(prompt="<|endoftext|>"),
    base_request(max_tokens=MAX_CONTEXT - 1),
]
# Beam search with extreme (finite) patience and length_penalty.
BEAM_EDGE_EXAMPLES = [base_request(num_beams=2, length_penalty=lp) for lp in (3e38, -3e38, 1000.0, -1000.0)] + [
    base_request(num_beams=MAX_BEAMS, patience=p) for p in (3e38, 1e-45)]


def measure_malformed(lt: LoopThread, fleet: Fleet, n: int = 1000, check: bool = True, seed: int | None = 0,
                      timeout: float = 20.0, explicit: list[dict] = EDGE_EXAMPLES) -> dict:
    """Sends n hypothesis-generated requests through the router; with check, asserts each against
    expected_outcome (hypothesis then shrinks a failure to a minimal request)."""
    from hypothesis import HealthCheck, Phase, example, given, settings

    engine = fleet.workers[0].engine
    capacity = engine.core.allocator.capacity_tokens
    tally: dict[str, int] = {}
    surprises: list[dict] = []
    examples = [0]

    async def send(fields: dict) -> tuple[str, str]:
        """The status name, or for a stream that ended without one: OK when it finished properly,
        FINISHED_<REASON> when it finished with another reason (error), LOST when it just stopped."""
        last = None
        tokens = 0
        try:
            async for m in fleet.router.Generate(router_pb2.GenerateRequest(**fields), timeout=timeout):
                last = m
                tokens += len(m.token_ids)
        except grpc.aio.AioRpcError as exc:
            return exc.code().name, exc.details() or ""
        if last is None or not last.finished:
            return "LOST", f"stream ended without a finished message after {tokens} tokens"
        if last.finish_reason not in ("length", "stop") or not 0 < tokens <= fields["max_tokens"]:
            return f"FINISHED_{last.finish_reason.upper()}", f"finish_reason {last.finish_reason!r}, {tokens} tokens"
        return "OK", ""

    # No shrinking: a failure that wedges the worker would make every shrink step wait out its deadline.
    @settings(max_examples=n, deadline=None, database=None, derandomize=seed is not None,
              suppress_health_check=list(HealthCheck), print_blob=True,
              phases=[Phase.explicit, Phase.reuse, Phase.generate])
    @given(request_strategy())
    def probe(fields):
        examples[0] += 1
        # The same request may come twice (shrinking); ids must not collide with one still running.
        n_tokens = len(engine.encode(fields["prompt"])) if len(fields["prompt"]) <= MAX_PROMPT_BYTES else 0
        codes, names = expected_outcome(fields, n_tokens, capacity)
        code, details = lt.run(send(fields), timeout + 5)
        tally[code] = tally.get(code, 0) + 1
        named = details.split(":", 1)[0] if code != "OK" else ""
        ok = code in codes and (code == "OK" or named in names)
        if not ok:
            shown = {k: (v if not isinstance(v, str) or len(v) < 80 else f"<{len(v)} chars>") for k, v in fields.items()}
            surprises.append({"fields": shown, "expected": sorted(codes), "fields_named": sorted(names),
                              "got": code, "details": details[:200]})
            if check or code == "DEADLINE_EXCEEDED":  # a request that hangs: the worker is wedged, stop
                raise AssertionError(surprises[-1])

    for fields in reversed(explicit):
        probe = example(fields)(probe)
    started = time.monotonic()
    failure = None
    try:
        probe()
    except AssertionError as exc:
        failure = str(exc)[:2000]
    elapsed = time.monotonic() - started

    async def still_serving():
        health = await fleet.health.Check(health_pb2.HealthCheckRequest(service=""))
        rec = await run_stream(fleet.router, StreamRecord("fuzz-after"), timeout=timeout, prompt="a normal request",
                               max_tokens=3, ignore_eos=True, priority=LS)
        return health.status == health_pb2.HealthCheckResponse.SERVING, rec.finished and len(rec.tokens) == 3

    healthy, served = lt.run(still_serving())
    raw = lt.run(send_invalid_utf8(fleet))
    return {"examples": examples[0], "by_status": dict(sorted(tally.items())), "surprises": surprises[:20],
            "n_surprises": len(surprises), "failure": failure, "seconds": round(elapsed, 2),
            "health_serving_after": healthy, "normal_request_after": served, "invalid_utf8_prompt": raw}


async def send_invalid_utf8(fleet: Fleet) -> str:
    """A GenerateRequest whose prompt bytes are not UTF-8 (a client that bypasses protobuf's checks)."""
    raw = router_pb2.GenerateRequest(prompt="PLACEHOLDER", max_tokens=2).SerializeToString()
    raw = raw.replace(b"PLACEHOLDER", b"bad \xff\xfe bytes")  # same length: the length prefix stays right
    call = fleet.channel.unary_stream("/qllm.v1.Router/Generate", request_serializer=lambda b: b,
                                      response_deserializer=router_pb2.GenerateResponse.FromString)
    try:
        async for _ in call(raw, timeout=10):
            pass
    except grpc.aio.AioRpcError as exc:
        return f"{exc.code().name}: {exc.details()}"
    return "OK"


async def measure_bystander(fleet: Fleet, bad_fields: dict, max_tokens: int = 40) -> dict:
    """A normal request streams while a request with `bad_fields` arrives: what each gets."""
    other = StreamRecord("bystander")
    task = asyncio.create_task(run_stream(fleet.router, other, prompt="an innocent request", max_tokens=max_tokens,
                                          ignore_eos=True))
    while not other.tokens and not task.done():
        await asyncio.sleep(0.002)
    fields = {k: v for k, v in bad_fields.items() if k != "request_id"}
    bad = await run_stream(fleet.router, StreamRecord("bad"), timeout=20, **fields)
    await task
    return {"bad": {"code": bad.code or "OK", "finish_reason": bad.finish_reason, "tokens": len(bad.tokens),
                    "details": bad.details},
            "bystander": {"code": other.code or "OK", "finish_reason": other.finish_reason,
                          "tokens": len(other.tokens), "max_tokens": max_tokens}}


# --- 4. cancel frees KV ------------------------------------------------------------------------------------
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
            if (info.kv_free_tokens == info.kv_capacity_tokens and info.num_running == 0) or time.monotonic() > deadline:
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


# --- 5. memory after 10,000 requests ------------------------------------------------------------------------
async def measure_memory(fleet: Fleet, n: int = 10_000, concurrency: int = 64, warmup: int = 500) -> dict:
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


# --- 6. drain ---------------------------------------------------------------------------------------------
async def measure_drain(fleet: Fleet, grace_s: float = 10.0, max_tokens: int = 64) -> dict:
    """serving.stop on the router (what SIGTERM runs) while a request streams."""
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
    new_fresh = new_same = None
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
    """serving.stop on one of two workers (what SIGTERM runs) with a grace period, while a request streams on it
    and new requests keep arriving at the router: where they go, and whether any is lost."""
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


def measure_sigkill(n: int = 48, max_tokens: int = 24, port_offset: int = 1300, log_dir: str | None = None) -> dict:
    """The loss measurement against real processes (qllm.up.Stack: predictor, kvmanager, 2 workers, router):
    worker0 gets SIGKILL once every request has streamed a few tokens. The re-queue count is read from the
    router's /metrics."""
    import os
    import signal
    import tempfile
    import urllib.request

    from qllm.up import Stack, StackConfig

    config = StackConfig(workers=2, port_offset=port_offset, metrics=True, log_dir=log_dir or tempfile.mkdtemp())
    metrics_url = f"http://{config.host}:{config.metrics_port(config.port(50051))}/metrics"

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


# --- the script --------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="loss,streams,fuzz,cancel,memory,drain,worker-drain,beam-edge")
    parser.add_argument("--fuzz-examples", type=int, default=1000)
    parser.add_argument("--memory-requests", type=int, default=10_000)
    parser.add_argument("--streams", type=int, default=1000)
    parser.add_argument("--json", default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    wanted = args.only.split(",")
    figures: dict[str, Any] = {}

    def show(name, result, seconds):
        figures[name] = result
        print(f"== {name} ({seconds:.1f} s)\n{json.dumps(result, indent=2, default=str)}", flush=True)

    with quiet_logs(), LoopThread() as lt:
        def timed(name, fleet_kwargs, fn):
            started = time.monotonic()
            fleet = lt.run(Fleet(**fleet_kwargs).start())
            try:
                result = fn(fleet)
            finally:
                lt.run(fleet.stop())
            show(name, result, time.monotonic() - started)

        if "loss" in wanted:
            timed("loss", {"workers": 2}, lambda f: lt.run(measure_worker_loss(f)))
        if "streams" in wanted:
            timed("streams", {"workers": 1}, lambda f: lt.run(measure_concurrent_streams(f, args.streams)))
        if "fuzz" in wanted:
            timed("fuzz", {"workers": 1, "engine": {"kv_budget_tokens": 2048}},
                  lambda f: measure_malformed(lt, f, args.fuzz_examples, check=False))
        if "cancel" in wanted:
            timed("cancel", {"workers": 1},
                  lambda f: [lt.run(measure_cancel(f)), lt.run(measure_cancel(f, with_companion=True))])
        if "memory" in wanted:
            timed("memory", {"workers": 1}, lambda f: lt.run(measure_memory(f, args.memory_requests), 1200))
        if "drain" in wanted:
            timed("drain", {"workers": 1, "drain_grace_s": 10.0}, lambda f: lt.run(measure_drain(f)))
        if "worker-drain" in wanted:
            for grace in (3.0, 0.3):
                timed(f"worker-drain-grace-{grace}", {"workers": 2}, lambda f: lt.run(measure_worker_drain(f, grace)))
        if "beam-edge" in wanted:
            timed("beam-edge", {"workers": 1}, lambda f: measure_malformed(
                lt, f, 1, check=False, timeout=5.0, explicit=BEAM_EDGE_EXAMPLES))
            timed("beam-edge-bystander", {"workers": 1}, lambda f: lt.run(measure_bystander(
                f, base_request(num_beams=2, length_penalty=3e38))))
    if "sigkill" in wanted:  # its own event loop, after the in-process one is gone
        started = time.monotonic()
        show("sigkill", measure_sigkill(), time.monotonic() - started)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=2, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
