"""Checks a GenerateRequest field by field before anything is queued (pure; no gRPC calls).

Every failure names the field, so a client sees e.g. `top_p: must be in (0, 1], got 1.5`. Limits that depend
on the model (context length) come from the workers' Describe answer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from qllm.limits import MAX_ABS_LENGTH_PENALTY, MAX_PATIENCE
from qllm.request_checks import (InvalidField, check_logprobs, check_messages, check_prompt_token_ids, check_stop,
                                 check_with_beams, input_kind)
from qllm.v1 import common_pb2, router_pb2

MAX_PROMPT_BYTES = 1 << 20
VALID_PRIORITIES = {common_pb2.PRIORITY_LATENCY_SENSITIVE, common_pb2.PRIORITY_BEST_EFFORT}


__all__ = ["InvalidField", "Limits", "validate", "text_for_prediction"]


@dataclass
class Limits:
    max_context: int = 4096
    max_prompt_bytes: int = MAX_PROMPT_BYTES
    max_beams: int = 8
    default_priority: int = common_pb2.PRIORITY_BEST_EFFORT
    # From the workers' Describe answer; None / True until one has answered (the worker checks again).
    vocab_size: int | None = None
    has_chat_template: bool = True


def validate(req: router_pb2.GenerateRequest, limits: Limits) -> int:
    """Raises InvalidField for the first bad field; returns the request's resolved priority."""
    kind = input_kind(req.prompt, req.messages, req.prompt_token_ids)
    if kind == "prompt":
        if not req.prompt.strip():
            raise InvalidField("prompt", "must not be empty")
        size = len(req.prompt.encode("utf-8"))
        if size > limits.max_prompt_bytes:
            raise InvalidField("prompt", f"is {size} bytes, more than the limit of {limits.max_prompt_bytes}")
    elif kind == "messages":
        if not limits.has_chat_template:
            raise InvalidField("messages", "the served model has no chat template; send prompt or prompt_token_ids")
        size = check_messages(req.messages)
        if size > limits.max_prompt_bytes:
            raise InvalidField("messages", f"content is {size} bytes, more than the limit of "
                                           f"{limits.max_prompt_bytes}")
    else:
        if limits.vocab_size is not None:
            check_prompt_token_ids(req.prompt_token_ids, limits.vocab_size)
    if req.max_tokens == 0:
        raise InvalidField("max_tokens", "must be at least 1")
    if req.max_tokens >= limits.max_context:
        raise InvalidField("max_tokens", f"{req.max_tokens} leaves no room for the prompt in the model "
                                         f"context of {limits.max_context} tokens")
    if kind == "prompt_token_ids" and len(req.prompt_token_ids) + req.max_tokens > limits.max_context:
        raise InvalidField("max_tokens", f"prompt ({len(req.prompt_token_ids)} tokens) + max_tokens "
                                         f"({req.max_tokens}) exceeds the model context ({limits.max_context})")
    if not math.isfinite(req.temperature) or req.temperature < 0:
        raise InvalidField("temperature", f"must be a finite number >= 0, got {req.temperature}")
    if req.HasField("top_p") and not (0.0 < req.top_p <= 1.0):
        raise InvalidField("top_p", f"must be in (0, 1], got {req.top_p}")
    priority = req.priority
    if priority == common_pb2.PRIORITY_UNSPECIFIED:
        priority = limits.default_priority
    elif priority not in VALID_PRIORITIES:
        raise InvalidField("priority", f"unknown value {priority}")
    if req.num_beams > limits.max_beams:
        raise InvalidField("num_beams", f"{req.num_beams} is more than the maximum of {limits.max_beams}")
    if req.HasField("patience") and not (0 < req.patience <= MAX_PATIENCE):
        raise InvalidField("patience", f"must be in (0, {MAX_PATIENCE:g}], got {req.patience}")
    if req.HasField("length_penalty") and not abs(req.length_penalty) <= MAX_ABS_LENGTH_PENALTY:
        raise InvalidField("length_penalty", f"must be a number in [-{MAX_ABS_LENGTH_PENALTY:g}, "
                                             f"{MAX_ABS_LENGTH_PENALTY:g}], got {req.length_penalty}")
    if req.num_beams > 1 and req.temperature > 0:
        raise InvalidField("temperature", "beam search is deterministic; num_beams > 1 needs temperature 0")
    if req.last_turn and not req.program_id:
        raise InvalidField("last_turn", "is set but program_id is empty")
    if len(req.request_id) > 256:
        raise InvalidField("request_id", "is longer than 256 characters")
    if len(req.program_id) > 256:
        raise InvalidField("program_id", "is longer than 256 characters")
    check_stop(req.stop, req.stop_token_ids, limits.vocab_size)
    check_logprobs(req.logprobs, req.top_logprobs)
    check_with_beams(req.num_beams, req.stop)
    return priority


def text_for_prediction(req: router_pb2.GenerateRequest) -> str | None:
    """The text the predictor ranks or estimates a request by: the prompt, or the chat messages' contents;
    None for pre-tokenized input (the router has no tokenizer), which is then served in arrival order."""
    if req.messages:
        return "\n".join(m.content for m in req.messages)
    return req.prompt or None
