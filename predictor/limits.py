"""Input limits of the Predictor service, checked before any model work (pure; no grpc)."""

from __future__ import annotations

import math
from dataclasses import dataclass


class InvalidInput(ValueError):
    """Bad input; `field` names the offending field (the server answers INVALID_ARGUMENT)."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


@dataclass(frozen=True)
class Limits:
    max_prompts: int = 1024  # prompts in one RankLengths call
    max_prompt_chars: int = 100_000  # characters in one prompt
    max_batch_size: int = 65_536  # EstimateRequest.batch_size
    max_latency_samples: int = 4096  # LatencyReport.samples

    def check_prompts(self, prompts: list[str], field: str = "prompts") -> None:
        if len(prompts) > self.max_prompts:
            raise InvalidInput(field, f"{len(prompts)} prompts in one call; at most {self.max_prompts}")
        for i, prompt in enumerate(prompts):
            if len(prompt) > self.max_prompt_chars:
                raise InvalidInput(f"{field}[{i}]", f"{len(prompt)} characters; at most {self.max_prompt_chars}")

    def check_estimate_items(self, prompts: list[str], scores: list[float | None], batch_size: int) -> None:
        """`prompts[i]` / `scores[i]` of EstimateRequest.items (None = no score given)."""
        if len(prompts) > self.max_prompts:
            raise InvalidInput("items", f"{len(prompts)} items in one call; at most {self.max_prompts}")
        for i, (prompt, score) in enumerate(zip(prompts, scores)):
            if len(prompt) > self.max_prompt_chars:
                raise InvalidInput(f"items[{i}].prompt", f"{len(prompt)} characters; at most {self.max_prompt_chars}")
            if score is not None and not math.isfinite(score):
                raise InvalidInput(f"items[{i}].score", "must be a finite number")
        if batch_size > self.max_batch_size:
            raise InvalidInput("batch_size", f"{batch_size}; at most {self.max_batch_size}")

    def check_latency_samples(self, samples: list[tuple[int, float, int, float]]) -> None:
        """(prefill_tokens, prefill_s, decode_batch_size, decode_step_s) of LatencyReport.samples."""
        if len(samples) > self.max_latency_samples:
            raise InvalidInput("samples", f"{len(samples)} samples in one call; at most {self.max_latency_samples}")
        for i, (_, prefill_s, _, decode_s) in enumerate(samples):
            for name, value in (("prefill_s", prefill_s), ("decode_step_s", decode_s)):
                if not math.isfinite(value) or value < 0 or value > 3600:
                    raise InvalidInput(f"samples[{i}].{name}", "must be a number of seconds in [0, 3600]")
