"""Pin policies: after a turn of an agent program ends, keep its KV cache pinned on the worker, and for how long?

Continuum's question. The answer depends on the tool the program calls next: a short tool call means the
next turn comes back soon and the pinned KV saves a prefill; a long one means the pin holds memory for
nothing. Each policy answers `decide(turn, tools) -> Decision` and is pure: no clock, no I/O, no grpc.

Policies (`--pin-policy`):
- `no-pin`: never pin (vLLM's behaviour: the KV is freed when the request ends).
- `fixed-ttl`: Continuum's baseline: pin for a fixed TTL (2 s) when the tool's mean observed duration is
  at most that TTL. A tool never seen before is pinned too (the cost is bounded by the TTL) unless
  `pin_unknown=False`.

`ToolDurations` learns per-tool durations online from what the router reports (the gap between a turn's
end and the next turn's arrival), over a bounded window of recent calls.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections import OrderedDict, deque
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
class Decision:
    pin: bool
    ttl_s: float = 0.0
    reason: str = ""


NO_PIN_LAST_TURN = Decision(False, 0.0, "last_turn")


class ToolDurations:
    """Per-tool duration statistics over the last `window` calls of each tool, for at most `max_tools` tools
    (least recently seen tools are forgotten first)."""

    def __init__(self, window: int = 256, max_tools: int = 4096):
        if window < 1 or max_tools < 1:
            raise ValueError("window and max_tools must be >= 1")
        self.window = window
        self.max_tools = max_tools
        self._samples: OrderedDict[str, deque[float]] = OrderedDict()

    def observe(self, tool: str, duration_s: float) -> None:
        if not tool or not math.isfinite(duration_s) or duration_s < 0:
            return
        samples = self._samples.get(tool)
        if samples is None:
            samples = self._samples[tool] = deque(maxlen=self.window)
            if len(self._samples) > self.max_tools:
                self._samples.popitem(last=False)
        else:
            self._samples.move_to_end(tool)
        samples.append(float(duration_s))

    def count(self, tool: str) -> int:
        samples = self._samples.get(tool)
        return len(samples) if samples else 0

    def mean(self, tool: str) -> float | None:
        samples = self._samples.get(tool)
        if not samples:
            return None
        return sum(samples) / len(samples)

    def quantile(self, tool: str, q: float) -> float | None:
        samples = self._samples.get(tool)
        if not samples:
            return None
        ordered = sorted(samples)
        idx = min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))
        return ordered[idx]

    def tools(self) -> list[str]:
        return list(self._samples)


class PinPolicy(ABC):
    name: str = ""

    @abstractmethod
    def decide(self, turn: Turn, tools: ToolDurations) -> Decision:
        """Whether to pin the KV of the turn that just ended, and for how long."""


class NoPin(PinPolicy):
    name = "no-pin"

    def decide(self, turn: Turn, tools: ToolDurations) -> Decision:
        if turn.last_turn:
            return NO_PIN_LAST_TURN
        return Decision(False, 0.0, "policy")


class FixedTTL(PinPolicy):
    """Pin for `ttl_s` when the next tool's mean duration is <= `max_tool_s` (Continuum's fixed-TTL baseline)."""

    name = "fixed-ttl"

    def __init__(self, ttl_s: float = 2.0, max_tool_s: float | None = None, pin_unknown: bool = True):
        if not (ttl_s > 0 and math.isfinite(ttl_s)):
            raise ValueError("ttl_s must be a positive number")
        self.ttl_s = float(ttl_s)
        self.max_tool_s = float(ttl_s if max_tool_s is None else max_tool_s)
        self.pin_unknown = pin_unknown

    def decide(self, turn: Turn, tools: ToolDurations) -> Decision:
        if turn.last_turn:
            return NO_PIN_LAST_TURN
        mean = tools.mean(turn.tool_name) if turn.tool_name else None
        if mean is None:
            if self.pin_unknown:
                return Decision(True, self.ttl_s, "unknown_tool")
            return Decision(False, 0.0, "unknown_tool")
        if mean <= self.max_tool_s:
            return Decision(True, self.ttl_s, "pinned")
        return Decision(False, 0.0, "tool_too_slow")


POLICIES: dict[str, Callable[..., PinPolicy]] = {
    NoPin.name: NoPin,
    FixedTTL.name: FixedTTL,
}
DEFAULT_POLICY = FixedTTL.name


def make_policy(name: str, **kwargs) -> PinPolicy:
    """Builds the policy registered under `name`; kwargs the policy does not take are ignored."""
    try:
        factory = POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown pin policy {name!r}; choose from {', '.join(POLICIES)}") from None
    import inspect

    accepted = inspect.signature(factory).parameters
    return factory(**{k: v for k, v in kwargs.items() if k in accepted})
