"""Input limits of the Predictor service, checked before any model work (pure; no grpc)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from qllm.estimators.tool_durations import MAX_DURATION_S

MAX_TOOL_NAME_CHARS = 256
MAX_OBSERVATIONS = 4096  # per ObserveToolCalls call
MAX_QUANTILES = 64  # per PredictToolDuration call


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


# --- the tool-duration RPCs (ObserveToolCalls, PredictToolDuration) --------------------------------------------
def check_observations(calls: list[tuple[str, float]], field: str = "calls") -> None:
    if len(calls) > MAX_OBSERVATIONS:
        raise InvalidInput(field, f"{len(calls)} calls in one report; at most {MAX_OBSERVATIONS}")
    for i, (tool, duration_s) in enumerate(calls):
        check_tool_name(tool, f"{field}[{i}].tool_name", required=True)
        if not math.isfinite(duration_s) or not 0 <= duration_s <= MAX_DURATION_S:
            raise InvalidInput(f"{field}[{i}].duration_s", f"must be a number of seconds in [0, {MAX_DURATION_S:g}]")


def check_tool_name(tool: str, field: str = "tool_name", required: bool = False) -> None:
    if required and not tool:
        raise InvalidInput(field, "must not be empty")
    if len(tool) > MAX_TOOL_NAME_CHARS:
        raise InvalidInput(field, f"longer than {MAX_TOOL_NAME_CHARS} characters")


def check_levels(levels: list[float], field: str = "quantiles") -> None:
    if len(levels) > MAX_QUANTILES:
        raise InvalidInput(field, f"{len(levels)} quantiles; at most {MAX_QUANTILES}")
    for i, q in enumerate(levels):
        if not (math.isfinite(q) and 0 < q < 1):
            raise InvalidInput(f"{field}[{i}]", "must be a probability in (0, 1)")


def check_times(times: list[float], field: str = "within_s") -> None:
    if len(times) > MAX_QUANTILES:
        raise InvalidInput(field, f"{len(times)} times; at most {MAX_QUANTILES}")
    for i, t in enumerate(times):
        if math.isnan(t) or t < 0:
            raise InvalidInput(f"{field}[{i}]", "must be a number of seconds >= 0")
