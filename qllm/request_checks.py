"""Checks of the input and output-control fields that router and worker both enforce (pure; one place, so
the two cannot drift). Each raises InvalidField naming the field, e.g. `top_logprobs: must be at most 20`.

The router checks a GenerateRequest before anything is queued; the worker checks what reaches it again,
as it does the sampling fields, since other clients of the Worker service than the router exist (tests,
tools) and a bad value must never reach the engine thread.
"""

from __future__ import annotations

from typing import Sequence

from qllm.limits import (MAX_MESSAGES, MAX_ROLE_CHARS, MAX_STOP_STRING_CHARS, MAX_STOP_STRINGS, MAX_STOP_TOKEN_IDS,
                         MAX_TOP_LOGPROBS)

INPUT_FIELDS = ("prompt", "messages", "prompt_token_ids")


class InvalidField(ValueError):
    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


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


def check_stop(stop: Sequence[str], stop_token_ids: Sequence[int], vocab_size: int | None) -> None:
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
