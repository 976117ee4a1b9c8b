"""The tokenizer the workload is measured in: the served model's, so `prompt_tokens` means what the worker counts.

Only the `tokenizers` library is used (no transformers import): the bench process stays light. A tokenizer is
anything with `encode(text) -> list[int]` and `decode(ids) -> str`.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Protocol, Sequence

REPO = Path(__file__).resolve().parents[1]
EMBEDDED_TOKENIZER = REPO / "worker" / "embedded" / "tokenizer.json"


class Tokenizer(Protocol):
    name: str

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]: ...


class HFTokenizer:
    """A `tokenizers.Tokenizer` (a tokenizer.json file) without special tokens added on encode."""

    def __init__(self, tokenizer, name: str):
        self._tok = tokenizer
        self.name = name

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "HFTokenizer":
        from tokenizers import Tokenizer as _Tokenizer

        return cls(_Tokenizer.from_file(str(path)), name=str(path))

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)


class WordTokenizer:
    """Fallback when no tokenizer file exists: one token per whitespace-separated word. Only an estimate;
    the report says so (params.tokenizer = "approx-words")."""

    name = "approx-words"
    _WORD = re.compile(r"\S+")

    def __init__(self) -> None:
        self._vocab: dict[str, int] = {}
        self._words: list[str] = []

    def _id(self, word: str) -> int:
        if word not in self._vocab:
            self._vocab[word] = len(self._words)
            self._words.append(word)
        return self._vocab[word]

    def encode(self, text: str) -> list[int]:
        return [self._id(w) for w in self._WORD.findall(text)]

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Sequence[int]) -> str:
        return " ".join(self._words[i] for i in ids)


def load_tokenizer(spec: str | None = None, model_dir: str | None = None) -> Tokenizer:
    """`spec`: a tokenizer.json file or a directory holding one, or "approx-words". Default: the tokenizer of
    `model_dir` when given, else the embedded default's; the word approximation only if neither exists."""
    if spec == "approx-words":
        return WordTokenizer()
    candidates = [Path(spec)] if spec else ([Path(model_dir)] if model_dir else [EMBEDDED_TOKENIZER])
    for path in candidates:
        if path.is_dir():
            path = path / "tokenizer.json"
        if path.is_file():
            return HFTokenizer.from_file(path)
        if spec:
            raise FileNotFoundError(f"--tokenizer {spec}: no tokenizer.json there")
    return WordTokenizer()
