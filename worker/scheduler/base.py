"""The scheduler interface and the iteration-level machinery every policy shares (pure Python, no torch).

Each engine iteration the scheduler picks which requests run and how many tokens each computes (decode = 1,
prefill = a chunk under the per-iteration token budget, as vLLM's max_num_batched_tokens), allocating KV
blocks as it goes. Policies differ in order (who runs first), in which running request is preempted when
KV blocks run short, and in whether the engine may pause a step at a decoder-layer boundary.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from worker.kv_blocks import BlockAllocator
from worker.outputs import EngineOutput, ModelRunnerOutput
from worker.request import FinishReason, Request, Status
from worker.scheduler.kv_manager import KVCacheManager
from worker.scheduler.request_queue import RequestQueue, create_request_queue


@dataclass
class SchedulerConfig:
    max_num_seqs: int = 32
    max_num_batched_tokens: int = 512
    # qllm: how many LS-only steps for due LS tokens may run in a row before BE gets its turn, up to its next
    # parking point (LS that just arrived always gets its step).
    max_be_deferral_steps: int = 2
    # qllm: park a running step at layer boundaries when LS work arrives (QLLM's preemption), and give LS
    # work that arrives between steps a step of its own; each can be switched off to measure what it buys.
    layer_parking: bool = True
    # qllm: parking inside a layer's blocks too (between groups of decode rows, before a step's prefill chunks
    # and between their parts, between ranges of experts), not only between blocks.
    inner_parking: bool = True
    ls_only_steps: bool = True
    # qllm: LS decode pacing. The LS TPOT objective, in seconds: a stream's next token is due when the
    # objective less the LS step that makes it and the BE stretch it may wait out has passed; a running BE
    # step then parks at its next boundary and an LS-only decode step runs. -1: 1.5 x the one-row decode
    # step measured on an idle worker (the idle floor's token time); 0: off (LS decodes ride full iterations).
    ls_tpot_target_s: float = -1.0
    # qllm: the token budget of a full iteration while LS streams decode beside it (BE prefill chunks shrink,
    # as Sarathi-Serve's stall-free budget); 0 = max_num_batched_tokens. The parking points inside a layer's
    # blocks already keep every stretch of a BE step short, so by default the chunks do not shrink.
    ls_active_max_batched_tokens: int = 0
    # qllm: KV tokens and running slots that BE admission leaves free for LS work, so an arriving LS request
    # finds room without preempting (and recomputing) a BE request.
    ls_reserved_kv_tokens: int = 1024
    ls_reserved_slots: int = 2
    # Admission reserves KV for a request's whole prompt plus this fraction of its max_tokens, counting what
    # running requests may still grow into. Chunked prefill otherwise admits far more long prompts than the
    # cache holds and then thrashes (preempt, recompute, repeat) as their chunks and decodes arrive.
    admission_output_fraction: float = 1.0
    # Agent programs: how long a finished non-final turn's KV stays pinned before the kvmanager's word
    # arrives (worker/kv_pins.py); it is also all a pin gets when no kvmanager answers.
    provisional_pin_s: float = 1.0
    # What a preempted request's KV becomes: `recompute` drops it (vLLM V1); `alise` picks victims and, per
    # victim, the cheapest of swap to host, int8 or recompute (worker/kv_tiers.py).
    kv_policy: str = "recompute"
    # alise: which classes may have their KV quantized to int8 (kv_tiers.QualityBound: off, be, all).
    kv_int8: str = "be"
    # alise: the host pool for swapped-out KV, in tokens of this cache's blocks (0 = no swapping).
    kv_host_budget_tokens: int = 65536


@dataclass
class ScheduledRequest:
    request: Request
    start: int              # num_computed_tokens when scheduled: position of the first new token
    num_tokens: int         # tokens this step computes
    block_table: list[int]

    @property
    def is_decode(self) -> bool:
        """One token past the start: it runs as a decode row (attention over its cached KV in place)."""
        return self.num_tokens == 1 and self.start > 0

    @property
    def token_ids(self) -> list[int]:
        req, end = self.request, self.start + self.num_tokens
        prompt = req.num_prompt_tokens
        if self.start >= prompt:  # a decode: no copy of the whole sequence
            return req.output_token_ids[self.start - prompt:end - prompt]
        return req.all_token_ids[self.start:end]

    @property
    def samples(self) -> bool:
        """True when this step computes the last known token, so a new one is sampled."""
        return self.start + self.num_tokens == self.request.num_tokens


@dataclass
class SchedulerOutput:
    """One step's plan. Decode rows come first, then prefill chunks: the order the runner lays rows out in."""

    scheduled: list[ScheduledRequest] = field(default_factory=list)
    preempted: list[str] = field(default_factory=list)
    step_id: int = 0
    # A parked step the engine resumes at its next layer (its requests were scheduled when it began).
    resumed: bool = False
    ls_only: bool = False
    scheduled_at: float = 0.0     # the scheduler's clock when the step was built

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.scheduled)

    @property
    def request_ids(self) -> list[str]:
        return [s.request.request_id for s in self.scheduled]

    @property
    def has_best_effort(self) -> bool:
        return any(not s.request.is_ls for s in self.scheduled)

    def __bool__(self) -> bool:
        return bool(self.scheduled)


def finished_output(req: Request, new: list[int], logprobs: list | None = None) -> EngineOutput:
    beams = None
    if req.beam is not None and req.beam.done:
        beams = [(h.tokens, h.score) for h in req.beam.ranked()]
    return EngineOutput(req.request_id, new, finished=True,
                        finish_reason=req.finish_reason.value if req.finish_reason else "",
                        num_prompt_tokens=req.num_prompt_tokens, num_output_tokens=len(req.output_token_ids),
                        cached_prompt_tokens=req.num_cached_tokens, beams=beams, logprobs=logprobs,
                        stop_token_id=req.stop_token_id)


class Scheduler:
    """Iteration-level scheduler; subclasses set the order and the preemption victim.

    The interface the engine core uses: add_request, schedule, update_from_output, finish_requests,
    has_unfinished_requests, fail_all; and, for policies that yield inside a step, should_park and park.
    """

    name = "base"
    # Waiting-queue order (worker/scheduler/request_queue.py).
    queue_ordering = "fcfs"
    # Whether a running step may be parked at a decoder-layer boundary (QLLM); the engine then asks
    # should_park() at every boundary.
    yields_at_layer_boundaries = False

    def __init__(self, config: SchedulerConfig, allocator: BlockAllocator):
        self.config = config
        self.kv = KVCacheManager(allocator, config.kv_policy, config.kv_int8, config.kv_host_budget_tokens,
                                 config.provisional_pin_s)
        self.waiting: RequestQueue = create_request_queue(self.queue_ordering)
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        # Requests inside a step that has started but not finished (a parked step included): the scheduler
        # must not touch their progress or blocks until the step's output arrives.
        self.in_flight: set[str] = set()
        # Requests ended while in a step (cancelled, or stopped at a stop string): how they end when it finishes.
        self._cancel_pending: dict[str, FinishReason] = {}
        self._step_ids = 0
        self.clock = time.monotonic

    @property
    def allocator(self) -> BlockAllocator:
        return self.kv.allocator

    @property
    def pins(self):
        return self.kv.pins

    # --- policy hooks -------------------------------------------------------------------------------
    def running_order(self) -> list[Request]:
        return list(self.running)

    def pick_victim(self, candidates: list[Request]) -> Request | None:
        """The running request to preempt when KV blocks are short (vLLM fcfs: the latest admitted)."""
        return candidates[-1] if candidates else None

    def may_preempt(self, victim: Request, for_req: Request) -> bool:
        return True

    def make_room(self, output: SchedulerOutput) -> None:
        """Called at the start of each schedule; a policy may preempt running work here for waiting work."""

    def reserved_tokens(self, req: Request) -> int:
        """The KV a request is expected to need in all: its prompt and a share of its output budget."""
        if req.beam is not None:  # beam search reserves its whole layout up front (worker/beam.py)
            return req.beam.kv_tokens
        if self.config.admission_output_fraction <= 0:
            # vLLM V1's optimistic admission: nothing is reserved beyond the tokens this step computes (its
            # allocate_slots); growth that does not fit is met by preemption.
            return req.num_computed_tokens
        expected = req.num_prompt_tokens + int(self.config.admission_output_fraction * req.sampling.max_tokens)
        return min(req.max_total_tokens, max(expected, req.num_tokens))

    def headroom_blocks(self) -> int:
        """Free blocks not yet spoken for by the expected growth of running requests."""
        alloc = self.allocator
        promised = sum(alloc.extra_blocks_for(r.request_id, self.reserved_tokens(r)) for r in self.running)
        return alloc.num_free_blocks - promised

    def admission_blocks(self, req: Request, num_tokens: int) -> int:
        """Blocks a waiting request needs to be admitted: all it is expected to need, at least this step's."""
        total = max(self.reserved_tokens(req), self._kv_tokens(req, num_tokens))
        return self.allocator.extra_blocks_for(req.request_id, total)

    def can_admit(self, req: Request, num_tokens: int) -> bool:
        """Whether a waiting request may start now with num_tokens computed this step."""
        return (len(self.running) < self.config.max_num_seqs
                and self.allocator.can_allocate(req.request_id, self._kv_tokens(req, num_tokens))
                and self.admission_blocks(req, num_tokens) <= self.headroom_blocks())

    # --- requests -------------------------------------------------------------------------------------
    def add_request(self, req: Request) -> None:
        if req.request_id in self.requests:
            raise ValueError(f"duplicate request id {req.request_id!r}")
        req.status = Status.WAITING
        self.requests[req.request_id] = req
        self.waiting.add(req)

    def has_unfinished_requests(self) -> bool:
        return bool(self.waiting or self.running)

    def has_waiting_ls(self) -> bool:
        return any(r.is_ls for r in self.waiting)

    def finish_requests(self, request_ids, reason: FinishReason = FinishReason.CANCELLED) -> list[EngineOutput]:
        """Ends requests early (cancelled, or STOP at a stop string seen in their text): their KV is freed now,
        or when their in-flight step ends (a STOP agent turn is then pinned as one that ended by itself).
        Returns the final outputs of those that finished now."""
        outputs = []
        for request_id in request_ids:
            req = self.requests.get(request_id)
            if req is None or req.is_finished:
                continue
            if request_id in self.in_flight:
                self._cancel_pending.setdefault(request_id, reason)
                continue
            self._finish(req, reason)
            outputs.append(finished_output(req, []))
        return outputs

    def fail_all(self) -> list[EngineOutput]:
        """Ends every request with ERROR and frees all KV: what the engine does after a step failed, so one
        bad step costs the requests it held, never the worker."""
        failed = list(self.requests.values())
        for req in failed:
            self._finish(req, FinishReason.ERROR)
        self.pins.release_all("error")
        self.kv.take_moves()
        self.in_flight.clear()
        self._cancel_pending.clear()
        return [finished_output(req, []) for req in failed]

    # --- scheduling -----------------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        """The next step to run (empty when there is nothing to do)."""
        return self.build_step()

    def may_park(self, plan: SchedulerOutput) -> bool:
        """Whether `plan` may be parked at all: the engine asks should_park() at its boundaries only then."""
        return self.yields_at_layer_boundaries

    def should_park(self, plan: SchedulerOutput) -> bool:
        """Asked at each layer boundary of a running step when the policy yields inside steps."""
        return False

    def park(self, plan: SchedulerOutput) -> None:
        raise RuntimeError(f"policy {self.name!r} does not park steps")

    def build_step(self, ls_only: bool = False, skip_running_ls: bool = False,
                   budget: int | None = None) -> SchedulerOutput:
        """A new step: running requests first (decodes, prefill chunks under the token budget), then waiting
        ones admitted in queue order. ls_only: LS requests only (nothing in flight is touched);
        skip_running_ls: leave running LS requests to steps of their own."""
        out = SchedulerOutput(ls_only=ls_only, scheduled_at=self.clock())
        if self.pins:
            self.pins.expire()
        self.make_room(out)
        budget = self.config.max_num_batched_tokens if budget is None else budget
        scheduled_ids: set[str] = set()
        preempted_now = False
        for req in self.running_order():
            if budget <= 0:
                break
            if req.request_id in self.in_flight or req.status is not Status.RUNNING:
                continue
            if (ls_only and not req.is_ls) or (skip_running_ls and req.is_ls):
                continue
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            if n <= 0:
                continue
            # Pinned KV of agent programs between turns goes before any running request's.
            self._evict_pins_while(lambda: not self.allocator.can_allocate(req.request_id, self._kv_tokens(req, n)),
                                   "pressure")
            while not self.allocator.can_allocate(req.request_id, self._kv_tokens(req, n)):
                candidates = [r for r in self.running if r.request_id not in scheduled_ids
                              and r.request_id not in self.in_flight and r is not req]
                victim = self.choose_victim(candidates)
                if victim is None or not self.may_preempt(victim, req):
                    victim = req
                self._preempt(victim, out)
                preempted_now = True
                if victim is req:
                    break
            if req.status is not Status.RUNNING:
                continue
            out.scheduled.append(self._schedule_one(req, n))
            scheduled_ids.add(req.request_id)
            budget -= n
        # Admit waiting requests, unless this step had to preempt (the cache is full).
        if not preempted_now:
            for req in self.waiting:
                if budget <= 0:
                    break
                if ls_only and not req.is_ls:
                    continue
                cached = self._claim_pinned_prefix(req)
                n = min(req.num_tokens - req.num_computed_tokens, budget)
                if self.pins and len(self.running) < self.config.max_num_seqs and (req.is_ls or not self.running):
                    # A pin never blocks LS, nor leaves the worker idle; a BE request waits for it (its TTL
                    # bounds the wait): the pin's program came first.
                    self._evict_pins_while(lambda: not self.can_admit(req, n), "ls" if req.is_ls else "idle",
                                           keep=req.program_id)
                if not self.can_admit(req, n) or (
                        req.beam is not None and not self.allocator.can_allocate(req.request_id, req.beam.kv_tokens)):
                    if cached:
                        self.pins.unclaim(req.request_id)
                        req.num_computed_tokens = 0
                    break
                if cached:
                    self.pins.confirm(req.request_id)
                    req.num_cached_tokens = cached
                self.waiting.remove(req)
                req.status = Status.RUNNING
                if req.first_scheduled_time is None:
                    req.first_scheduled_time = time.monotonic()
                self.running.append(req)
                out.scheduled.append(self._schedule_one(req, n))
                budget -= n
        out.scheduled.sort(key=lambda s: not s.is_decode)  # decode rows first (stable)
        for s in out.scheduled:
            self.in_flight.add(s.request.request_id)
        if out.scheduled:
            self._step_ids += 1
            out.step_id = self._step_ids
        return out

    def _evict_pins_while(self, blocked, reason: str, keep: str = "") -> None:
        """Frees pins, least worth keeping first (never `keep`'s, the program about to use it), while
        blocked() holds."""
        while self.pins and blocked():
            if not self.pins.evict_one(reason, keep=keep):
                return

    def _claim_pinned_prefix(self, req: Request) -> int:
        """An agent turn starting afresh takes over its program's pinned KV for the longest common prefix."""
        if not (req.program_id and req.num_computed_tokens == 0 and req.beam is None and self.pins):
            return 0
        cached = self.pins.claim(req.program_id, req.request_id, req.prompt_token_ids)
        req.num_computed_tokens = cached
        return cached

    def _kv_tokens(self, req: Request, n: int) -> int:
        """KV tokens the request must hold to compute n more tokens (a beam request: its whole layout)."""
        if req.beam is not None:
            return req.beam.kv_tokens
        return req.num_computed_tokens + n

    def _schedule_one(self, req: Request, n: int) -> ScheduledRequest:
        table = self.kv.allocate(req, self._kv_tokens(req, n), self.reserved_tokens(req))
        return ScheduledRequest(req, req.num_computed_tokens, n, table)

    def choose_victim(self, candidates: list[Request]) -> Request | None:
        """The KV manager's victim under alise, else the policy's (pick_victim)."""
        return self.kv.choose_victim(candidates) or self.pick_victim(candidates)

    def _preempt(self, req: Request, out: SchedulerOutput) -> None:
        """Preemption: recompute-style (vLLM V1: drop the KV, keep the tokens, requeue), or under alise the
        KV may instead go to the host pool or to int8 and come back when the request runs again."""
        if not self.kv.offload(req):
            self.kv.drop(req)
            req.num_computed_tokens = 0
            if req.beam is not None:  # the beams' KV is gone: the search restarts (deterministically) after prefill
                req.beam.reset()
                req.output_token_ids.clear()
        self.running.remove(req)
        req.status = Status.WAITING
        req.num_preemptions += 1
        self.waiting.add(req)
        out.preempted.append(req.request_id)

    # --- results --------------------------------------------------------------------------------------
    def update_from_output(self, plan: SchedulerOutput, output: ModelRunnerOutput) -> list[EngineOutput]:
        """Applies a finished step: progress, sampled tokens, finishing. Returns what to stream back."""
        outputs: list[EngineOutput] = []
        sampled = output.sampled
        now = self.clock()
        for s in plan.scheduled:
            req = s.request
            rid = req.request_id
            self.in_flight.discard(rid)
            if rid in self._cancel_pending:
                req.num_computed_tokens = s.start + s.num_tokens   # written: an agent turn's pin keeps it
                self._finish(req, self._cancel_pending.pop(rid))
                outputs.append(finished_output(req, []))
                continue
            if req.is_finished:
                continue
            req.num_computed_tokens = s.start + s.num_tokens
            token = sampled.get(rid)
            if token is None:
                continue
            req.append_token(token)
            req.last_token_time = now
            if req.beam is None:
                new = [token]
                logprobs = [output.logprobs[rid]] if rid in output.logprobs else None
            else:  # beams stream nothing until the search ends, then the best sequence
                new = list(req.output_token_ids) if req.is_finished else []
                logprobs = req.beam.best().logprobs if new and req.sampling.logprobs else None
            if req.is_finished:
                self._release(req)
                outputs.append(finished_output(req, new, logprobs))
            elif new:
                outputs.append(EngineOutput(rid, new, num_prompt_tokens=req.num_prompt_tokens,
                                            num_output_tokens=len(req.output_token_ids),
                                            cached_prompt_tokens=req.num_cached_tokens, logprobs=logprobs))
        return outputs

    def _finish(self, req: Request, reason: FinishReason) -> None:
        req.finish(reason)
        self._release(req)

    def _release(self, req: Request) -> None:
        self.kv.release(req)
        if req in self.running:
            self.running.remove(req)
        if req in self.waiting:
            self.waiting.remove(req)
        self.requests.pop(req.request_id, None)
