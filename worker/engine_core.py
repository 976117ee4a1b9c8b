"""The engine core: a thread that owns the scheduler and the model runner and runs engine steps.

`EngineCore.step()` is the one place where the scheduler and the executor meet (vLLM V1's EngineCore):
take what arrived, ask the scheduler for a step, run it layer by layer, feed the runner's output back to the
scheduler, return what to stream. Under a policy that yields inside steps (qllm) the runner asks the
scheduler at every decoder-layer boundary whether to stop; a stopped step is parked (its hidden states,
positions and layout kept here, its plan with the scheduler) and resumes at its next layer when the
scheduler hands it back. Model compute never blocks the event loop: new requests and cancels reach the
core through a thread-safe inbox; outputs go back with one call per step.
"""

from __future__ import annotations

import collections
import concurrent.futures
import threading
import time
from dataclasses import dataclass

from worker import beam, metrics
from worker.kv_blocks import BlockAllocator
from worker.kv_store import KVTierStore
from worker.model_runner import ModelRunner, StepState
from worker.outputs import EngineOutput
from worker.request import FinishReason, Request, SamplingParams
from worker.scheduler import SchedulerConfig, SchedulerOutput, make_scheduler
from worker.step_trace import StepTrace
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
    step_trace_path: str = ""    # where the step trace goes (worker/step_trace.py); "" = none


class EngineCore:
    def __init__(self, runner: ModelRunner, config: EngineConfig, on_outputs=None):
        self.runner = runner
        self.config = config
        num_blocks = max(1, config.kv_budget_tokens // config.block_size)
        self.allocator = BlockAllocator(num_blocks, config.block_size)
        self.scheduler = make_scheduler(config.policy, config, self.allocator)
        # With a consumer, outputs of requests ended between steps go to it at once; offline (no consumer) they
        # come back from the next step().
        self._on_outputs = on_outputs
        self._inbox: collections.deque = collections.deque()
        self._wake = threading.Event()
        self._stop = False
        # When the first LS request since the last schedule was submitted (another thread sets it): the start
        # of a layer-boundary preemption's latency.
        self._ls_arrived_at: float | None = None
        # Steps the scheduler parked, by step id: what the runner needs to resume them at their next layer.
        self._parked: dict[int, StepState] = {}
        # Outputs of requests ended by a cancel, not yet handed out.
        self._pending: list[EngineOutput] = []
        self._warming = False
        self._thread = threading.Thread(target=self._run, name="engine-core", daemon=True)
        self.num_steps = 0
        self.num_layer_preemptions = 0
        self._published_pin_ends: dict[str, int] = {}
        self._published_reused = 0
        # --kv-policy alise: where offloaded KV lives, and the step timings its cost model needs.
        self.kv_store: KVTierStore | None = None
        kv = self.scheduler.kv
        if kv.alise:
            self.kv_store = KVTierStore(runner.cache, config.block_size, config.kv_host_budget_tokens, runner.device)
            kv.set_host_capacity(self.kv_store.host.capacity_blocks)
        self.prefill_s_per_token = kv.cost_model.prefill_s_per_token
        self.decode_step_s = kv.cost_model.decode_step_s
        self._published_moves: dict[str, int] = {}
        # Measured step times for the predictor's latency model (worker/latency_report.py drains them from
        # the event loop; deque appends and pops are thread-safe): (prefill tokens, s, decode batch, s).
        self.latency_samples: collections.deque = collections.deque(maxlen=4096)
        self._tier_clock: float | None = None
        self.trace = StepTrace(config.step_trace_path) if config.step_trace_path else None
        metrics.KV_CAPACITY.set(self.allocator.capacity_tokens)

    # --- called from other threads ----------------------------------------------------------------------
    def start(self) -> None:
        self.warm_up()
        self._thread.start()

    def warm_up(self) -> None:
        """Runs a few synthetic requests through every path (chunked prefill with and without cached
        context, in-place and gathered decodes) before serving: the first call of each kernel shape is slow,
        and it would otherwise land on the first real requests' latency. Requests submitted meanwhile wait
        in the inbox."""
        budget = self.config.max_num_batched_tokens
        vocab = self.runner.model.config.vocab_size
        reqs = [Request(f"warmup-{i}", [(17 * i + j) % (vocab - 1) + 1 for j in range(n)],
                        SamplingParams(max_tokens=3, ignore_eos=True))
                for i, n in enumerate([min(2 * budget, 1024), 300] + [8] * 4)]
        reqs = [r for r in reqs if r.max_total_tokens <= self.allocator.capacity_tokens // 2] or reqs[-1:]
        for r in reqs:
            self.scheduler.add_request(r)
        started = time.monotonic()
        self._warming = True
        try:
            while self.scheduler.has_unfinished_requests():
                self._run_step()
        finally:
            self._warming = False
        if self.kv_store is not None:
            self.kv_store.calibrate(num_blocks=max(1, min(64, self.allocator.num_blocks // 4)))
            self._refresh_cost_model()
        log.info("engine warmed up", seconds=round(time.monotonic() - started, 3))

    def stop(self) -> None:
        self._stop = True
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout=30)
        if self.trace is not None:
            self.trace.close()
        for kind, item in list(self._inbox):  # nobody will run these now: do not leave callers waiting
            if kind == "call" and not item[1].done():
                item[1].set_exception(RuntimeError("the engine has stopped"))

    def submit(self, req: Request) -> None:
        self._inbox.append(("submit", req))
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
    def add_request(self, req: Request) -> None:
        """On the core thread (or with no thread running: tests, scripts): straight to the scheduler."""
        self.scheduler.add_request(req)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    def run_to_completion(self, reqs=()) -> list[EngineOutput]:
        """Offline use on the caller's thread (tests, scripts; no core thread running): adds `reqs` and steps
        until no request is left. Returns every output in order."""
        for req in reqs:
            self.add_request(req)
        outputs: list[EngineOutput] = []
        while self.has_unfinished_requests():
            outputs += self.step()[0]
        return outputs

    def step(self) -> tuple[list[EngineOutput], bool]:
        """Takes what arrived, then runs one step: (outputs to stream, whether the model ran)."""
        self._take_inbox()
        return self._run_step()

    def _take_inbox(self) -> None:
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
                request_id, reason = item
                self._pending.extend(self.scheduler.finish_requests([request_id], reason))
        if self._pending and self._on_outputs is not None:
            self._on_outputs(self._take_pending())

    def _run_step(self) -> tuple[list[EngineOutput], bool]:
        self._ls_arrived_at = None
        scheduled = time.monotonic()
        plan = self.scheduler.schedule()
        if not plan:
            return self._take_pending(), False
        moves = self.scheduler.kv.take_moves()
        if moves and self.kv_store is not None:  # swap-outs before the freed blocks are written
            self.kv_store.apply(moves)
        state = self._parked.pop(plan.step_id) if plan.resumed else self.runner.begin(plan)
        begun = time.monotonic()
        should_park = None
        if not self._warming and self.scheduler.may_park(plan):
            should_park = self._park_check(plan)
        started = time.monotonic()
        stages_before = state.next_stage
        done = self.runner.run_layers(state, should_park, inner=self.config.inner_parking)
        elapsed = time.monotonic() - started
        layer_s = 2 * elapsed / max(1, state.next_stage - stages_before)
        if plan.has_best_effort and state.next_stage > stages_before and not self._warming:
            metrics.LAYER.observe(layer_s)
        tracing = self.trace is not None and not self._warming
        if not done:
            self._parked[plan.step_id] = state
            self.scheduler.park(plan)
            self._observe_park(state, stages_before, layer_s)
            if tracing:
                self.trace.record(plan, [scheduled, begun, started, started + elapsed, time.monotonic()],
                                  (stages_before, state.next_stage), parked=True)
            return self._take_pending(), True
        if plan.has_best_effort and should_park is not None and self._ls_arrived_at is not None:
            # LS work came after the step's last boundary check (or the scheduler let the step run on): it
            # waited for the step's end, which is its preemption latency too.
            self._observe_preemption_latency(time.monotonic() - self._ls_arrived_at,
                                             layer_s if state.next_stage > stages_before else None)
        output = self.runner.finish(state)
        if output.beam_logprobs:
            tokens, copies = beam.advance(plan, output.beam_logprobs)
            output.sampled.update(tokens)
            self.runner.copy_blocks(copies)
        if not self._warming:
            metrics.STEP.labels("mixed" if plan.has_best_effort else "ls").observe(time.monotonic() - started)
        if state.pauses == 0:
            self._observe_step(plan, time.monotonic() - started)
        self._count_preemptions(plan)
        self._note_slow_ls(plan)
        outputs = self.scheduler.update_from_output(plan, output)
        for out in outputs:
            if out.finished:
                self.runner.release(out.request_id)
        self.num_steps += 1
        if tracing:
            self.trace.record(plan, [scheduled, begun, started, started + elapsed, time.monotonic()],
                              (stages_before, state.next_stage), parked=False)
        return self._take_pending() + outputs, True

    def _park_check(self, plan: SchedulerOutput):
        """What the runner asks at each layer boundary: new arrivals reach the scheduler, which decides."""
        def should_park() -> bool:
            if self._inbox:
                self._take_inbox()
            return self.scheduler.should_park(plan)
        return should_park

    def _take_pending(self) -> list[EngineOutput]:
        pending, self._pending = self._pending, []
        for out in pending:
            self.runner.release(out.request_id)
        return pending

    def _observe_park(self, state: StepState, stages_before: int, layer_s: float) -> None:
        self.num_layer_preemptions += 1
        metrics.PREEMPTIONS.labels("layer").inc()
        if self._ls_arrived_at is not None and state.plan.has_best_effort:
            # A step parked before its first stage has no layer time of its own; its wait was shorter.
            self._observe_preemption_latency(time.monotonic() - self._ls_arrived_at,
                                             layer_s if state.next_stage > stages_before else None)

    def _observe_preemption_latency(self, latency: float, layer_s: float | None) -> None:
        metrics.PREEMPTION_LATENCY.observe(latency)
        if layer_s:  # in units of this very step's layer time: QLLM's bound is "at most one layer"
            metrics.PREEMPTION_LATENCY_LAYERS.observe(latency / layer_s)

    def _count_preemptions(self, plan: SchedulerOutput) -> None:
        if not plan.preempted:
            return
        # a victim whose KV went to the host pool or to int8 (--kv-policy alise) is not recomputed
        offloaded = sum(1 for rid in plan.preempted if rid in self.scheduler.kv.offloaded)
        if offloaded:
            metrics.PREEMPTIONS.labels("offload").inc(offloaded)
        if len(plan.preempted) > offloaded:
            metrics.PREEMPTIONS.labels("recompute").inc(len(plan.preempted) - offloaded)

    def _run(self) -> None:
        while not self._stop:
            try:
                outputs, executed = self.step()
            except Exception:  # never die silently: fail what the engine held, then keep serving
                log.exception("engine step failed; failing the requests it held")
                outputs, executed = self._fail_all(), True
            if outputs:
                self._on_outputs(outputs)
            self._publish_gauges()
            if not executed and not self._stop:
                self._wake.wait(timeout=0.5)
                self._wake.clear()

    def _fail_all(self) -> list[EngineOutput]:
        self._parked.clear()
        outputs = self._pending + self.scheduler.fail_all()
        self._pending = []
        for out in outputs:
            self.runner.release(out.request_id)
        if self.kv_store is not None:
            self.kv_store.reset()
        return outputs

    # --- measurements -------------------------------------------------------------------------------------
    def _observe_step(self, plan: SchedulerOutput, seconds: float) -> None:
        """Keeps the decode step time and the per-token prefill time the cost model uses (moving averages;
        the warm-up's first, cold steps only set them when nothing better is known)."""
        prefill = sum(s.num_tokens for s in plan.scheduled if not s.is_decode)
        if prefill == 0:
            self.latency_samples.append((0, 0.0, len(plan.scheduled), seconds))
        elif prefill == plan.num_tokens:  # a pure prefill step: a clean sample of prefill time vs tokens
            self.latency_samples.append((prefill, seconds, 0, 0.0))
        alpha = 0.5 if self._warming else 0.05
        if prefill == 0:
            self.decode_step_s += alpha * (seconds - self.decode_step_s)
        elif prefill >= 64:
            per_token = max(0.0, seconds - self.decode_step_s) / prefill
            self.prefill_s_per_token += alpha * (per_token - self.prefill_s_per_token)
        if self.kv_store is not None and not self._warming and self.num_steps % 64 == 0:
            self._refresh_cost_model()

    def _refresh_cost_model(self) -> None:
        store = self.kv_store
        self.scheduler.kv.set_cost_model(store.cost_model(self.prefill_s_per_token, self.decode_step_s))
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
        return {"gpu": (used - self.scheduler.kv.int8_blocks()) * block_bytes, "host": store.host.used_bytes,
                "int8": store.int8_bytes}

    def _publish_tiers(self) -> None:
        now = time.monotonic()
        tiers = self.tier_bytes()
        for tier, nbytes in tiers.items():
            metrics.KV_TIER_BYTES.labels(tier).set(nbytes)
            if self._tier_clock is not None and nbytes:
                metrics.KV_TIER_BYTE_HOURS.labels(tier).inc(nbytes * (now - self._tier_clock) / 3600.0)
        self._tier_clock = now
        self._publish_counts(metrics.KV_MOVES, self.scheduler.kv.move_counts, self._published_moves)

    @staticmethod
    def _publish_counts(counter, counts: dict[str, int], published: dict[str, int]) -> None:
        """Adds to a labelled Prometheus counter what a pure module's tallies (label -> count) grew by since
        the last call; `published` remembers what was already added."""
        for label, count in counts.items():
            seen = published.get(label, 0)
            if count > seen:
                counter.labels(label).inc(count - seen)
                published[label] = count

    def _note_slow_ls(self, plan: SchedulerOutput) -> None:
        """Logs LS requests whose first token took long inside the engine, with what held them up."""
        now = time.monotonic()
        for s in plan.scheduled:
            req = s.request
            if req.is_ls and s.samples and not req.output_token_ids and now - req.arrival_time > SLOW_LS_S:
                log.info("slow LS first token", request_id=req.request_id,
                         engine_ms=round(1000 * (now - req.arrival_time), 1),
                         wait_ms=round(1000 * ((req.first_scheduled_time or now) - req.arrival_time), 1),
                         preemptions=req.num_preemptions, parked_steps=len(self._parked),
                         running=len(self.scheduler.running), waiting=len(self.scheduler.waiting),
                         free_kv_tokens=self.allocator.free_tokens,
                         headroom_tokens=self.scheduler.headroom_blocks() * self.allocator.block_size)

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
