"""Pin policies: after a turn of an agent program ends, keep its KV cache pinned on the worker, and for how long?

Continuum's question. The answer depends on the tool the program calls next: a short tool call means the
next turn comes back soon and the pinned KV saves a prefill; a long one means the pin holds memory for
nothing. Each policy answers `decide(turn, context) -> Decision` and is pure: no clock, no I/O, no grpc.
`TurnContext` carries what is known when the turn ends: the predicted distribution of the next tool call's
duration D (quantiles, from qllm/estimators/tool_durations.py), the seconds to recompute the context if the pin
is gone (the latency model's prefill time), P(the program continues after this turn) (learned per turn
index, kvmanager/continuation.py) and the memory pressure on the worker.

Policies (`--pin-policy`):
- `no-pin`: never pin (vLLM's behaviour: the KV is freed when the request ends).
- `fixed-ttl`: Continuum's preview baseline: pin for a fixed TTL (2 s) when the mean observed duration of
  the tool is at most that TTL. A tool never seen before is pinned too (the cost is bounded by the TTL)
  unless `pin_unknown=False`.
- `ttl` (ours, `PredictedTTL`): for a turn of `n` context tokens whose recompute takes `R` seconds, with
  p = P(continue) and a memory price `lam(rho) = idle_price + pressure_price * rho / (1 - rho)` (seconds of
  recompute that holding one token for one second is worth, at pressure rho = the worker's pinned tokens,
  this pin's included, over its pin budget, or its KV used fraction if higher, capped at 0.95), pick

      TTL* = argmax_t  p * P(D <= t) * R  -  lam(rho) * n * (p * E[min(D, t)] + (1 - p) * t)

  over the candidate TTLs t = q_i * (1 + slack_frac) + slack_s at the predicted quantiles q_i (the gain
  only steps up at an atom of D, while the holding cost grows with t, so the optimum sits just past one;
  the slack covers the router-to-worker delays around a tool call), capped at `max_ttl_s`. No pin when
  the best gain is <= 0 ("not_worth_it"), when R < `min_recompute_s` ("cheap_context": recomputing is
  cheaper than the bookkeeping), or at rho >= 1 with nothing to evict (the manager says "over_budget").
  The pin's keep_score is p * P(D <= TTL*), the probability that the program comes back while pinned; as
  time passes without the program returning, `keep_score_now` lowers it by Bayes (who is most likely not to
  return now), which orders unpinning under memory pressure. Low pressure: long TTLs that cover the tool's
  tail, long-but-predictable tools pinned (fixed-ttl drops every tool with mean > 2 s); high pressure:
  shorter TTLs and fewer pins, the least likely to return unpinned first.
- `pin-forever`: the oracle: pin every non-final turn with an infinite TTL and no budget (the worker still
  evicts pins when an LS request needs the memory).
"""

from __future__ import annotations

import bisect
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Turn:
    """What the policy knows about the turn that just ended."""

    program_id: str
    worker: str
    context_tokens: int
    last_turn: bool
    tool_name: str = ""
    turn_index: int = 0


@dataclass(frozen=True)
class DurationQuantiles:
    """A predicted tool-duration distribution as quantiles: P(D <= values[i]) = levels[i]. Read as a discrete
    distribution, each level's mass sits at its value (levels[i] - levels[i-1] at values[i]) and the mass
    above the last level lies beyond every finite TTL: this never understates what a pin holds."""

    levels: tuple[float, ...]
    values: tuple[float, ...]
    mean_s: float
    samples: int = 0  # observations of this tool behind the prediction
    prior: bool = True  # no observation of this tool: the pooled / fixed prior
    observed_mean_s: float = 0.0  # the plain mean of the tool's observed durations (0 when none)

    def __post_init__(self):
        if len(self.levels) != len(self.values) or not self.levels:
            raise ValueError("levels and values must be non-empty and of the same length")
        if any(b < a for a, b in zip(self.levels, self.levels[1:])) or not 0 < self.levels[0] <= self.levels[-1] < 1:
            raise ValueError("levels must be increasing probabilities in (0, 1)")
        if any(b < a for a, b in zip(self.values, self.values[1:])) or self.values[0] < 0:
            raise ValueError("values must be non-decreasing and >= 0")

    def cdf(self, t: float) -> float:
        i = bisect.bisect_right(self.values, t)
        return self.levels[i - 1] if i else 0.0

    def expected_min(self, t: float) -> float:
        """E[min(D, t)]."""
        total, prev = 0.0, 0.0
        for level, value in zip(self.levels, self.values):
            total += (level - prev) * min(value, t)
            prev = level
        beyond = 1.0 - prev
        return total + beyond * t if beyond > 0 else total


@dataclass(frozen=True)
class TurnContext:
    durations: DurationQuantiles  # of the tool called after this turn
    recompute_s: float  # seconds to prefill the context again when the pin is gone
    p_continue: float = 1.0  # P(the program has another turn after this one)
    pressure: float = 0.0  # the worker's pinned tokens with this pin / its pin budget (>= 1: no room)


@dataclass(frozen=True)
class Decision:
    pin: bool
    ttl_s: float = 0.0
    reason: str = ""
    # Eviction order on the worker and in the kvmanager under memory pressure: the lowest goes first.
    keep_score: float = 0.0


NO_PIN_LAST_TURN = Decision(False, 0.0, "last_turn")


class PinPolicy(ABC):
    name: str = ""
    bounded: bool = True  # pins count against the per-worker budget (pin-forever: no budget)

    @abstractmethod
    def decide(self, turn: Turn, ctx: TurnContext) -> Decision:
        """Whether to pin the KV of the turn that just ended, and for how long."""

    def keep_score_now(self, keep_score: float, durations: DurationQuantiles | None, p_continue: float,
                       ttl_s: float, elapsed_s: float) -> float:
        """The pin's keep score `elapsed_s` after it was set (policies that learn nothing: unchanged)."""
        return keep_score


class NoPin(PinPolicy):
    name = "no-pin"

    def decide(self, turn: Turn, ctx: TurnContext) -> Decision:
        if turn.last_turn:
            return NO_PIN_LAST_TURN
        return Decision(False, 0.0, "policy")


class FixedTTL(PinPolicy):
    """Pin for `ttl_s` when the next tool's mean observed duration is <= `max_tool_s` (Continuum's fixed-TTL
    baseline). It looks at the plain mean of the tool's observed durations, nothing else."""

    name = "fixed-ttl"

    def __init__(self, ttl_s: float = 2.0, max_tool_s: float | None = None, pin_unknown: bool = True):
        if not (ttl_s > 0 and math.isfinite(ttl_s)):
            raise ValueError("ttl_s must be a positive number")
        self.ttl_s = float(ttl_s)
        self.max_tool_s = float(ttl_s if max_tool_s is None else max_tool_s)
        self.pin_unknown = pin_unknown

    def decide(self, turn: Turn, ctx: TurnContext) -> Decision:
        if turn.last_turn:
            return NO_PIN_LAST_TURN
        if not turn.tool_name or ctx.durations.samples == 0:
            if self.pin_unknown:
                return Decision(True, self.ttl_s, "unknown_tool", 0.5)
            return Decision(False, 0.0, "unknown_tool")
        if ctx.durations.observed_mean_s <= self.max_tool_s:
            return Decision(True, self.ttl_s, "pinned", 0.5)
        return Decision(False, 0.0, "tool_too_slow")


class PinForever(PinPolicy):
    """The oracle of the benchmark: every non-final turn stays pinned until the program comes back."""

    name = "pin-forever"
    bounded = False

    def decide(self, turn: Turn, ctx: TurnContext) -> Decision:
        if turn.last_turn:
            return NO_PIN_LAST_TURN
        return Decision(True, math.inf, "forever", 1.0)


@dataclass(frozen=True)
class TTLParams:
    # Recomputing a context cheaper than this is not worth a pin (the worker and ledger bookkeeping).
    min_recompute_s: float = 0.01
    # Seconds of recompute that holding one KV token for one second costs: `idle_price` with free memory
    # (1.8e-7: at the default 0.11 ms/token prefill, a pin held ~10 minutes costs its recompute), plus
    # `pressure_price * rho / (1 - rho)` (3.7e-6: ~30 s at half the budget, ~3.3 s at 90 %).
    idle_price: float = 1.8e-7
    pressure_price: float = 3.7e-6
    max_pressure: float = 0.95
    slack_s: float = 0.1
    slack_frac: float = 0.1
    max_ttl_s: float = 3600.0

    def price(self, pressure: float) -> float:
        rho = min(max(0.0, pressure), self.max_pressure)
        return self.idle_price + self.pressure_price * rho / (1.0 - rho)


class PredictedTTL(PinPolicy):
    """Ours: the TTL that maximises the expected recompute saved minus the memory held (module docstring)."""

    name = "ttl"

    def __init__(self, params: TTLParams | None = None):
        self.params = params if params is not None else TTLParams()

    def candidates(self, durations: DurationQuantiles) -> list[float]:
        p = self.params
        return sorted({min(v * (1 + p.slack_frac) + p.slack_s, p.max_ttl_s) for v in durations.values})

    def gain(self, t: float, turn: Turn, ctx: TurnContext) -> tuple[float, float]:
        """(expected net gain in seconds of recompute, P(the program returns while pinned)) of TTL t."""
        d, p = ctx.durations, min(max(ctx.p_continue, 0.0), 1.0)
        hit = p * d.cdf(t)
        held_s = p * d.expected_min(t) + (1 - p) * t
        return hit * ctx.recompute_s - self.params.price(ctx.pressure) * turn.context_tokens * held_s, hit

    def decide(self, turn: Turn, ctx: TurnContext) -> Decision:
        if turn.last_turn:
            return NO_PIN_LAST_TURN
        if ctx.recompute_s < self.params.min_recompute_s:
            return Decision(False, 0.0, "cheap_context")
        best_t, best_gain, best_hit = 0.0, 0.0, 0.0
        for t in self.candidates(ctx.durations):
            g, hit = self.gain(t, turn, ctx)
            if g > best_gain:
                best_t, best_gain, best_hit = t, g, hit
        if best_t <= 0:
            return Decision(False, 0.0, "not_worth_it")
        return Decision(True, best_t, "ttl", best_hit)

    def keep_score_now(self, keep_score: float, durations: DurationQuantiles | None, p_continue: float,
                       ttl_s: float, elapsed_s: float) -> float:
        """P(the program returns before the pin lapses | it has not returned in `elapsed_s`), by Bayes:
        p * (F(ttl) - F(e)) / ((1 - p) + p * (1 - F(e)))."""
        if durations is None:
            return keep_score
        p = min(max(p_continue, 0.0), 1.0)
        f_e, f_ttl = durations.cdf(elapsed_s), durations.cdf(ttl_s)
        still_out = (1 - p) + p * (1 - f_e)
        return 0.0 if still_out <= 0 else max(0.0, p * (f_ttl - f_e) / still_out)


POLICIES: dict[str, Callable[..., PinPolicy]] = {
    NoPin.name: NoPin,
    FixedTTL.name: FixedTTL,
    PredictedTTL.name: PredictedTTL,
    PinForever.name: PinForever,
}
DEFAULT_POLICY = PredictedTTL.name


def make_policy(name: str, **kwargs) -> PinPolicy:
    """Builds the policy registered under `name`; kwargs the policy does not take are ignored."""
    try:
        factory = POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown pin policy {name!r}; choose from {', '.join(POLICIES)}") from None
    import inspect

    accepted = inspect.signature(factory).parameters
    return factory(**{k: v for k, v in kwargs.items() if k in accepted})
