"""The engine: a core thread that owns the scheduler and the model runner, and an asyncio facade.

The core thread loops schedule -> run layers -> sample -> update, as vLLM's EngineCore, so model compute
never blocks the event loop. New requests and cancels reach it through a thread-safe inbox; outputs go back
to the event loop with one call_soon_threadsafe per step. Under a policy that yields at layer boundaries
(qllm) the core checks, between decoder layers, whether LS work has arrived; if so it parks the running
step (hidden states, positions, layout and all) on a stack, runs LS-only steps, then resumes the parked
step at its next layer.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import math
import threading
import time
from dataclasses import dataclass
from typing import AsyncIterator

from worker import beam, metrics
from worker.kv_blocks import BlockAllocator
from worker.kv_store import KVTierStore
from worker.model_runner import ModelRunner, StepState
from worker.request import FinishReason, Priority, Request, SamplingParams
from worker.scheduler import SchedulerConfig, make_scheduler
from worker.scheduler.base import int8_owner_id
from qllm.contract import InvalidField, check_sampling
from qllm.logs import get_logger

log = get_logger(__name__)


# An LS first token slower than this inside the engine is logged with the engine's state at that moment.
SLOW_LS_S = 0.1


@dataclass
class EngineConfig(SchedulerConfig):
    """The scheduler's settings plus what the engine itself needs."""

    policy: str = "fcfs"
    kv_budget_tokens: int = 32768
    block_size: int = 16
    max_num_beams: int = 8


@dataclass
class EngineOutput:
    request_id: str
    new_token_ids: list[int]
    finished: bool = False
    finish_reason: str = ""
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    # Prompt tokens whose KV came from the agent program's pin (set from the first output on).
    cached_prompt_tokens: int = 0
    # Beam search only, on the final output: the finished hypotheses, best first, as (token ids, score).
    beams: list[tuple[list[int], float]] | None = None
    # One per new token, for requests that asked for logprobs (worker/logprobs.py).
    logprobs: list | None = None
    # On the final output of a request that ended at one of its stop_token_ids: which.
    stop_token_id: int | None = None


class RequestRejected(Exception):
    """A request the engine cannot take; `code` names the gRPC status (e.g. INVALID_ARGUMENT)."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


class EngineCore:
    def __init__(self, runner: ModelRunner, config: EngineConfig, on_outputs):
        self.runner = runner
        self.config = config
        num_blocks = max(1, config.kv_budget_tokens // config.block_size)
        self.allocator = BlockAllocator(num_blocks, config.block_size)
        self.scheduler = make_scheduler(config.policy, config, self.allocator)
        self._on_outputs = on_outputs
        self._inbox: collections.deque = collections.deque()
        self._wake = threading.Event()
        self._stop = False
        # Set by the submitting thread when an LS request arrives; read between layers by the core.
        self._ls_arrived_at: float | None = None
        self._thread = threading.Thread(target=self._run, name="engine-core", daemon=True)
        self.num_steps = 0
        self.num_layer_preemptions = 0
        self._published_pin_ends: dict[str, int] = {}
        self._published_reused = 0
        # --kv-policy alise: where offloaded KV lives, and the step timings its cost model needs.
        self.kv_store: KVTierStore | None = None
        if self.scheduler.alise:
            self.kv_store = KVTierStore(runner.cache, config.block_size, config.kv_host_budget_tokens, runner.device)
            self.scheduler.host_capacity_blocks = self.kv_store.host.capacity_blocks
        self.prefill_s_per_token = self.scheduler.cost_model.prefill_s_per_token
        self.decode_step_s = self.scheduler.cost_model.decode_step_s
        self._published_moves: dict[str, int] = {}
        # Measured step times for the predictor's latency model (worker/latency_report.py drains them from
        # the event loop; deque appends and pops are thread-safe): (prefill tokens, s, decode batch, s).
        self.latency_samples: collections.deque = collections.deque(maxlen=4096)
        self._tier_clock: float | None = None
        metrics.KV_CAPACITY.set(self.allocator.capacity_tokens)

    # --- called from other threads ----------------------------------------------------------------------
    def start(self) -> None:
        self.warm_up()
        self._thread.start()

    def warm_up(self) -> None:
        """Runs a few synthetic requests through every path (chunked prefill with and without cached
        context, in-place and gathered decodes) before serving: the first call of each kernel shape is slow,
        and it would otherwise land on the first real requests' latency."""
        budget = self.config.max_num_batched_tokens
        vocab = self.runner.model.config.vocab_size
        reqs = [Request(f"warmup-{i}", [(17 * i + j) % (vocab - 1) + 1 for j in range(n)],
                        SamplingParams(max_tokens=3, ignore_eos=True))
                for i, n in enumerate([min(2 * budget, 1024), 300] + [8] * 4)]
        reqs = [r for r in reqs if r.max_total_tokens <= self.allocator.capacity_tokens // 2] or reqs[-1:]
        for r in reqs:
            self.scheduler.add_request(r)
        started = time.monotonic()
        while self.scheduler.has_unfinished():
            plan = self._schedule()
            step_started = time.monotonic()
            sampled = self.runner.execute(plan)
            self._observe_step(plan, time.monotonic() - step_started, warm=True)
            self.scheduler.update(plan, sampled)
        for r in reqs:
            self.runner.release(r.request_id)
        if self.kv_store is not None:
            self.kv_store.calibrate(num_blocks=max(1, min(64, self.allocator.num_blocks // 4)))
            self._refresh_cost_model()
        log.info("engine warmed up", seconds=round(time.monotonic() - started, 3))

    def stop(self) -> None:
        self._stop = True
        self._wake.set()
        self._thread.join(timeout=30)
        for kind, item in list(self._inbox):  # nobody will run these now: do not leave callers waiting
            if kind == "call" and not item[1].done():
                item[1].set_exception(RuntimeError("the engine has stopped"))

    def submit(self, req: Request) -> None:
        self._inbox.append(("submit", req))
        # Flag after queueing: a core that sees the flag always finds the request (a stale flag only costs
        # one needless look at the queues).
        if req.is_ls and self._ls_arrived_at is None:
            self._ls_arrived_at = time.monotonic()
        self._wake.set()

    def cancel(self, request_id: str) -> None:
        self.end(request_id, FinishReason.CANCELLED)

    def end(self, request_id: str, reason: FinishReason) -> None:
        """Ends a request early for `reason` (cancelled, or STOP at a stop string found outside the core)."""
        self._inbox.append(("cancel", (request_id, reason)))
        self._wake.set()

    def call(self, fn) -> concurrent.futures.Future:
        """Runs fn() on the core thread between steps (the scheduler's state is the core's alone)."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._inbox.append(("call", (fn, future)))
        self._wake.set()
        return future

    # --- the core thread ----------------------------------------------------------------------------------
    def _drain_inbox(self) -> list[EngineOutput]:
        outputs = []
        while self._inbox:
            kind, item = self._inbox.popleft()
            if kind == "submit":
                self.scheduler.add_request(item)
            elif kind == "call":
                fn, future = item
                try:
                    future.set_result(fn())
                except Exception as exc:  # the caller gets it; the core goes on
                    future.set_exception(exc)
            else:
                req = self.scheduler.abort(*item)
                if req is not None:
                    outputs.append(self._finished_output(req, []))
        return outputs

    # --- KV under pressure (--kv-policy) ------------------------------------------------------------------
    def _schedule(self, ls_only: bool = False):
        """One schedule, then the KV moves it decided (swap-outs before the freed blocks are written)."""
        plan = self.scheduler.schedule(ls_only=ls_only)
        moves = self.scheduler.take_moves()
        if moves and self.kv_store is not None:
            self.kv_store.apply(moves)
        return plan

    def _observe_step(self, plan, seconds: float, warm: bool = False) -> None:
        """Keeps the decode step time and the per-token prefill time the cost model uses (moving averages;
        the warm-up's first, cold steps only set them when nothing better is known)."""
        prefill = sum(s.num_tokens for s in plan.scheduled if not (s.num_tokens == 1 and s.start > 0))
        if prefill == 0:
            self.latency_samples.append((0, 0.0, len(plan.scheduled), seconds))
        elif prefill == plan.num_tokens:  # a pure prefill step: a clean sample of prefill time vs tokens
            self.latency_samples.append((prefill, seconds, 0, 0.0))
        alpha = 0.5 if warm else 0.05
        if prefill == 0:
            self.decode_step_s += alpha * (seconds - self.decode_step_s)
        elif prefill >= 64:
            per_token = max(0.0, seconds - self.decode_step_s) / prefill
            self.prefill_s_per_token += alpha * (per_token - self.prefill_s_per_token)
        if self.kv_store is not None and not warm and self.num_steps % 64 == 0:
            self._refresh_cost_model()

    def _refresh_cost_model(self) -> None:
        store = self.kv_store
        self.scheduler.cost_model = store.cost_model(self.prefill_s_per_token, self.decode_step_s)
        metrics.KV_COPY_RATE.labels("swap_out").set(store.host.swap_out_bytes_per_s)
        metrics.KV_COPY_RATE.labels("swap_in").set(store.host.swap_in_bytes_per_s)
        metrics.KV_COPY_RATE.labels("quantize").set(store.quantizer.quantize_rate.bytes_per_s)
        metrics.KV_COPY_RATE.labels("dequantize").set(store.quantizer.dequantize_rate.bytes_per_s)

    def tier_bytes(self) -> dict[str, int]:
        """KV bytes per tier now: gpu (the block pool, int8 charges excluded), host, int8."""
        store = self.kv_store
        block_bytes = store.block_bytes if store is not None else self.runner.cache.bytes // max(
            1, self.allocator.num_blocks)
        used = self.allocator.num_blocks - self.allocator.num_free_blocks
        if store is None:
            return {"gpu": used * block_bytes, "host": 0, "int8": 0}
        int8_blocks = sum(len(self.allocator.block_table(int8_owner_id(rid))) for rid in self.scheduler.offloaded)
        return {"gpu": (used - int8_blocks) * block_bytes, "host": store.host.used_bytes, "int8": store.int8_bytes}

    def _publish_tiers(self) -> None:
        now = time.monotonic()
        tiers = self.tier_bytes()
        for tier, nbytes in tiers.items():
            metrics.KV_TIER_BYTES.labels(tier).set(nbytes)
            if self._tier_clock is not None and nbytes:
                metrics.KV_TIER_BYTE_HOURS.labels(tier).inc(nbytes * (now - self._tier_clock) / 3600.0)
        self._tier_clock = now
        self._publish_counts(metrics.KV_MOVES, self.scheduler.move_counts, self._published_moves)

    @staticmethod
    def _publish_counts(counter, counts: dict[str, int], published: dict[str, int]) -> None:
        """Adds to a labelled Prometheus counter what a pure module's tallies (label -> count) grew by since
        the last call; `published` remembers what was already added."""
        for label, count in counts.items():
            seen = published.get(label, 0)
            if count > seen:
                counter.labels(label).inc(count - seen)
                published[label] = count

    def _should_yield(self) -> bool:
        return self._ls_arrived_at is not None

    def _run(self) -> None:
        while not self._stop:
            try:
                self._loop()
            except Exception:  # never die silently: fail what the engine held, then keep serving
                log.exception("engine step failed; failing the requests it held")
                outputs = [self._finished_output(req, []) for req in self.scheduler.fail_all()]
                self.scheduler.take_moves()
                if self.kv_store is not None:
                    self.kv_store.reset()
                if outputs:
                    self._on_outputs(outputs)

    def _loop(self) -> None:
        parked: list[StepState] = []
        ls_only_steps = 0
        yields = self.scheduler.yields_at_layer_boundaries
        while not self._stop:
            arrived_at = self._ls_arrived_at
            self._ls_arrived_at = None
            outputs = self._drain_inbox()
            if outputs:
                self._on_outputs(outputs)
            state = None
            # LS work that arrived since the last look always gets an LS-only step first (nested preemption);
            # otherwise LS-only steps run while parked BE has been deferred for fewer than the setting allows.
            fresh_ls = arrived_at is not None
            if parked and (fresh_ls or ls_only_steps < self.config.max_be_deferral_steps):
                plan = self._schedule(ls_only=True)
                if plan:
                    state = self.runner.begin(plan)
                    ls_only_steps += 1
            if state is None and parked:
                state = parked.pop()
            if state is None and yields and self.scheduler.has_waiting_ls():
                # LS work that arrived between steps gets a step of its own too, rather than riding a full
                # iteration with BE prefill chunks; its decodes join the next full iteration.
                plan = self._schedule(ls_only=True)
                if plan:
                    state = self.runner.begin(plan)
            if state is None:
                plan = self._schedule()
                if not plan:
                    self._publish_gauges()
                    self._wake.wait(timeout=0.5)
                    self._wake.clear()
                    continue
                state = self.runner.begin(plan)
            started = time.monotonic()
            stages_before = state.next_stage
            done = self.runner.run_layers(state, self._should_yield if yields else None)
            elapsed = time.monotonic() - started
            layer_s = 2 * elapsed / max(1, state.next_stage - stages_before)
            if state.plan.has_best_effort and state.next_stage > stages_before:
                metrics.LAYER.observe(layer_s)
            if not done:
                parked.append(state)
                self.num_layer_preemptions += 1
                # A BE step paused for LS is QLLM's preemption; an LS prefill paused for a newer LS is nesting.
                metrics.PREEMPTIONS.labels("layer" if state.plan.has_best_effort else "nested").inc()
                if self._ls_arrived_at is not None and state.plan.has_best_effort:
                    latency = time.monotonic() - self._ls_arrived_at
                    metrics.PREEMPTION_LATENCY.observe(latency)
                    # In units of this very step's layer time: QLLM's bound is "at most one layer". (A step
                    # parked before its first stage has no layer time of its own; its wait was shorter.)
                    if state.next_stage > stages_before:
                        metrics.PREEMPTION_LATENCY_LAYERS.observe(latency / layer_s)
                continue
            if not parked:
                ls_only_steps = 0
            sampled = self.runner.finish(state)
            metrics.STEP.labels("mixed" if state.plan.has_best_effort else "ls").observe(time.monotonic() - started)
            if state.pauses == 0:
                self._observe_step(state.plan, time.monotonic() - started)
            if state.plan.preempted:
                # a victim whose KV went to the host pool or to int8 (--kv-policy alise) is not recomputed
                offloaded = sum(1 for rid in state.plan.preempted if rid in self.scheduler.offloaded)
                if offloaded:
                    metrics.PREEMPTIONS.labels("offload").inc(offloaded)
                if len(state.plan.preempted) > offloaded:
                    metrics.PREEMPTIONS.labels("recompute").inc(len(state.plan.preempted) - offloaded)
            self._note_slow_ls(state, parked)
            changed = self.scheduler.update(state.plan, sampled)
            self.num_steps += 1
            outputs = []
            for req in changed:
                new = [req.output_token_ids[-1]] if req.request_id in sampled else []
                if req.beam is not None:  # beams stream nothing until the search ends, then the best sequence
                    new = list(req.output_token_ids) if req.is_finished else []
                logprobs = None
                if state.sampled_logprobs and new and req.request_id in state.sampled_logprobs:
                    logprobs = [state.sampled_logprobs[req.request_id]]
                elif req.beam is not None and new and req.sampling.logprobs and req.beam.done:
                    logprobs = req.beam.best().logprobs
                if req.is_finished:
                    self.runner.release(req.request_id)
                    outputs.append(self._finished_output(req, new, logprobs))
                elif new:
                    outputs.append(EngineOutput(req.request_id, new, num_prompt_tokens=req.num_prompt_tokens,
                                                num_output_tokens=len(req.output_token_ids),
                                                cached_prompt_tokens=req.num_cached_tokens, logprobs=logprobs))
            if outputs:
                self._on_outputs(outputs)
            self._publish_gauges()

    def _note_slow_ls(self, state: StepState, parked: list[StepState]) -> None:
        """Logs LS requests whose first token took long inside the engine, with what held them up."""
        now = time.monotonic()
        for s in state.plan.scheduled:
            req = s.request
            if req.is_ls and s.samples and not req.output_token_ids and now - req.arrival_time > SLOW_LS_S:
                log.info("slow LS first token", request_id=req.request_id,
                         engine_ms=round(1000 * (now - req.arrival_time), 1),
                         wait_ms=round(1000 * ((req.first_scheduled_time or now) - req.arrival_time), 1),
                         preemptions=req.num_preemptions, parked_steps=len(parked),
                         running=len(self.scheduler.running), waiting=len(self.scheduler.waiting),
                         free_kv_tokens=self.allocator.free_tokens,
                         headroom_tokens=self.scheduler.headroom_blocks() * self.allocator.block_size)

    def _finished_output(self, req: Request, new: list[int], logprobs: list | None = None) -> EngineOutput:
        self.runner.release(req.request_id)
        beams = None
        if req.beam is not None and req.beam.done:
            beams = [(h.tokens, h.score) for h in req.beam.ranked()]
        return EngineOutput(req.request_id, new, finished=True,
                            finish_reason=req.finish_reason.value if req.finish_reason else "",
                            num_prompt_tokens=req.num_prompt_tokens, num_output_tokens=len(req.output_token_ids),
                            cached_prompt_tokens=req.num_cached_tokens, beams=beams, logprobs=logprobs,
                            stop_token_id=req.stop_token_id)

    def _publish_gauges(self) -> None:
        metrics.RUNNING.set(len(self.scheduler.running))
        metrics.WAITING.set(len(self.scheduler.waiting))
        metrics.KV_USED.set(self.allocator.capacity_tokens - self.allocator.free_tokens)
        self._publish_tiers()
        pins = self.scheduler.pins
        metrics.KV_PINNED.set(pins.pinned_tokens)
        metrics.PINS.set(len(pins))
        self._publish_counts(metrics.PINS_ENDED, pins.ended, self._published_pin_ends)
        if pins.reused_tokens > self._published_reused:
            metrics.PREFIX_REUSED_TOKENS.inc(pins.reused_tokens - self._published_reused)
            self._published_reused = pins.reused_tokens


class AsyncEngine:
    """The asyncio side: checks a request's invariants, submits it to the core, streams its outputs."""

    def __init__(self, runner: ModelRunner, tokenizer, eos_token_ids: list[int], max_context: int,
                 config: EngineConfig):
        self.tokenizer = tokenizer
        self.eos_token_ids = frozenset(eos_token_ids)
        self.max_context = max_context
        self.config = config
        self.core = EngineCore(runner, config, self._on_outputs)
        self.vocab_size = runner.model.config.vocab_size
        self._streams: dict[str, asyncio.Queue] = {}
        # Requests their consumer ended on purpose (a stop string in their text): how the core ends them.
        self._ending: dict[str, FinishReason] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.core.start()

    def stop(self) -> None:
        self.core.stop()

    def _on_outputs(self, outputs: list[EngineOutput]) -> None:
        # Called on the core thread: hand the batch to the event loop in one go.
        self._loop.call_soon_threadsafe(self._dispatch, outputs)

    def _dispatch(self, outputs: list[EngineOutput]) -> None:
        for out in outputs:
            queue = self._streams.get(out.request_id)
            if queue is not None:
                queue.put_nowait(out)

    def encode(self, prompt: str) -> list[int]:
        return self.tokenizer.encode(prompt, add_special_tokens=False)

    def check(self, num_prompt_tokens: int, sampling: SamplingParams) -> None:
        """Invariants of a request reaching this worker: the contract's field rules, then what only this worker
        knows (its model's context, its KV budget)."""
        self.check_fields(sampling, self.config.max_num_beams, self.vocab_size)
        total = num_prompt_tokens + sampling.max_tokens
        if total > self.max_context:
            raise RequestRejected("INVALID_ARGUMENT",
                                  f"max_tokens: prompt ({num_prompt_tokens} tokens) + max_tokens "
                                  f"({sampling.max_tokens}) exceeds the model context ({self.max_context})")
        capacity = self.core.allocator.capacity_tokens
        if total > capacity:
            raise RequestRejected("RESOURCE_EXHAUSTED",
                                  f"max_tokens: prompt + max_tokens ({total} tokens) exceeds the worker's KV "
                                  f"budget ({capacity} tokens)")
        if sampling.num_beams > 1:
            need = beam.kv_tokens(num_prompt_tokens, sampling.max_tokens, sampling.num_beams, self.config.block_size)
            if need > capacity:
                raise RequestRejected("RESOURCE_EXHAUSTED",
                                      f"num_beams: {sampling.num_beams} beams of prompt + max_tokens need {need} KV "
                                      f"tokens, more than the worker's KV budget ({capacity} tokens)")

    @staticmethod
    def check_fields(sampling: SamplingParams, max_beams: int, vocab_size: int | None) -> None:
        """The request contract's rules on the sampling fields (qllm/contract.py), as INVALID_ARGUMENT."""
        try:
            check_sampling(max_tokens=sampling.max_tokens, temperature=sampling.temperature, top_p=sampling.top_p,
                           num_beams=sampling.num_beams, max_beams=max_beams, patience=sampling.patience,
                           length_penalty=sampling.length_penalty, stop=sampling.stop,
                           stop_token_ids=sorted(sampling.stop_token_ids), logprobs=sampling.logprobs,
                           top_logprobs=sampling.top_logprobs, vocab_size=vocab_size)
        except InvalidField as exc:
            raise RequestRejected("INVALID_ARGUMENT", str(exc)) from None

    async def generate(self, request_id: str, prompt_token_ids: list[int], sampling: SamplingParams,
                       priority: Priority = Priority.BEST_EFFORT, order_key: float = 0.0, program_id: str = "",
                       last_turn: bool = False, predicted_output_tokens: int = 0) -> AsyncIterator[EngineOutput]:
        """Streams outputs of one request; closing the iterator early cancels it and frees its KV."""
        if not prompt_token_ids:
            raise RequestRejected("INVALID_ARGUMENT", "prompt: the prompt has no tokens")
        self.check(len(prompt_token_ids), sampling)
        if request_id in self._streams:
            raise RequestRejected("ALREADY_EXISTS", f"request_id: {request_id!r} is already running")
        req = Request(request_id, list(prompt_token_ids), sampling, priority, self.eos_token_ids,
                      order_key=order_key, program_id=program_id, last_turn=last_turn,
                      predicted_output_tokens=predicted_output_tokens)
        if sampling.num_beams > 1:
            req.beam = self.new_beam_search(req)
        queue: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = queue
        finished = False
        self.core.submit(req)
        try:
            while True:
                out = await queue.get()
                finished = out.finished
                yield out
                if finished:
                    return
        finally:
            self._streams.pop(request_id, None)
            ending = self._ending.pop(request_id, None)
            if not finished:
                if ending is None:
                    self.core.cancel(request_id)
                else:
                    self.core.end(request_id, ending)

    def end_early(self, request_id: str, reason: FinishReason = FinishReason.STOP) -> None:
        """Marks a running request as ended by its consumer for `reason` (a stop string found in its text, as
        vLLM's output processor aborts one): when the consumer then closes its generate() stream, the core ends
        it with that reason, not as cancelled, at the end of its current step (KV freed, or pinned for an agent
        program's next turn)."""
        if request_id in self._streams:
            self._ending[request_id] = reason

    def new_beam_search(self, req: Request) -> beam.BeamSearch:
        """The search state of a beam request; with ignore_eos no candidate ever finishes early, except at a stop
        token (those end a hypothesis as EOS does)."""
        s = req.sampling
        ends = (frozenset() if s.ignore_eos else req.eos_token_ids) | s.stop_token_ids
        return beam.BeamSearch(s.num_beams, s.patience, s.length_penalty, s.max_tokens, req.num_prompt_tokens,
                               self.config.block_size, ends, logprobs=s.logprobs, top_logprobs=s.top_logprobs)

    # --- agent-program pins (worker/kv_pins.py), applied on the core thread ------------------------------
    async def set_pin(self, program_id: str, ttl_s: float, keep_score: float) -> tuple[bool, int]:
        """Keeps the program's pinned KV for ttl_s from now (<= 0 frees it): (held, tokens)."""
        def apply():
            pin = self.core.scheduler.pins.set(program_id, ttl_s, keep_score)
            return (pin is not None, pin.tokens if pin is not None else 0)
        return await asyncio.wrap_future(self.core.call(apply))

    async def release_pins(self, program_ids: list[str]) -> tuple[int, int]:
        """Frees the programs' pins now: (pins released, tokens freed)."""
        def apply():
            pins = self.core.scheduler.pins
            freed = [pins.release(pid, "released") for pid in program_ids]
            return (sum(1 for t in freed if t), sum(freed))
        return await asyncio.wrap_future(self.core.call(apply))

    async def list_pins(self) -> list[tuple[str, int, float, float]]:
        """(program id, tokens, seconds until expiry, keep score) of every pin."""
        def apply():
            pins = self.core.scheduler.pins
            now = pins.clock()
            return [(p.program_id, p.tokens, p.expires_at - now, p.keep_score) for p in pins.pins()]
        return await asyncio.wrap_future(self.core.call(apply))

    def stats(self) -> dict:
        sched = self.core.scheduler
        return {"num_running": len(sched.running), "num_waiting": len(sched.waiting),
                "kv_capacity_tokens": self.core.allocator.capacity_tokens,
                "kv_free_tokens": self.core.allocator.free_tokens,
                "kv_pinned_tokens": sched.pins.pinned_tokens, "num_pins": len(sched.pins)}
