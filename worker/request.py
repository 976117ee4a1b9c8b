"""A request as the worker's scheduler sees it: token ids, progress and sampling settings. Pure Python."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from qllm.contract import Priority  # the scheduling class is the request contract's


class Status(enum.Enum):
    WAITING = "waiting"        # not yet admitted, or preempted and waiting to recompute
    RUNNING = "running"        # holds KV blocks and is scheduled every iteration
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    LENGTH = "length"          # max_tokens reached
    STOP = "stop"              # end-of-sequence token, a stop token or a stop string
    CANCELLED = "cancelled"    # the client went away
    ERROR = "error"


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 0.0   # 0 = greedy
    top_p: float = 1.0
    seed: int = 0
    ignore_eos: bool = False
    # Beam search (worker/beam.py) when num_beams > 1: greedy only, tokens arrive when the search ends.
    num_beams: int = 1
    patience: float = 1.0
    length_penalty: float = 1.0
    # Stop strings are matched where text is produced (worker/stop_strings.py), which ends the request early;
    # stop tokens end it here, as it samples them, whatever ignore_eos says (vLLM's semantics).
    stop: tuple[str, ...] = ()
    stop_token_ids: frozenset[int] = frozenset()
    # Log-probability of each sampled token, and of this many most likely alternatives (worker/logprobs.py).
    logprobs: bool = False
    top_logprobs: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


@dataclass
class Request:
    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    priority: Priority = Priority.BEST_EFFORT
    eos_token_ids: frozenset[int] = frozenset()
    arrival_time: float = field(default_factory=time.monotonic)
    # Order key inside a class (the router's predicted rank, or arrival). Lower runs first.
    order_key: float = 0.0
    output_token_ids: list[int] = field(default_factory=list)
    # Tokens whose KV is in the cache (prompt and output alike), as in vLLM V1.
    num_computed_tokens: int = 0
    status: Status = Status.WAITING
    finish_reason: FinishReason | None = None
    num_preemptions: int = 0
    first_scheduled_time: float | None = None
    # A beam-search request's state (worker.beam.BeamSearch); None for everything else.
    beam: object | None = None
    # Agent programs: the program this request is a turn of ("" = none), whether it is the last turn (a
    # non-final turn's KV is pinned when it ends, worker/kv_pins.py), and how many prompt tokens came
    # from the program's pin instead of being computed.
    program_id: str = ""
    last_turn: bool = False
    num_cached_tokens: int = 0
    # The predictor's estimate of the output length in tokens (0 = unknown), from the router's speculative
    # order: what is left of it orders waiting BE work and prices ALISE's victims.
    predicted_output_tokens: int = 0
    # The stop token (sampling.stop_token_ids) the request ended at; None otherwise.
    stop_token_id: int | None = None
    # When its latest token was sampled (the scheduler's clock): what LS decode pacing (qllm) times from.
    last_token_time: float | None = None

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def max_total_tokens(self) -> int:
        return self.num_prompt_tokens + self.sampling.max_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is Status.FINISHED

    @property
    def expected_remaining_tokens(self) -> int:
        """Output tokens still to come: the predicted length less what was generated (re-estimated with every
        token; at least 1 while unfinished), or the max_tokens budget left when no prediction came."""
        left = self.sampling.max_tokens - len(self.output_token_ids)
        if self.predicted_output_tokens:
            return max(1, min(left, self.predicted_output_tokens - len(self.output_token_ids)))
        return max(0, left)

    @property
    def keeps_kv_for_next_turn(self) -> bool:
        """A non-final agent turn that ended normally: its KV is worth keeping for the program's next turn."""
        return (bool(self.program_id) and not self.last_turn and self.beam is None
                and self.finish_reason in (FinishReason.STOP, FinishReason.LENGTH))

    @property
    def is_ls(self) -> bool:
        return self.priority is Priority.LATENCY_SENSITIVE

    def append_token(self, token_id: int) -> None:
        """Records a sampled token and finishes the request when it hits EOS or max_tokens."""
        if self.beam is not None:
            self._beam_step_done(token_id)
            return
        self.output_token_ids.append(token_id)
        if not self.sampling.ignore_eos and token_id in self.eos_token_ids:
            self.finish(FinishReason.STOP)
        elif token_id in self.sampling.stop_token_ids:
            self.stop_token_id = token_id
            self.finish(FinishReason.STOP)
        elif len(self.output_token_ids) >= self.sampling.max_tokens:
            self.finish(FinishReason.LENGTH)

    def _beam_step_done(self, token_id: int) -> None:
        """A beam step ran (the beams live in self.beam; token_id only counts the step): once the search has
        ended, the output becomes the best finished hypothesis."""
        beam = self.beam
        if not beam.done:
            self.output_token_ids.append(token_id)
            return
        best = beam.best()
        self.output_token_ids = list(best.tokens)
        last = best.tokens[-1] if best.tokens else None
        if (best.eos and last in self.sampling.stop_token_ids
                and (self.sampling.ignore_eos or last not in self.eos_token_ids)):
            self.stop_token_id = last
        self.finish(FinishReason.STOP if best.eos else FinishReason.LENGTH)

    def finish(self, reason: FinishReason) -> None:
        self.status = Status.FINISHED
        self.finish_reason = reason
