"""What one engine step produces: the model runner's result for the scheduler (ModelRunnerOutput), and per
request what the engine streams back (EngineOutput). Pure data."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ModelRunnerOutput:
    # Request id -> the token sampled for it this step (a beam request: a token that only counts the step).
    sampled: dict[str, int] = field(default_factory=dict)
    # Request id -> the sampled token's log-probabilities (worker/logprobs.py), for requests that ask.
    logprobs: dict = field(default_factory=dict)
    # Beam requests: request id -> log-probabilities of its live beams' rows [beams, vocab] (a tensor).
    beam_logprobs: dict = field(default_factory=dict)


@dataclass
class EngineOutput:
    request_id: str
    new_token_ids: list[int]
    finished: bool = False
    finish_reason: str = ""
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    # Prompt tokens whose KV came from the agent program's pin (set from the first output on).
    cached_prompt_tokens: int = 0
    # Beam search only, on the final output: the finished hypotheses, best first, as (token ids, score).
    beams: list[tuple[list[int], float]] | None = None
    # One per new token, for requests that asked for logprobs (worker/logprobs.py).
    logprobs: list | None = None
    # On the final output of a request that ended at one of its stop_token_ids: which.
    stop_token_id: int | None = None
