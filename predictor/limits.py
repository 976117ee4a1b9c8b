"""Input limits of the Predictor service, checked before any model work (pure; no grpc)."""

from __future__ import annotations

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

    def check_prompts(self, prompts: list[str], field: str = "prompts") -> None:
        if len(prompts) > self.max_prompts:
            raise InvalidInput(field, f"{len(prompts)} prompts in one call; at most {self.max_prompts}")
        for i, prompt in enumerate(prompts):
            if len(prompt) > self.max_prompt_chars:
                raise InvalidInput(f"{field}[{i}]", f"{len(prompt)} characters; at most {self.max_prompt_chars}")
