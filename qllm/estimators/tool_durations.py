"""Tool-call durations of agent programs, learned online per tool (Continuum's tool-duration prediction).

Where the data comes from: the router names the tool a program calls after a turn (`tool_name` on the
GenerateRequest; the tool is given by the client, never parsed from the turn's output) and measures the tool
call's duration as the gap between that turn's end and the program's next arrival. The kvmanager forwards
each (tool, duration) here (`ObserveToolCalls`) and asks for the distribution of the next call
(`PredictToolDuration`).

The model, per tool, is an empirical-Bayes posterior predictive (a Dirichlet-process mixture):

    F_tool(t) = (n * F_seen(t) + k * F_base(t)) / (n + k)
    F_base(t) = (m * F_pooled(t) + k0 * F_prior(t)) / (m + k0)

where F_seen is the empirical distribution of the tool's last `window` durations (n of them), F_pooled the
empirical distribution of the last `pooled_window` durations of all tools (m of them), F_prior a fixed wide
log-normal (median 2 s, sigma 1.5: from 0.1 s to 40 s within two sigmas, wide enough for the gaps of the
agent traces in docs/benchmarks.md), k = `tool_prior_weight` and k0 = `pooled_prior_weight` pseudo-samples.
A tool never seen is answered from the pooled distribution of all tools (shrunk toward the fixed prior), a
tool seen a few times mostly from its own durations with the pooled tail behind them, and before anything is
seen at all from the fixed prior. Memory is bounded: `window` samples per tool, `max_tools` tools (the least
recently observed tool is forgotten first), `pooled_window` pooled samples.

Pure: no clock, no I/O, no torch.
"""

from __future__ import annotations

import bisect
import math
from collections import OrderedDict, deque
from dataclasses import dataclass
from statistics import NormalDist

MAX_DURATION_S = 86_400.0  # a day: longer gaps are not tool calls
# The probabilities answered when a caller asks for none: dense in the tail, where pin TTLs are decided.
DEFAULT_LEVELS = tuple(round(0.05 * i, 2) for i in range(1, 20)) + (0.975, 0.99, 0.995, 0.999)

_STD_NORMAL = NormalDist()


class LogNormal:
    """The fixed prior: log(D) ~ Normal(log(median_s), sigma)."""

    def __init__(self, median_s: float = 2.0, sigma: float = 1.5):
        if not (median_s > 0 and sigma > 0 and math.isfinite(median_s) and math.isfinite(sigma)):
            raise ValueError("median_s and sigma must be positive numbers")
        self.mu = math.log(median_s)
        self.sigma = sigma

    def cdf(self, t: float) -> float:
        if t <= 0:
            return 0.0
        if math.isinf(t):
            return 1.0
        return _STD_NORMAL.cdf((math.log(t) - self.mu) / self.sigma)

    def quantile(self, q: float) -> float:
        return math.exp(self.mu + self.sigma * _STD_NORMAL.inv_cdf(min(max(q, 1e-12), 1 - 1e-12)))

    def mean(self) -> float:
        return math.exp(self.mu + self.sigma ** 2 / 2)

    def expected_min(self, t: float) -> float:
        """E[min(D, t)] = E[D; D <= t] + t * P(D > t)."""
        if t <= 0:
            return 0.0
        if math.isinf(t):
            return self.mean()
        z = (math.log(t) - self.mu) / self.sigma
        return self.mean() * _STD_NORMAL.cdf(z - self.sigma) + t * (1.0 - _STD_NORMAL.cdf(z))


class Empirical:
    """The empirical distribution of a window of samples, kept sorted alongside arrival order."""

    def __init__(self, window: int):
        self._arrivals: deque[float] = deque()
        self._sorted: list[float] = []
        self._sum = 0.0
        self.window = window

    def add(self, x: float) -> None:
        if len(self._arrivals) == self.window:
            old = self._arrivals.popleft()
            del self._sorted[bisect.bisect_left(self._sorted, old)]
            self._sum -= old
        self._arrivals.append(x)
        bisect.insort(self._sorted, x)
        self._sum += x

    def __len__(self) -> int:
        return len(self._sorted)

    def cdf(self, t: float) -> float:
        return bisect.bisect_right(self._sorted, t) / len(self._sorted)

    def quantile(self, q: float) -> float:
        """The smallest sample x with F(x) >= q."""
        n = len(self._sorted)
        return self._sorted[min(n - 1, max(0, math.ceil(q * n - 1e-9) - 1))]

    def mean(self) -> float:
        return max(0.0, self._sum / len(self._sorted))

    def at_or_below(self, t: float) -> float | None:
        i = bisect.bisect_right(self._sorted, t)
        return self._sorted[i - 1] if i else None

    def expected_min(self, t: float) -> float:
        i = bisect.bisect_right(self._sorted, t)
        beyond = len(self._sorted) - i
        return (sum(self._sorted[:i]) + (t * beyond if beyond else 0.0)) / len(self._sorted)


class DurationDistribution:
    """A mixture of the components above: what one prediction answers from."""

    def __init__(self, parts: list[tuple[float, LogNormal | Empirical]], samples: int, observed_mean_s: float,
                 pooled_samples: int):
        total = sum(w for w, _ in parts)
        self._parts = [(w / total, c) for w, c in parts if w > 0]
        self.samples = samples  # observations of this tool behind the answer
        self.prior = samples == 0  # answered from the pooled / fixed prior alone
        self.observed_mean_s = observed_mean_s  # mean of the tool's own window (0 when none)
        self.pooled_samples = pooled_samples

    def cdf(self, t: float) -> float:
        """P(duration <= t)."""
        return min(1.0, sum(w * c.cdf(t) for w, c in self._parts))

    def mean(self) -> float:
        return sum(w * c.mean() for w, c in self._parts)

    def expected_min(self, t: float) -> float:
        """E[min(duration, t)]: how long a pin of TTL t is held when the program comes back."""
        return sum(w * c.expected_min(t) for w, c in self._parts)

    def quantile(self, q: float) -> float:
        """The smallest t with P(duration <= t) >= q (to a relative 1e-6): a mixture's quantile lies between
        its components' quantiles, so bisect there."""
        if not 0 < q < 1:
            raise ValueError("q must be in (0, 1)")
        qs = [c.quantile(q) for _, c in self._parts]
        lo, hi = min(qs), max(qs)
        if hi <= lo:
            return hi
        for _ in range(100):
            if hi - lo <= 1e-6 * hi:
                break
            mid = (lo + hi) / 2
            if self.cdf(mid) >= q:
                hi = mid
            else:
                lo = mid
        for _, c in self._parts:  # the answer is a sample exactly when it falls on one
            if isinstance(c, Empirical):
                atom = c.at_or_below(hi)
                if atom is not None and atom >= lo and self.cdf(atom) >= q:
                    hi = atom
        return hi

    def quantiles(self, levels: tuple[float, ...] | list[float] = DEFAULT_LEVELS) -> list[float]:
        # Non-decreasing even where bisection tolerances would leave a hair of disorder.
        out, last = [], 0.0
        for q in levels:
            last = max(last, self.quantile(q))
            out.append(last)
        return out


@dataclass
class _Tool:
    samples: Empirical


class ToolDurationModel:
    def __init__(self, window: int = 256, max_tools: int = 4096, pooled_window: int = 2048,
                 prior: LogNormal | None = None, tool_prior_weight: float = 1.0, pooled_prior_weight: float = 1.0):
        if window < 1 or max_tools < 1 or pooled_window < 1:
            raise ValueError("window, max_tools and pooled_window must be >= 1")
        if not (tool_prior_weight > 0 and pooled_prior_weight > 0):
            raise ValueError("prior weights must be > 0")
        self.window = window
        self.max_tools = max_tools
        self.prior = prior if prior is not None else LogNormal()
        self.tool_prior_weight = tool_prior_weight
        self.pooled_prior_weight = pooled_prior_weight
        self._tools: OrderedDict[str, _Tool] = OrderedDict()
        self._pooled = Empirical(pooled_window)

    def observe(self, tool: str, duration_s: float) -> bool:
        """Learns one call of `tool` that took `duration_s`; False (ignored) for no tool or a bad duration."""
        if not tool or not math.isfinite(duration_s) or not 0 <= duration_s <= MAX_DURATION_S:
            return False
        entry = self._tools.get(tool)
        if entry is None:
            entry = self._tools[tool] = _Tool(Empirical(self.window))
            while len(self._tools) > self.max_tools:
                self._tools.popitem(last=False)
        else:
            self._tools.move_to_end(tool)
        entry.samples.add(float(duration_s))
        self._pooled.add(float(duration_s))
        return True

    def count(self, tool: str) -> int:
        entry = self._tools.get(tool)
        return len(entry.samples) if entry else 0

    def tools(self) -> list[str]:
        return list(self._tools)

    @property
    def pooled_count(self) -> int:
        return len(self._pooled)

    def predict(self, tool: str) -> DurationDistribution:
        """The distribution of the next call of `tool` ("" = an unknown tool)."""
        k0, k = self.pooled_prior_weight, self.tool_prior_weight
        m = len(self._pooled)
        base = [(k0 / (m + k0), self.prior)] + ([(m / (m + k0), self._pooled)] if m else [])
        entry = self._tools.get(tool) if tool else None
        n = len(entry.samples) if entry else 0
        if not n:
            return DurationDistribution(base, 0, 0.0, m)
        parts = [(n / (n + k), entry.samples)] + [(w * k / (n + k), c) for w, c in base]
        return DurationDistribution(parts, n, entry.samples.mean(), m)
