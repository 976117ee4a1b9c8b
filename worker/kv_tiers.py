"""ALISE's priority-aware KV memory under pressure: whose KV to move, and where (pure Python, no torch).

When the KV budget cannot hold every request that needs to run, the scheduler asks this module for victims
and, for each, the cheapest way to free its blocks:

- **swap**: copy its blocks to the host pool and free them; copy them back into new blocks before it runs.
- **int8**: quantize its blocks to int8 (symmetric, per-token scales, worker/kv_quant.py), keep the compact
  copy, free the blocks; dequantize into new blocks before it runs. Lossy, so only for the classes the
  configured quality bound allows (`QualityBound`).
- **recompute**: drop its KV and prefill its tokens again when it runs (vLLM V1's only answer).

Victim order
------------
1. By class: idle pinned agent KV first (a finished turn's KV kept for the program's next turn; no request
   is using it now, and the kvmanager's `keep_score` ranks the pins, lowest first), then BE, then LS (the
   scheduler never evicts LS for BE; that rule lives with it).
2. Within a class, the longest estimated remaining time first: its blocks would otherwise sit the longest,
   and it is the request that finishes last anyway (ALISE's speculative order). Remaining time is the
   request's remaining output tokens x the measured decode step time; the router's order key (its
   predicted length score, larger = longer) breaks ties, then the later arrival.

Cost model (seconds of engine time an action adds; the engine is the bottleneck resource)
-----------------------------------------------------------------------------------------
With B the victim's KV bytes (all layers, keys and values; `block_bytes` x blocks) and T its computed tokens:

    swap       = B / swap_out_bytes_per_s + B / swap_in_bytes_per_s     only if the host pool has B free
    int8       = B / quantize_bytes_per_s + B / dequantize_bytes_per_s  only if the quality bound allows it
    recompute  = T x prefill_s_per_token

The copy bandwidths are measured by the host pool on the actual copies (worker/host_pool.py), the
quantization rates by worker/kv_quant.py, the prefill and decode costs at the engine's warm-up. On a GPU the
host pool copies on a side stream; the model still waits for a swap-in before the request's next step, so
both directions are counted (an upper bound on the visible cost).

int8 does not free all of a victim's blocks: its compact copy (1 byte per element plus one scale per token
and head) is charged against the same KV budget, `int8_retained_blocks(n)` of them, so the comparison is
per freed block: cost / blocks freed. Ties go to the lossless action (swap, then recompute, then int8).

Keep or evict
-------------
An eviction only pays off when the victim's memory stays free for longer than moving it takes. Each
candidate carries its estimated wait before it runs again (`estimate_wait_s`: the time until the first of
the requests that keep running finishes and frees its blocks, or, for a pin, the predicted tool gap); a
candidate whose wait is shorter than its cheapest action's cost is kept in a first pass and evicted only
if the others cannot free enough.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field


class VictimClass(enum.IntEnum):
    """Eviction order between classes: lower is evicted first."""

    PINNED = 0   # idle KV of a finished agent turn, pinned for the program's next turn
    BE = 1
    LS = 2


class Action(str, enum.Enum):
    SWAP = "swap"
    INT8 = "int8"
    RECOMPUTE = "recompute"


# Lossless first: on equal cost per freed block the earlier one wins.
TIE_ORDER = (Action.SWAP, Action.RECOMPUTE, Action.INT8)


class QualityBound(str, enum.Enum):
    """Which classes may have their KV quantized to int8 (it can change their greedy tokens)."""

    OFF = "off"      # never
    BE = "be"        # best-effort requests and idle pins only
    ALL = "all"      # LS too

    def allows(self, cls: VictimClass) -> bool:
        if self is QualityBound.OFF:
            return False
        return self is QualityBound.ALL or cls is not VictimClass.LS


@dataclass(frozen=True)
class Candidate:
    """A request (or an idle pin) holding KV blocks that could be freed."""

    request_id: str
    cls: VictimClass
    num_blocks: int             # blocks it holds now
    num_computed_tokens: int    # tokens whose KV it holds (what a recompute prefills again)
    remaining_tokens: int = 0   # output tokens still to generate (0 for a pin)
    keep_score: float = 0.0     # pins: the kvmanager's ranking, higher = keep longer
    order_key: float = 0.0      # the router's predicted length score, larger = longer
    arrival_time: float = 0.0
    wait_s: float | None = None  # estimated time before it runs again; None = unknown (long)


@dataclass
class CostModel:
    """Measured costs; every rate in bytes per second, every time in seconds."""

    block_bytes: int                       # one block, all layers, keys and values
    int8_block_bytes: int                  # the same block quantized (values + scales)
    prefill_s_per_token: float
    decode_step_s: float
    swap_out_bytes_per_s: float
    swap_in_bytes_per_s: float
    quantize_bytes_per_s: float
    dequantize_bytes_per_s: float

    def __post_init__(self):
        if self.block_bytes <= 0 or self.int8_block_bytes <= 0:
            raise ValueError("block sizes must be positive")
        for name in ("swap_out_bytes_per_s", "swap_in_bytes_per_s", "quantize_bytes_per_s",
                     "dequantize_bytes_per_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive")
        if self.prefill_s_per_token < 0 or self.decode_step_s < 0:
            raise ValueError("times must be non-negative")

    def kv_bytes(self, num_blocks: int) -> int:
        return num_blocks * self.block_bytes

    def int8_retained_blocks(self, num_blocks: int) -> int:
        """KV-budget blocks the compact int8 copy of num_blocks blocks is charged."""
        return math.ceil(num_blocks * self.int8_block_bytes / self.block_bytes)

    def swap_s(self, num_blocks: int) -> float:
        b = self.kv_bytes(num_blocks)
        return b / self.swap_out_bytes_per_s + b / self.swap_in_bytes_per_s

    def int8_s(self, num_blocks: int) -> float:
        b = self.kv_bytes(num_blocks)
        return b / self.quantize_bytes_per_s + b / self.dequantize_bytes_per_s

    def recompute_s(self, num_tokens: int) -> float:
        return num_tokens * self.prefill_s_per_token

    def remaining_s(self, cand: Candidate) -> float:
        return cand.remaining_tokens * self.decode_step_s


@dataclass(frozen=True)
class Decision:
    request_id: str
    action: Action
    cost_s: float
    freed_blocks: int
    costs: dict = field(default_factory=dict)   # every feasible action -> its cost in seconds


def victim_key(cand: Candidate, model: CostModel):
    """Sort key: evicted first = smallest. Class, then pins by keep score, then longest remaining first."""
    return (int(cand.cls), cand.keep_score if cand.cls is VictimClass.PINNED else 0.0,
            -model.remaining_s(cand), -cand.order_key, -cand.arrival_time)


def order_victims(cands: list[Candidate], model: CostModel) -> list[Candidate]:
    return sorted(cands, key=lambda c: victim_key(c, model))


def choose_action(cand: Candidate, model: CostModel, host_free_bytes: int,
                  quality: QualityBound = QualityBound.BE) -> Decision:
    """The cheapest action per freed block for one victim, among those that are feasible now."""
    n = cand.num_blocks
    costs: dict[Action, float] = {Action.RECOMPUTE: model.recompute_s(cand.num_computed_tokens)}
    if model.kv_bytes(n) <= host_free_bytes:
        costs[Action.SWAP] = model.swap_s(n)
    retained = model.int8_retained_blocks(n)
    if quality.allows(cand.cls) and retained < n:
        costs[Action.INT8] = model.int8_s(n)
    freed = {a: (n - retained if a is Action.INT8 else n) for a in costs}
    best = min(costs, key=lambda a: (costs[a] / max(1, freed[a]), TIE_ORDER.index(a)))
    return Decision(cand.request_id, best, costs[best], freed[best], dict(costs))


def estimate_wait_s(cand: Candidate, staying: list[Candidate], model: CostModel) -> float:
    """When the victim can expect to run again: when the first request that keeps running finishes and
    frees its blocks (at least one decode step). A pin waits for its own next turn (its `wait_s`)."""
    if cand.wait_s is not None:
        return cand.wait_s
    if not staying:
        return model.decode_step_s
    return max(model.decode_step_s, min(model.remaining_s(c) for c in staying))


def plan_evictions(cands: list[Candidate], blocks_needed: int, model: CostModel, host_free_bytes: int,
                   quality: QualityBound = QualityBound.BE, staying: list[Candidate] | None = None
                   ) -> list[Decision]:
    """Victims and actions that free at least blocks_needed blocks (or all there is), in eviction order.

    `staying` are the running requests that are not candidates (they keep their KV regardless); the wait of
    a victim is estimated against them and the candidates not yet chosen.
    """
    if blocks_needed <= 0:
        return []
    ordered = order_victims(cands, model)
    staying = list(staying or ())
    chosen: list[Decision] = []
    kept: list[Candidate] = []
    freed = 0
    host_left = host_free_bytes

    def take(cand: Candidate) -> None:
        nonlocal freed, host_left
        d = choose_action(cand, model, host_left, quality)
        if d.action is Action.SWAP:
            host_left -= model.kv_bytes(cand.num_blocks)
        chosen.append(d)
        freed += d.freed_blocks

    for i, cand in enumerate(ordered):
        if freed >= blocks_needed:
            break
        others = staying + [c for c in ordered[i + 1:]] + kept
        wait = estimate_wait_s(cand, others, model)
        if wait < choose_action(cand, model, host_left, quality).cost_s:
            kept.append(cand)  # it would be back before its KV finished moving: try the others first
            continue
        take(cand)
    for cand in kept:  # nothing better was left
        if freed >= blocks_needed:
            break
        take(cand)
    return chosen


class RateMeter:
    """Bytes per second of one kind of move, measured on the real moves (a running total, so one odd call
    moves it little), with a prior until something is measured."""

    def __init__(self, prior_bytes_per_s: float):
        self.prior = prior_bytes_per_s
        self.bytes = 0
        self.seconds = 0.0

    def observe(self, nbytes: int, seconds: float) -> None:
        self.bytes += nbytes
        self.seconds += max(seconds, 1e-9)

    @property
    def bytes_per_s(self) -> float:
        return self.bytes / self.seconds if self.bytes else self.prior
