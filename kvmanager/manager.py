"""What the KVManager service decides, without grpc: ledger + continuation model + pin policy + pressure.

One finished turn goes through two steps, with the tool-duration estimate fetched in between (by the
server, from the predictor or the local model; kvmanager/estimates.py):
1. `begin(turn, prev_tool_duration_s, now)` validates the report, records that the program continued past
   its previous turn, and returns the previous turn's tool, to whose durations the reported gap belongs;
2. `decide(turn, estimate, now)` drops the program's previous pin, asks the policy whether to pin this
   turn's KV and for how long (with P(continue) at this turn index and the worker's memory pressure), makes
   room within the worker's pin budget by evicting pins less likely to come back than this one, and
   records the pin. The outcome lists the ledger entries dropped along the way that a worker still holds
   (`releases`), for the server to free there.

`maintain(now)` is the periodic part: lapsed pins, pins over a worker's budget or on a worker short of free
KV (the least likely to return first), and programs that went idle (they did not continue).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from kvmanager.continuation import ContinuationModel
from kvmanager.ledger import Ledger, PinEntry
from kvmanager.ttl import Decision, DurationQuantiles, PinPolicy, Turn, TurnContext

MAX_ID_CHARS = 256
# The router sends "<tenant>/<program_id>" (router/namespaces.py): a 63-character tenant and a 256-character id.
MAX_PROGRAM_ID_CHARS = 512


class InvalidReport(ValueError):
    """Bad input; `field` names the offending field."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


@dataclass(frozen=True)
class Estimate:
    """What the predictor (or the local fallback) says about the turn: the next tool's duration and the
    seconds a recompute of the context would take."""

    durations: DurationQuantiles
    recompute_s: float
    source: str = "local"  # "predictor" or "local"


@dataclass(frozen=True)
class Outcome:
    decision: Decision
    entry: PinEntry | None  # the pin recorded, if any
    releases: list[PinEntry] = field(default_factory=list)  # dropped pins a worker may still hold
    context: TurnContext | None = None

    @property
    def expires_at(self) -> float:
        return self.entry.expires_at if self.entry else 0.0


@dataclass
class WorkerMemory:
    """The worker's KV as its last Describe said."""

    capacity_tokens: int
    free_tokens: int


def validate(turn: Turn, prev_tool_duration_s: float) -> None:
    if not turn.program_id:
        raise InvalidReport("program_id", "must not be empty")
    if len(turn.program_id) > MAX_PROGRAM_ID_CHARS:
        raise InvalidReport("program_id", f"longer than {MAX_PROGRAM_ID_CHARS} characters")
    if not turn.worker:
        raise InvalidReport("worker", "must not be empty")
    if len(turn.worker) > MAX_ID_CHARS:
        raise InvalidReport("worker", f"longer than {MAX_ID_CHARS} characters")
    if len(turn.tool_name) > MAX_ID_CHARS:
        raise InvalidReport("tool_name", f"longer than {MAX_ID_CHARS} characters")
    if not math.isfinite(prev_tool_duration_s) or prev_tool_duration_s < 0:
        raise InvalidReport("prev_tool_duration_s", "must be a finite number >= 0")


class PinManager:
    def __init__(self, policy: PinPolicy, ledger: Ledger | None = None,
                 continuation: ContinuationModel | None = None, budget_fraction: float = 0.9,
                 min_free_fraction: float = 0.0):
        if not 0 < budget_fraction <= 1 or not 0 <= min_free_fraction < 1:
            raise ValueError("budget_fraction must be in (0, 1], min_free_fraction in [0, 1)")
        self.policy = policy
        self.ledger = ledger if ledger is not None else Ledger()
        self.continuation = continuation if continuation is not None else ContinuationModel()
        self.budget_fraction = budget_fraction
        self.min_free_fraction = min_free_fraction
        self.memory: dict[str, WorkerMemory] = {}

    # --- one turn ---------------------------------------------------------------------------------------
    def begin(self, turn: Turn, prev_tool_duration_s: float, now: float) -> str:
        """Validates and records the turn; returns the tool whose call the reported gap measured ("")."""
        validate(turn, prev_tool_duration_s)
        previous = self.ledger.turn_ended(turn.program_id, turn.tool_name, turn.last_turn, now, turn.turn_index)
        self._learn_abandoned()
        if previous is None:
            return ""
        self.continuation.observe(previous.turn_index, True)
        return previous.tool if prev_tool_duration_s > 0 else ""

    def context(self, turn: Turn, estimate: Estimate) -> TurnContext:
        return TurnContext(durations=estimate.durations, recompute_s=estimate.recompute_s,
                           p_continue=self.continuation.p_continue(turn.turn_index),
                           pressure=self.pressure(turn.worker, turn.context_tokens))

    def decide(self, turn: Turn, estimate: Estimate, now: float) -> Outcome:
        releases = []
        previous = self.ledger.release(turn.program_id)
        if previous is not None and previous.worker != turn.worker:
            releases.append(previous)  # the program moved: its old KV is no use where it was
        ctx = self.context(turn, estimate)
        decision = self.policy.decide(turn, ctx)
        if not decision.pin or decision.ttl_s <= 0:
            return Outcome(Decision(False, 0.0, decision.reason), None, releases, ctx)
        bounded = self.policy.bounded
        if bounded and not self.ledger.fits(turn.worker, turn.context_tokens):
            evicted = self._make_room(turn.worker, turn.context_tokens, decision.keep_score, now)
            if evicted is None:
                return Outcome(Decision(False, 0.0, "over_budget"), None, releases, ctx)
            releases.extend(evicted)
        entry = self.ledger.pin(turn.program_id, turn.worker, turn.context_tokens, decision.ttl_s, now,
                                turn_index=turn.turn_index, tool_name=turn.tool_name,
                                keep_score=decision.keep_score, p_continue=ctx.p_continue,
                                durations=ctx.durations, enforce_budget=bounded)
        if entry is None:
            return Outcome(Decision(False, 0.0, "over_budget"), None, releases, ctx)
        return Outcome(decision, entry, releases, ctx)

    def report(self, turn: Turn, prev_tool_duration_s: float, now: float, estimator) -> Outcome:
        """Both steps with a synchronous estimator (kvmanager.estimates.LocalEstimator)."""
        tool = self.begin(turn, prev_tool_duration_s, now)
        if tool:
            estimator.observe(tool, prev_tool_duration_s)
        return self.decide(turn, estimator.estimate(turn.tool_name, turn.context_tokens), now)

    # --- pressure ---------------------------------------------------------------------------------------
    def observe_worker(self, worker: str, capacity_tokens: int, free_tokens: int) -> None:
        """What the worker's Describe said; sets its learned pin budget."""
        if capacity_tokens <= 0:
            return
        self.memory[worker] = WorkerMemory(int(capacity_tokens), int(max(0, free_tokens)))
        self.ledger.learned_budgets[worker] = max(1, int(capacity_tokens * self.budget_fraction))

    def pressure(self, worker: str, extra_tokens: int = 0) -> float:
        """The pin budget used with `extra_tokens` more, or the worker's KV used fraction if higher."""
        rho = 0.0
        budget = self.ledger.budget(worker)
        if budget:
            rho = (self.ledger.pinned_tokens(worker) + extra_tokens) / budget
        mem = self.memory.get(worker)
        if mem is not None:
            rho = max(rho, 1.0 - mem.free_tokens / mem.capacity_tokens)
        return rho

    def keep_score(self, entry: PinEntry, now: float) -> float:
        ttl = entry.expires_at - entry.pinned_at
        return self.policy.keep_score_now(entry.keep_score, entry.durations, entry.p_continue, ttl,
                                          max(0.0, now - entry.pinned_at))

    def eviction_order(self, worker: str, now: float) -> list[PinEntry]:
        """The worker's pins, the least likely to come back first (ties: the soonest to lapse)."""
        return sorted(self.ledger.list(now, worker), key=lambda e: (self.keep_score(e, now), e.expires_at))

    def _make_room(self, worker: str, tokens: int, keep_score: float, now: float) -> list[PinEntry] | None:
        """Evicts pins less likely to return than a new one of `keep_score` until `tokens` fit; None (nothing
        evicted) when they cannot."""
        budget = self.ledger.budget(worker)
        need = self.ledger.pinned_tokens(worker) + tokens - budget
        victims, freed = [], 0
        for entry in self.eviction_order(worker, now):
            if freed >= need:
                break
            if self.keep_score(entry, now) >= keep_score:
                return None
            victims.append(entry)
            freed += entry.tokens
        if freed < need:
            return None
        return [self.ledger.release(e.program_id) for e in victims]

    def maintain(self, now: float) -> dict[str, list[PinEntry]]:
        """Periodic upkeep: returns the pins dropped, by why ("expired", "pressure")."""
        expired = self.ledger.expire(now)
        self._learn_abandoned()
        pressure: list[PinEntry] = []
        if self.policy.bounded:
            for worker in self.ledger.workers():
                over = self.ledger.pinned_tokens(worker) - (self.ledger.budget(worker) or math.inf)
                mem = self.memory.get(worker)
                if mem is not None and self.min_free_fraction:
                    over = max(over, self.min_free_fraction * mem.capacity_tokens - mem.free_tokens)
                for entry in self.eviction_order(worker, now):
                    if over <= 0:
                        break
                    pressure.append(self.ledger.release(entry.program_id))
                    over -= entry.tokens
                if mem is not None:  # what this upkeep freed counts as free until the next Describe
                    mem.free_tokens += sum(e.tokens for e in pressure if e.worker == worker)
        return {"expired": expired, "pressure": pressure}

    # --- programs ---------------------------------------------------------------------------------------
    def release(self, program_id: str) -> PinEntry | None:
        """The program is cancelled: forget it (it did not continue) and drop its pin."""
        prog = self.ledger.forget(program_id)
        if prog is not None:
            self.continuation.observe(prog.turn_index, False)
        return self.ledger.release(program_id)

    def drop_if_current(self, entry: PinEntry) -> bool:
        """The worker no longer holds `entry` (SetPin answered held=false): drop it unless replaced since."""
        return self.ledger.release(entry.program_id, seq=entry.seq) is not None

    def pins(self, now: float, worker: str | None = None) -> list[PinEntry]:
        return self.ledger.list(now, worker)

    def _learn_abandoned(self) -> None:
        for prog in self.ledger.take_abandoned():
            self.continuation.observe(prog.turn_index, False)
