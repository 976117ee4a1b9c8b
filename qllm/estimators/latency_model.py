"""Latency model for execution-time estimates (ALISE): prefill seconds vs prompt tokens, and seconds per
decode step vs batch size, each a line `a + b * x` that starts from a profiled default and follows live
measurements the worker reports (exponentially weighted least squares). Pure: no clock, no torch.

The defaults are the embedded model's profile on CPU (docs/benchmarks.md, "Sizing on these machines"); live
reports replace them as they come.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


class EwmaLine:
    """y = a + b*x by exponentially weighted least squares. `alpha` is the weight of the newest sample.
    The prior line counts as `prior_weight` samples at `prior_xs`, decaying like data but never below
    `min_prior` times the data's weight, so one x value seen over and over cannot make the slope undefined."""

    def __init__(self, a: float, b: float, prior_xs: tuple[float, float], alpha: float = 0.05,
                 prior_weight: float = 5.0, min_prior: float = 1e-3):
        if not 0 < alpha <= 1:
            raise ValueError("alpha must be in (0, 1]")
        self.prior = (a, b)
        self.prior_xs = prior_xs
        self.alpha = alpha
        self.min_prior = min_prior
        self._prior_w = prior_weight
        self._s = [0.0] * 5  # decayed sums of w, wx, wy, wxx, wxy (data only)
        self.samples = 0
        self.a, self.b = a, b

    def observe(self, x: float, y: float) -> None:
        if not (math.isfinite(x) and math.isfinite(y)) or x < 0 or y < 0:
            return
        keep = 1.0 - self.alpha
        self._s = [v * keep for v in self._s]
        for i, v in enumerate((1.0, x, y, x * x, x * y)):
            self._s[i] += v
        self._prior_w = max(self._prior_w * keep, self.min_prior * self._s[0])
        self.samples += 1
        self._solve()

    def _solve(self) -> None:
        w, sx, sy, sxx, sxy = self._s
        a0, b0 = self.prior
        for px in self.prior_xs:  # add the prior's pseudo-samples
            py = a0 + b0 * px
            pw = self._prior_w / len(self.prior_xs)
            w, sx, sy, sxx, sxy = w + pw, sx + pw * px, sy + pw * py, sxx + pw * px * px, sxy + pw * px * py
        det = w * sxx - sx * sx
        if det <= 1e-12:
            return
        b = (w * sxy - sx * sy) / det
        a = (sy - b * sx) / w
        self.b = max(b, 0.0)
        self.a = max(a if b >= 0 else sy / w - self.b * sx / w, 0.0)

    def __call__(self, x: float) -> float:
        return self.a + self.b * x


@dataclass
class LatencyState:
    prefill_fixed_s: float
    prefill_s_per_token: float
    decode_base_s: float
    decode_per_seq_s: float
    prefill_samples: int
    decode_samples: int


class LatencyModel:
    def __init__(self, prefill_fixed_s: float = 0.002, prefill_s_per_token: float = 1.1e-4,
                 decode_base_s: float = 0.0041, decode_per_seq_s: float = 0.0009, alpha: float = 0.05):
        self.prefill = EwmaLine(prefill_fixed_s, prefill_s_per_token, (64.0, 1024.0), alpha)
        self.decode = EwmaLine(decode_base_s, decode_per_seq_s, (1.0, 32.0), alpha)

    def prefill_s(self, prompt_tokens: int) -> float:
        return self.prefill(max(0, prompt_tokens)) if prompt_tokens > 0 else 0.0

    def decode_step_s(self, batch_size: int) -> float:
        return self.decode(max(1, batch_size))

    def observe_prefill(self, tokens: int, seconds: float) -> None:
        self.prefill.observe(float(tokens), float(seconds))

    def observe_decode_step(self, batch_size: int, seconds: float) -> None:
        self.decode.observe(float(max(1, batch_size)), float(seconds))

    def remaining_s(self, prompt_tokens: int, remaining_tokens: int, batch_size: int = 1,
                    prefill_done: bool = False) -> float:
        """Seconds until a request finishes: its prefill (unless done) plus one decode step per token left."""
        prefill = 0.0 if prefill_done else self.prefill_s(prompt_tokens)
        return prefill + max(0, remaining_tokens) * self.decode_step_s(batch_size)

    def state(self) -> LatencyState:
        return LatencyState(self.prefill.a, self.prefill.b, self.decode.a, self.decode.b,
                            self.prefill.samples, self.decode.samples)
