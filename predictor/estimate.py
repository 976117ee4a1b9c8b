"""Execution-time estimates (ALISE's speculative scheduling), pure: predicted output length from a ranker
score through a calibration, tokens left given what was generated so far, seconds left through the
latency model."""

from __future__ import annotations

from dataclasses import dataclass

from predictor.calibration import Calibration
from qllm.estimators.latency_model import LatencyModel


@dataclass(frozen=True)
class Estimate:
    predicted_output_tokens: int
    remaining_tokens: int
    remaining_s: float


def remaining_tokens(predicted_total: float, generated_so_far: int, max_tokens: int = 0) -> int:
    """Tokens still to come. Past its prediction a request is assumed to run as long again as it has
    so far (the prediction was low; output lengths are heavy-tailed), never past `max_tokens` (0 = no cap)."""
    predicted_total = max(1.0, float(predicted_total))
    generated_so_far = max(0, int(generated_so_far))
    left = predicted_total - generated_so_far
    if left < 1:
        left = max(1.0, float(generated_so_far))
    if max_tokens > 0:
        left = min(left, max(0, max_tokens - generated_so_far))
    return int(round(left))


def estimate(score: float, calibration: Calibration, latency: LatencyModel, *, prompt_tokens: int,
             generated_so_far: int = 0, max_tokens: int = 0, batch_size: int = 1,
             prefill_done: bool = False) -> Estimate:
    predicted = float(calibration(score))
    if max_tokens > 0:
        predicted = min(predicted, float(max_tokens))
    left = remaining_tokens(predicted, generated_so_far, max_tokens)
    seconds = latency.remaining_s(prompt_tokens, left, batch_size, prefill_done or generated_so_far > 0)
    return Estimate(int(round(predicted)), left, seconds)
