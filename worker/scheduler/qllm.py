"""`qllm`: priority scheduling plus preemption at decoder-layer boundaries (QLLM).

Between iterations it behaves as `priority-evict`. Inside an iteration the engine asks at every decoder-layer
boundary whether the running step should yield (should_park); it does when LS work arrived since the step
began. The engine then parks the step after layer k (hidden states, positions, layout and the KV written so
far stay as they are) and schedules again: LS-only steps run, and the parked step resumes at layer k+1 with no
recomputation. Fresh LS arrivals always get the next LS-only step. An LS-only step is not parked for a later LS
arrival: LS requests are one class, and parking an LS prefill for another only moves the wait onto it and onto
every LS stream whose token rides in its step (that made the worst LS TTFTs); the later arrival waits for the
running LS step instead.

LS decode pacing (`ls_tpot_target_s`, the LS TPOT objective): running LS streams decode in LS-only steps of
their own, one whenever a stream's next token is due, and a running BE step parks for that step as it does for
an arrival (at its next parking point; the runner has them inside a layer's blocks too). A token is due once
the objective less the LS step that makes it and less the BE stretch between two parking points has passed,
both measured. After `max_be_deferral_steps` LS-only steps in a row, BE gets its turn up to its next parking
point, so streams that are always due cannot starve it. Full iterations beside LS streams skip them (and may
take a smaller token budget, `ls_active_max_batched_tokens`). Off (0), LS decodes ride full iterations with BE
prefill chunks.

BE admission also leaves `ls_reserved_kv_tokens` of KV and `ls_reserved_slots` running slots free, so an
LS request normally starts without preempting BE at all: iteration-level preemption drops a BE request's
KV and recomputes it later, which is exactly the BE throughput QLLM sets out to keep.
"""

from __future__ import annotations

import dataclasses

from worker.outputs import EngineOutput, ModelRunnerOutput
from worker.request import Request
from worker.scheduler.base import SchedulerOutput
from worker.scheduler.priority import PriorityEvictScheduler


class QllmScheduler(PriorityEvictScheduler):
    name = "qllm"
    yields_at_layer_boundaries = True
    # Decode-only steps of at most this many rows time the LS token (the idle floor's decode step).
    SMALL_DECODE_ROWS = 8
    # The default LS TPOT objective in idle one-row steps: below 2, as the p50 it aims at lands above the
    # objective by the BE stretch a token waits out.
    TPOT_TARGET_X_IDLE_STEP = 1.5

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.parked: list[SchedulerOutput] = []       # a stack: the latest parked resumes first
        self._ls_arrived = False                      # since the last schedule
        self._ls_only_steps = 0                       # in a row, since a step with BE rows last ran
        # Moving averages (priors until the first measurements): an LS-only decode step (what an LS token
        # costs now, a few streams together), a one-row decode step, the same with no BE work in the engine
        # (the idle floor's token time, from which the default TPOT target comes; None until such a step
        # ran), and a stretch of a BE step between two boundaries (how long a due token waits for it to park).
        self.small_decode_step_s = 0.02
        self.single_decode_step_s = 0.02
        self.idle_decode_step_s: float | None = None
        self.be_piece_s = 0.005
        self._last_boundary: tuple[int, float] | None = None  # (step id, time) of the last should_park

    @property
    def pacing(self) -> bool:
        return self.config.ls_tpot_target_s != 0

    @property
    def ls_tpot_target_s(self) -> float:
        target = self.config.ls_tpot_target_s
        if target > 0:
            return target
        # A one-row step beside BE work runs slower than on an idle worker (docs/benchmarks.md): the objective
        # is relative to the idle floor, so it comes from idle steps where any ran.
        return self.TPOT_TARGET_X_IDLE_STEP * (self.idle_decode_step_s or self.single_decode_step_s)

    def add_request(self, req: Request) -> None:
        super().add_request(req)
        if req.is_ls:
            self._ls_arrived = True

    def ls_due(self, now: float) -> bool:
        """Whether a running LS request waits for a step now: its next token is due (it may wait the target
        less the LS step that produces it and the stretch of BE work it may still have to wait out), or it is
        still prefilling."""
        wait = self.ls_tpot_target_s - self.small_decode_step_s - self.be_piece_s
        for r in self.running:
            if r.is_ls and r.request_id not in self.in_flight and (
                    r.last_token_time is None or now - r.last_token_time >= wait):
                return True
        return False

    def schedule(self) -> SchedulerOutput:
        cfg = self.config
        now = self.clock()
        fresh_ls, self._ls_arrived = self._ls_arrived, False
        due = self.pacing and self.ls_due(now)
        # LS work that arrived since the last look always gets an LS-only step first; an LS stream whose token
        # is due gets one too, unless max_be_deferral_steps LS-only steps already ran in a row: then BE gets its
        # turn, up to its next layer boundary, so streams that are always due cannot starve it.
        due = due and self._ls_only_steps < max(1, cfg.max_be_deferral_steps)
        if self.parked and (fresh_ls or due):
            plan = self.build_step(ls_only=True)
            if plan:
                self._ls_only_steps += 1
                return plan
        if self.parked:
            self._ls_only_steps = 0
            return dataclasses.replace(self.parked.pop(), resumed=True)
        if (cfg.ls_only_steps and self.has_waiting_ls()) or due:
            # LS work that arrived between steps gets a step of its own too, rather than riding a full
            # iteration with BE prefill chunks.
            plan = self.build_step(ls_only=True)
            if plan:
                self._ls_only_steps += 1
                return plan
        self._ls_only_steps = 0
        if self.pacing and any(r.is_ls for r in self.running):
            # Running LS streams decode in LS-only steps at their own pace; BE iterations beside them skip them.
            budget = cfg.max_num_batched_tokens
            if cfg.ls_active_max_batched_tokens > 0:  # 0 (or below): no smaller budget, so BE never starves
                budget = min(budget, cfg.ls_active_max_batched_tokens)
            plan = self.build_step(skip_running_ls=True, budget=budget)
            return plan or self.build_step(ls_only=True)
        return self.build_step()

    def may_park(self, plan: SchedulerOutput) -> bool:
        # An LS-only step never parks (see above): its boundaries need no question, which on a one-row step
        # costs a noticeable part of the step.
        return self.config.layer_parking and plan.has_best_effort

    def should_park(self, plan: SchedulerOutput) -> bool:
        if not self.may_park(plan):
            return False
        now = self.clock()
        if self.pacing and any(r.is_ls for r in self.running):
            last = self._last_boundary
            if last is not None and last[0] == plan.step_id:
                self.be_piece_s += 0.1 * (now - last[1] - self.be_piece_s)
            self._last_boundary = (plan.step_id, now)
        return self._ls_arrived or (self.pacing and self.ls_due(now))

    def park(self, plan: SchedulerOutput) -> None:
        self._last_boundary = None  # the stretch after the resume starts anew
        self.parked.append(plan)

    def update_from_output(self, plan: SchedulerOutput, output: ModelRunnerOutput) -> list[EngineOutput]:
        if (not plan.resumed and len(plan.scheduled) <= self.SMALL_DECODE_ROWS
                and all(s.is_decode for s in plan.scheduled)):
            seconds = self.clock() - plan.scheduled_at
            self.small_decode_step_s += 0.2 * (seconds - self.small_decode_step_s)
            if len(plan.scheduled) == 1:
                self.single_decode_step_s += 0.2 * (seconds - self.single_decode_step_s)
                if not self.parked and all(r.is_ls for r in self.running) and all(r.is_ls for r in self.waiting):
                    idle = self.idle_decode_step_s
                    self.idle_decode_step_s = seconds if idle is None else idle + 0.2 * (seconds - idle)
        return super().update_from_output(plan, output)

    def can_admit(self, req: Request, num_tokens: int) -> bool:
        if not super().can_admit(req, num_tokens):
            return False
        if req.is_ls or not self.running:  # an idle worker always takes work: the reserve never deadlocks
            return True
        cfg = self.config
        if len(self.running) >= max(1, cfg.max_num_seqs - cfg.ls_reserved_slots):
            return False
        # A reserve larger than an eighth of the cache would cost BE more than it saves.
        reserve = min(cfg.ls_reserved_kv_tokens, self.allocator.capacity_tokens // 8)
        left = self.headroom_blocks() - self.admission_blocks(req, num_tokens)
        return left * self.allocator.block_size >= reserve

    def fail_all(self) -> list[EngineOutput]:
        self.parked.clear()
        return super().fail_all()
