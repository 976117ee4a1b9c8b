"""The request contract that router, worker and tests share: the bounds on a request's fields, the pure rules
on them, and the priority class and its labels. One place, so the two services cannot drift.

Each check raises InvalidField naming the field, e.g. `top_logprobs: must be at most 20`. The router runs
them on every GenerateRequest before anything is queued (router/validation.py adds what only it knows:
prompt bytes, the model's context, the default class). The worker runs the same functions on what reaches
it (worker/engine.py AsyncEngine.check) as invariants, adding its own facts (context, KV budget, vocabulary,
beam bound): internal callers may reach it directly, and a bad value must never reach the engine thread.
"""

from __future__ import annotations

import enum
import math
from typing import Collection, Sequence

from qllm.v1 import common_pb2

# Beam search: gen_len ** length_penalty must stay a finite, non-zero float for any output length.
MAX_ABS_LENGTH_PENALTY = 100.0
# Finished candidates to collect = round(num_beams * patience); past this the search is just max_tokens.
MAX_PATIENCE = 1000.0

# Stop strings: how many, and how long each. The worker holds back up to the longest one's length - 1
# characters of text until they cannot start a match, so a long stop string delays streamed text.
MAX_STOP_STRINGS = 16
MAX_STOP_STRING_CHARS = 256
MAX_STOP_TOKEN_IDS = 64
# Alternatives per generated token (OpenAI's and vLLM's bound).
MAX_TOP_LOGPROBS = 20
# Chat turns in one request (their content also counts against the prompt-bytes limit).
MAX_MESSAGES = 1024
MAX_ROLE_CHARS = 64

INPUT_FIELDS = ("prompt", "messages", "prompt_token_ids")


class InvalidField(ValueError):
    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


class Priority(enum.IntEnum):
    """A request's scheduling class. The values are qllm.v1.Priority's; the labels ("LS", "BE") are what
    metrics, logs, API-key files and the Python client call them."""

    LATENCY_SENSITIVE = common_pb2.PRIORITY_LATENCY_SENSITIVE
    BEST_EFFORT = common_pb2.PRIORITY_BEST_EFFORT

    @property
    def label(self) -> str:
        return "LS" if self is Priority.LATENCY_SENSITIVE else "BE"

    @classmethod
    def from_label(cls, label: str) -> "Priority":
        for priority in cls:
            if priority.label == label:
                return priority
        raise ValueError(f"priority: {label!r} is not one of {', '.join(PRIORITY_LABELS)}")

    @classmethod
    def from_wire(cls, value: int, default: "Priority | None" = None) -> "Priority":
        """A qllm.v1.Priority value as a class; PRIORITY_UNSPECIFIED is `default` (with none, an error)."""
        if value == common_pb2.PRIORITY_UNSPECIFIED and default is not None:
            return default
        try:
            return cls(value)
        except ValueError:
            raise InvalidField("priority", f"must be LATENCY_SENSITIVE or BEST_EFFORT, got {value}") from None


PRIORITY_LABELS = tuple(p.label for p in Priority)


def input_kind(prompt: str, messages: Sequence, prompt_token_ids: Sequence[int]) -> str:
    """Which of prompt, messages, prompt_token_ids a request carries; exactly one must be set."""
    given = [name for name, value in zip(INPUT_FIELDS, (prompt, messages, prompt_token_ids)) if value]
    if not given:
        raise InvalidField("prompt", "must not be empty (give one of prompt, messages, prompt_token_ids)")
    if len(given) > 1:
        raise InvalidField(given[1], f"give exactly one of prompt, messages, prompt_token_ids; got {' and '.join(given)}")
    return given[0]


def check_prompt_token_ids(token_ids: Sequence[int], vocab_size: int) -> None:
    for i, token in enumerate(token_ids):
        if token >= vocab_size:
            raise InvalidField("prompt_token_ids", f"token id {token} at index {i} is outside the model's "
                                                   f"vocabulary (size {vocab_size})")


def check_messages(messages: Sequence) -> int:
    """Roles present and short; returns the content's total UTF-8 size (it counts as prompt bytes)."""
    if len(messages) > MAX_MESSAGES:
        raise InvalidField("messages", f"{len(messages)} messages are more than the maximum of {MAX_MESSAGES}")
    size = 0
    for i, message in enumerate(messages):
        if not message.role.strip():
            raise InvalidField("messages", f"message {i} has no role")
        if len(message.role) > MAX_ROLE_CHARS:
            raise InvalidField("messages", f"message {i}: role is longer than {MAX_ROLE_CHARS} characters")
        size += len(message.content.encode("utf-8"))
    return size


def check_sampling(*, max_tokens: int, temperature: float, top_p: float, num_beams: int, max_beams: int,
                   patience: float, length_penalty: float, stop: Sequence[str], stop_token_ids: Collection[int],
                   logprobs: bool, top_logprobs: int, vocab_size: int | None) -> None:
    """The generation fields, resolved (an unset top_p, patience or length_penalty is its default, 1.0).
    max_beams and vocab_size are the checker's own facts (vocab_size None = not known yet)."""
    if max_tokens < 1:
        raise InvalidField("max_tokens", "must be at least 1")
    if not math.isfinite(temperature) or temperature < 0:
        raise InvalidField("temperature", f"must be a finite number >= 0, got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise InvalidField("top_p", f"must be in (0, 1], got {top_p}")
    if num_beams > max_beams:
        raise InvalidField("num_beams", f"{num_beams} is more than the maximum of {max_beams}")
    if not 0 < patience <= MAX_PATIENCE:
        raise InvalidField("patience", f"must be in (0, {MAX_PATIENCE:g}], got {patience}")
    if not abs(length_penalty) <= MAX_ABS_LENGTH_PENALTY:
        raise InvalidField("length_penalty", f"must be a number in [-{MAX_ABS_LENGTH_PENALTY:g}, "
                                             f"{MAX_ABS_LENGTH_PENALTY:g}], got {length_penalty}")
    if num_beams > 1 and temperature > 0:
        raise InvalidField("temperature", "beam search is deterministic; num_beams > 1 needs temperature 0")
    check_stop(stop, stop_token_ids, vocab_size)
    check_logprobs(logprobs, top_logprobs)
    check_with_beams(num_beams, stop)


def check_stop(stop: Sequence[str], stop_token_ids: Collection[int], vocab_size: int | None) -> None:
    if len(stop) > MAX_STOP_STRINGS:
        raise InvalidField("stop", f"{len(stop)} stop strings are more than the maximum of {MAX_STOP_STRINGS}")
    for i, s in enumerate(stop):
        if not s:
            raise InvalidField("stop", f"stop string {i} is empty")
        if len(s) > MAX_STOP_STRING_CHARS:
            raise InvalidField("stop", f"stop string {i} is {len(s)} characters, more than the limit of "
                                       f"{MAX_STOP_STRING_CHARS}")
    if len(stop_token_ids) > MAX_STOP_TOKEN_IDS:
        raise InvalidField("stop_token_ids", f"{len(stop_token_ids)} ids are more than the maximum of "
                                             f"{MAX_STOP_TOKEN_IDS}")
    if vocab_size is not None:
        for token in stop_token_ids:
            if token >= vocab_size:
                raise InvalidField("stop_token_ids", f"token id {token} is outside the model's vocabulary "
                                                     f"(size {vocab_size})")


def check_logprobs(logprobs: bool, top_logprobs: int) -> None:
    if top_logprobs > MAX_TOP_LOGPROBS:
        raise InvalidField("top_logprobs", f"must be at most {MAX_TOP_LOGPROBS}, got {top_logprobs}")
    if top_logprobs and not logprobs:
        raise InvalidField("top_logprobs", "needs logprobs set")


def check_with_beams(num_beams: int, stop: Sequence[str]) -> None:
    """Beam search scores whole token hypotheses and streams only the best one, at the end: a stop string, a
    cut in the text of one hypothesis, has no meaning there (vLLM's beam search has none either).
    stop_token_ids do: they end a hypothesis as EOS does. Logprobs come with the best hypothesis' tokens."""
    if num_beams > 1 and stop:
        raise InvalidField("stop", "stop strings are not supported with num_beams > 1 (use stop_token_ids, which "
                                   "end a beam hypothesis like EOS)")
