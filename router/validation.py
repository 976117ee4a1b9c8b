"""The router's validation of a GenerateRequest, field by field, before anything is queued (pure; no gRPC).

The field rules are the shared contract's (qllm/contract.py); this adds what only the router knows: the
prompt's byte limit, the model's context and chat template from the workers' Describe answer, the default
class, and the ids' lengths. Every failure names the field, e.g. `top_p: must be in (0, 1], got 1.5`.
"""

from __future__ import annotations

from dataclasses import dataclass

from qllm.contract import (InvalidField, Priority, check_messages, check_prompt_token_ids, check_sampling,
                           input_kind)
from qllm.v1 import router_pb2

MAX_PROMPT_BYTES = 1 << 20
MAX_ID_CHARS = 256  # request_id, program_id


@dataclass
class Limits:
    max_context: int = 4096
    max_prompt_bytes: int = MAX_PROMPT_BYTES
    max_beams: int = 8
    default_priority: Priority = Priority.BEST_EFFORT
    # From the workers' Describe answer; None / True until one has answered (the worker checks again).
    vocab_size: int | None = None
    has_chat_template: bool = True


def validate(req: router_pb2.GenerateRequest, limits: Limits) -> Priority:
    """Raises InvalidField for the first bad field; returns the request's class."""
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
    if req.max_tokens >= limits.max_context:
        raise InvalidField("max_tokens", f"{req.max_tokens} leaves no room for the prompt in the model "
                                         f"context of {limits.max_context} tokens")
    if kind == "prompt_token_ids" and len(req.prompt_token_ids) + req.max_tokens > limits.max_context:
        raise InvalidField("max_tokens", f"prompt ({len(req.prompt_token_ids)} tokens) + max_tokens "
                                         f"({req.max_tokens}) exceeds the model context ({limits.max_context})")
    check_sampling(max_tokens=req.max_tokens, temperature=req.temperature,
                   top_p=req.top_p if req.HasField("top_p") else 1.0, num_beams=req.num_beams,
                   max_beams=limits.max_beams, patience=req.patience if req.HasField("patience") else 1.0,
                   length_penalty=req.length_penalty if req.HasField("length_penalty") else 1.0, stop=req.stop,
                   stop_token_ids=req.stop_token_ids, logprobs=req.logprobs, top_logprobs=req.top_logprobs,
                   vocab_size=limits.vocab_size)
    priority = Priority.from_wire(req.priority, default=limits.default_priority)
    if req.last_turn and not req.program_id:
        raise InvalidField("last_turn", "is set but program_id is empty")
    if len(req.request_id) > MAX_ID_CHARS:
        raise InvalidField("request_id", f"is longer than {MAX_ID_CHARS} characters")
    if len(req.program_id) > MAX_ID_CHARS:
        raise InvalidField("program_id", f"is longer than {MAX_ID_CHARS} characters")
    return priority


def text_for_prediction(req: router_pb2.GenerateRequest) -> str | None:
    """The text the predictor ranks or estimates a request by: the prompt, or the chat messages' contents;
    None for pre-tokenized input (the router has no tokenizer), which is then served in arrival order."""
    if req.messages:
        return "\n".join(m.content for m in req.messages)
    return req.prompt or None
