"""The scheduler interface and the iteration-level machinery every policy shares (pure Python, no torch).

Each engine iteration the scheduler picks which requests run and how many tokens each computes (decode = 1,
prefill = a chunk under the per-iteration token budget, as vLLM's max_num_batched_tokens), allocating KV
blocks as it goes. Policies differ in order (who runs first), in which running request is preempted when
KV blocks run short, and in whether the engine may pause a step at a decoder-layer boundary.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from worker import kv_tiers
from worker.kv_blocks import BlockAllocator
from worker.kv_pins import PinStore
from worker.request import FinishReason, Request, Status


@dataclass
class SchedulerConfig:
    max_num_seqs: int = 32
    max_num_batched_tokens: int = 512
    # qllm: how many consecutive LS-only steps may run while a preempted BE step waits to resume (the
    # longest BE stays deferred while LS work is runnable). Beyond it the BE step resumes and the LS decodes
    # join the next full iteration.
    max_be_deferral_steps: int = 1
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


KV_POLICIES = ("recompute", "alise")


@dataclass
class KVMove:
    """A copy the engine must make before the next step runs (the scheduler itself never touches torch).

    kind: swap_out / quantize (the victim's blocks, about to be reused), swap_in / dequantize (into the
    request's new blocks), drop (forget a host or int8 copy: the request ended while offloaded).
    """

    kind: str
    request_id: str
    block_ids: list[int]
    num_tokens: int


def int8_owner_id(request_id: str) -> str:
    """The allocator table that charges an int8 copy's bytes against the KV budget."""
    return "\0int8:" + request_id


@dataclass
class ScheduledRequest:
    request: Request
    start: int              # num_computed_tokens when scheduled: position of the first new token
    num_tokens: int         # tokens this step computes
    block_table: list[int]

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
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    preempted: list[str] = field(default_factory=list)

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


class Scheduler:
    """Iteration-level scheduler; subclasses set the order and the preemption victim."""

    name = "base"
    # Whether the engine checks for waiting LS work at every decoder-layer boundary (QLLM).
    yields_at_layer_boundaries = False

    def __init__(self, config: SchedulerConfig, allocator: BlockAllocator):
        self.config = config
        self.allocator = allocator
        self.waiting: list[Request] = []
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        # Requests inside a step that has started but not finished (a paused step included): the scheduler
        # must not touch their progress or blocks until the step's update arrives.
        self.in_flight: set[str] = set()
        # Requests ended while in a step (cancelled, or stopped at a stop string): how they end when it finishes.
        self._cancel_pending: dict[str, FinishReason] = {}
        self.num_preemptions = 0
        self.pins = PinStore(allocator, config.provisional_pin_s)
        # ALISE (config.kv_policy == "alise"): offloaded requests, the host pool's books in blocks, the moves
        # the engine has yet to make, and the cost model the engine keeps measured.
        if config.kv_policy not in KV_POLICIES:
            raise ValueError(f"kv_policy: expected one of {', '.join(KV_POLICIES)}, got {config.kv_policy!r}")
        self.alise = config.kv_policy == "alise"
        if config.kv_int8 not in [q.value for q in kv_tiers.QualityBound]:
            raise ValueError(f"kv_int8: expected one of off, be, all, got {config.kv_int8!r}")
        self.quality = kv_tiers.QualityBound(config.kv_int8)
        self.offloaded: dict[str, tuple[kv_tiers.Action, int]] = {}   # request -> (tier, blocks)
        self.host_capacity_blocks = max(0, config.kv_host_budget_tokens // allocator.block_size)
        self.host_used_blocks = 0
        self.kv_moves: list[KVMove] = []
        self.move_counts: dict[str, int] = {}
        self.cost_model = kv_tiers.CostModel(
            block_bytes=allocator.block_size * 8192, int8_block_bytes=allocator.block_size * 2176,
            prefill_s_per_token=1e-4, decode_step_s=0.02, swap_out_bytes_per_s=2e9, swap_in_bytes_per_s=2e9,
            quantize_bytes_per_s=5e8, dequantize_bytes_per_s=5e8)  # priors; the engine replaces them

    # --- policy hooks -------------------------------------------------------------------------------
    def waiting_key(self, req: Request):
        return (req.arrival_time,)

    def running_order(self) -> list[Request]:
        return list(self.running)

    def pick_victim(self, candidates: list[Request]) -> Request | None:
        """The running request to preempt when KV blocks are short (vLLM fcfs: the latest admitted)."""
        return candidates[-1] if candidates else None

    def make_room(self, output: SchedulerOutput) -> None:
        """Called at the start of each schedule; priority policies preempt BE here for waiting LS."""

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
        self.waiting.append(req)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def has_waiting_ls(self) -> bool:
        return any(r.is_ls for r in self.waiting)

    def abort(self, request_id: str, reason: FinishReason = FinishReason.CANCELLED) -> Request | None:
        """Ends a request early (cancelled, or STOP at a stop string seen in its text); frees its KV now, or when
        its in-flight step ends (a STOP agent turn is pinned as one that ended by itself). Returns it if
        finished now."""
        req = self.requests.get(request_id)
        if req is None or req.is_finished:
            return None
        if request_id in self.in_flight:
            self._cancel_pending.setdefault(request_id, reason)
            return None
        self._finish(req, reason)
        return req

    def fail_all(self) -> list[Request]:
        """Ends every request with ERROR and frees all KV: what the engine does after a step failed, so one
        bad step costs the requests it held, never the worker."""
        failed = list(self.requests.values())
        for req in failed:
            self._finish(req, FinishReason.ERROR)
        self.pins.release_all("error")
        self.in_flight.clear()
        self._cancel_pending.clear()
        return failed

    # --- scheduling -----------------------------------------------------------------------------------
    def schedule(self, ls_only: bool = False) -> SchedulerOutput:
        out = SchedulerOutput()
        if self.pins:
            self.pins.expire()
        self.make_room(out)
        budget = self.config.max_num_batched_tokens
        scheduled_ids: set[str] = set()
        preempted_now = False
        for req in self.running_order():
            if budget <= 0:
                break
            if req.request_id in self.in_flight or req.status is not Status.RUNNING:
                continue
            if ls_only and not req.is_ls:
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
                if victim is None or not self._may_preempt(victim, req):
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
            self.waiting.sort(key=self.waiting_key)
            for req in list(self.waiting):
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
        for s in out.scheduled:
            self.in_flight.add(s.request.request_id)
        return out

    def _may_preempt(self, victim: Request, for_req: Request) -> bool:
        return True

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
        if req.request_id in self.offloaded and self.offloaded[req.request_id][0] is kv_tiers.Action.INT8:
            self.allocator.free(int8_owner_id(req.request_id))  # the copy is about to become blocks again
        table = self.allocator.allocate(req.request_id, self._kv_tokens(req, n),
                                        expected_tokens=self.reserved_tokens(req))
        if req.request_id in self.offloaded:
            self._restore(req, table)
        return ScheduledRequest(req, req.num_computed_tokens, n, list(table))

    def choose_victim(self, candidates: list[Request]) -> Request | None:
        """The policy's victim (pick_victim), or under alise kv_tiers' (class, then longest remaining time,
        keeping one that would be back before its KV finished moving)."""
        if not self.alise or not candidates:
            return self.pick_victim(candidates)
        by_id = {r.request_id: r for r in candidates}
        cands = [self._candidate(r) for r in candidates]
        plan = kv_tiers.plan_evictions(cands, 1, self.cost_model, self._host_free_bytes(), self.quality)
        return by_id[plan[0].request_id] if plan else self.pick_victim(candidates)

    def _candidate(self, req: Request) -> kv_tiers.Candidate:
        cls = kv_tiers.VictimClass.LS if req.is_ls else kv_tiers.VictimClass.BE
        return kv_tiers.Candidate(req.request_id, cls, self._computed_blocks(req), req.num_computed_tokens,
                                  req.expected_remaining_tokens,
                                  order_key=req.order_key, arrival_time=req.arrival_time)

    def _computed_blocks(self, req: Request) -> int:
        return self.allocator.blocks_needed(req.num_computed_tokens)

    def _host_free_bytes(self) -> int:
        return (self.host_capacity_blocks - self.host_used_blocks) * self.cost_model.block_bytes

    def _add_move(self, kind: str, req: Request, block_ids: list[int]) -> None:
        self.kv_moves.append(KVMove(kind, req.request_id, list(block_ids), req.num_computed_tokens))
        self.move_counts[kind] = self.move_counts.get(kind, 0) + 1

    def take_moves(self) -> list[KVMove]:
        """The copies to make before the next step, in order (a swap-out before any reuse of its blocks)."""
        moves, self.kv_moves = self.kv_moves, []
        return moves

    def _offload(self, req: Request) -> bool:
        """alise: moves a victim's KV to the host pool or to int8 per the cost model; False = recompute."""
        if not self.alise or req.beam is not None or req.num_computed_tokens == 0:
            return False
        decision = kv_tiers.choose_action(self._candidate(req), self.cost_model, self._host_free_bytes(),
                                          self.quality)
        n = self._computed_blocks(req)
        blocks = self.allocator.block_table(req.request_id)[:n]
        if decision.action is kv_tiers.Action.SWAP:
            self._add_move("swap_out", req, blocks)
            self.host_used_blocks += n
        elif decision.action is kv_tiers.Action.INT8:
            self._add_move("quantize", req, blocks)
        else:
            return False
        self.allocator.free(req.request_id)
        if decision.action is kv_tiers.Action.INT8:  # its compact copy stays charged against the budget
            retained = self.cost_model.int8_retained_blocks(n)
            self.allocator.allocate(int8_owner_id(req.request_id), retained * self.allocator.block_size)
        self.offloaded[req.request_id] = (decision.action, n)
        return True

    def _restore(self, req: Request, table: list[int]) -> None:
        """An offloaded request runs again: its KV comes back into the first blocks of its new table."""
        action, n = self.offloaded.pop(req.request_id)
        if action is kv_tiers.Action.SWAP:
            self._add_move("swap_in", req, table[:n])
            self.host_used_blocks -= n
        else:
            self._add_move("dequantize", req, table[:n])

    def _forget_offloaded(self, req: Request) -> None:
        entry = self.offloaded.pop(req.request_id, None)
        if entry is None:
            return
        action, n = entry
        self.kv_moves.append(KVMove("drop", req.request_id, [], 0))
        if action is kv_tiers.Action.SWAP:
            self.host_used_blocks -= n
        else:
            self.allocator.free(int8_owner_id(req.request_id))

    def _preempt(self, req: Request, out: SchedulerOutput) -> None:
        """Preemption: recompute-style (vLLM V1: drop the KV, keep the tokens, requeue), or under alise the
        KV may instead go to the host pool or to int8 and come back when the request runs again."""
        if self._offload(req):
            self.running.remove(req)
            req.status = Status.WAITING
            req.num_preemptions += 1
            self.num_preemptions += 1
            self.waiting.append(req)
            out.preempted.append(req.request_id)
            return
        if req.num_computed_tokens:
            self.move_counts["recompute"] = self.move_counts.get("recompute", 0) + 1
        self.allocator.free(req.request_id)
        self.running.remove(req)
        req.num_computed_tokens = 0
        if req.beam is not None:  # the beams' KV is gone: the search restarts (deterministically) after prefill
            req.beam.reset()
            req.output_token_ids.clear()
        req.status = Status.WAITING
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.append(req)
        out.preempted.append(req.request_id)

    # --- results --------------------------------------------------------------------------------------
    def update(self, output: SchedulerOutput, sampled: dict[str, int]) -> list[Request]:
        """Applies a finished step: progress, sampled tokens, finishing. Returns requests with news."""
        changed: list[Request] = []
        for s in output.scheduled:
            req = s.request
            rid = req.request_id
            self.in_flight.discard(rid)
            if rid in self._cancel_pending:
                req.num_computed_tokens = s.start + s.num_tokens   # written: an agent turn's pin keeps it
                self._finish(req, self._cancel_pending.pop(rid))
                changed.append(req)
                continue
            if req.is_finished:
                continue
            req.num_computed_tokens = s.start + s.num_tokens
            token = sampled.get(rid)
            if token is not None:
                req.append_token(token)
                if req.is_finished:
                    self._release(req)
                changed.append(req)
        return changed

    def _finish(self, req: Request, reason: FinishReason) -> None:
        req.finish(reason)
        self._release(req)

    def _release(self, req: Request) -> None:
        self._forget_offloaded(req)
        if req.keeps_kv_for_next_turn:
            self.pins.retain(req.program_id, req.request_id, req.all_token_ids[:req.num_computed_tokens])
        else:
            self.allocator.free(req.request_id)
            if req.program_id and req.last_turn:
                self.pins.release(req.program_id, "last_turn")
        if req in self.running:
            self.running.remove(req)
        if req in self.waiting:
            self.waiting.remove(req)
        self.requests.pop(req.request_id, None)
