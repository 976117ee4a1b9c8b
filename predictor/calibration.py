"""Score -> output tokens: a monotone (isotonic) mapping fitted on held-out data (numpy only).

A ranker's scores only order prompts; ALISE's time estimate needs a length. Training fits the median
output length (in tokens) as a non-decreasing function of the score with pool-adjacent-violators on
log-lengths, and keeps at most `max_knots` knots; between knots the mapping is linear, beyond them flat.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

WORDS_TO_TOKENS = 1.3  # English BPE tokens per whitespace word (shared/data/README.md)


def isotonic(y: np.ndarray, w: np.ndarray | None = None) -> np.ndarray:
    """Pool-adjacent-violators: the non-decreasing sequence closest to y in weighted least squares."""
    y = np.asarray(y, dtype=np.float64)
    w = np.ones_like(y) if w is None else np.asarray(w, dtype=np.float64)
    vals, weights, counts = [], [], []
    for yi, wi in zip(y, w):
        vals.append(yi)
        weights.append(wi)
        counts.append(1)
        while len(vals) > 1 and vals[-2] > vals[-1]:
            v, wt, c = vals.pop(), weights.pop(), counts.pop()
            total = weights[-1] + wt
            vals[-1] = (vals[-1] * weights[-1] + v * wt) / total
            weights[-1] = total
            counts[-1] += c
    return np.repeat(vals, counts)


@dataclass(frozen=True)
class Calibration:
    scores: tuple[float, ...]
    tokens: tuple[float, ...]

    def __post_init__(self):
        if len(self.scores) != len(self.tokens) or not self.scores:
            raise ValueError("calibration needs as many token values as score knots, at least one")
        if any(b < a for a, b in zip(self.scores, self.scores[1:])) or any(
                b < a for a, b in zip(self.tokens, self.tokens[1:])):
            raise ValueError("calibration knots must be non-decreasing")

    def __call__(self, score: float | np.ndarray) -> float | np.ndarray:
        return np.interp(score, self.scores, self.tokens)

    @classmethod
    def fit(cls, scores, tokens, max_knots: int = 48) -> "Calibration":
        s = np.asarray(scores, dtype=np.float64)
        t = np.log(np.maximum(np.asarray(tokens, dtype=np.float64), 1.0))
        order = np.argsort(s, kind="stable")
        s, t = s[order], t[order]
        fitted = isotonic(t)
        # knots at evenly spaced quantiles of the score
        idx = np.unique(np.linspace(0, len(s) - 1, min(max_knots, len(s))).round().astype(int))
        return cls(tuple(float(x) for x in s[idx]), tuple(float(np.exp(v)) for v in np.maximum.accumulate(fitted[idx])))

    @classmethod
    def constant(cls, tokens: float) -> "Calibration":
        return cls((0.0,), (float(tokens),))

    def to_dict(self) -> dict:
        return {"scores": list(self.scores), "tokens": list(self.tokens)}

    @classmethod
    def from_dict(cls, d: dict) -> "Calibration":
        return cls(tuple(d["scores"]), tuple(d["tokens"]))


# ShareGPT's median reply (178 words) when no fitted calibration is available.
DEFAULT = Calibration.constant(178 * WORDS_TO_TOKENS)
