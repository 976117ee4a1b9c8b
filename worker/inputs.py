"""A request's input as token ids: a prompt (tokenized), chat messages (rendered with the model's chat
template, then tokenized) or token ids (checked against the vocabulary). Exactly one is given.

Chat rendering is Hugging Face's: `apply_chat_template(messages, add_generation_prompt=True)`, whose text
carries the template's own special tokens, so it is encoded without adding any (as transformers does when
it tokenizes a rendered chat), through the same encoder as a prompt.
"""

from __future__ import annotations

from typing import Awaitable, Callable, Sequence

from qllm.contract import InvalidField, check_messages, check_prompt_token_ids, input_kind


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def render_chat(tokenizer, messages: Sequence) -> str:
    """The prompt text of a chat (role/content pairs) under the tokenizer's chat template."""
    if not has_chat_template(tokenizer):
        raise InvalidField("messages", "the served model has no chat template; send prompt or prompt_token_ids")
    return tokenizer.apply_chat_template([{"role": m.role, "content": m.content} for m in messages],
                                         add_generation_prompt=True, tokenize=False)


async def prompt_token_ids(prompt: str, messages: Sequence, token_ids: Sequence[int], tokenizer, vocab_size: int,
                           encode: Callable[[str], Awaitable[list[int]]]) -> list[int]:
    """The token ids a request's input stands for; InvalidField naming the field when it is not usable.
    `encode` tokenizes text without special tokens (worker/tokenize.py: long texts off the event loop)."""
    kind = input_kind(prompt, messages, token_ids)
    if kind == "prompt_token_ids":
        check_prompt_token_ids(token_ids, vocab_size)
        return list(token_ids)
    if kind == "messages":
        check_messages(messages)
        prompt = render_chat(tokenizer, messages)
    return await encode(prompt)
