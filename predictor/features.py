"""Cheap prompt-surface features fed to the ranking head next to the sentence embedding (numpy only).

The encoder only sees the head and tail of a prompt, so these carry what it cannot: the prompt's full size
and shape (length, lines, code-like characters, questions).
"""

from __future__ import annotations

import math
import re

import numpy as np

_CODE_CHARS = re.compile(r"[{}();=<>\[\]#$]")

NAMES = ["log_chars", "log_words", "log_lines", "code_frac", "ends_question", "n_questions", "digit_frac",
         "upper_frac"]


def prompt_features(prompt: str) -> list[float]:
    n = len(prompt)
    words = len(prompt.split())
    lines = prompt.count("\n") + 1
    sample = prompt if n <= 4000 else prompt[:2000] + prompt[-2000:]
    m = max(1, len(sample))
    return [
        math.log1p(n),
        math.log1p(words),
        math.log1p(lines),
        len(_CODE_CHARS.findall(sample)) / m,
        1.0 if prompt.rstrip().endswith("?") else 0.0,
        math.log1p(prompt.count("?")),
        sum(c.isdigit() for c in sample) / m,
        sum(c.isupper() for c in sample) / m,
    ]


def features(prompts: list[str]) -> np.ndarray:
    return np.asarray([prompt_features(p) for p in prompts], dtype=np.float32).reshape(len(prompts), len(NAMES))


# --- lexical part of the trained ranker --------------------------------------------------------------------
# A linear model over hashed word-piece unigrams and bigrams of the same pre-cut text the encoder tokenizes
# (so it costs no extra tokenizing): binary presence, L2-normalised per prompt. It sees all ~130 word pieces
# of the cut text where the encoder sees a 48-token window, and its errors differ from the neural head's;
# blended with it, it adds ~0.01 Kendall tau on held-out ShareGPT (scripts/train_predictor.py's report).

_BIGRAM_A, _BIGRAM_B = 1_000_003, 7


def hashed_ngrams(body: list[int], bits: int) -> np.ndarray:
    """Sorted unique hash buckets (in [0, 2**bits)) of a body's word-piece unigrams and bigrams."""
    size = 1 << bits
    ids = np.asarray(body, dtype=np.int64)
    if len(ids) == 0:
        return np.zeros(0, dtype=np.int64)
    grams = [ids % size]
    if len(ids) > 1:
        grams.append((ids[:-1] * _BIGRAM_A + ids[1:] * _BIGRAM_B + 1) % size)
    return np.unique(np.concatenate(grams))


def ngram_rows(bodies: list[list[int]], bits: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(row, bucket, value) triplets of the L2-normalised binary n-gram matrix [len(bodies), 2**bits]."""
    rows, cols, vals = [], [], []
    for r, body in enumerate(bodies):
        c = hashed_ngrams(body, bits)
        rows.append(np.full(len(c), r, dtype=np.int64))
        cols.append(c)
        vals.append(np.full(len(c), 1.0 / np.sqrt(max(1, len(c))), dtype=np.float64))
    if not rows:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0)
    return np.concatenate(rows), np.concatenate(cols), np.concatenate(vals)


class LexicalScorer:
    """score = bias + sum over a prompt's n-gram buckets of weight[bucket] / sqrt(#buckets)."""

    def __init__(self, weight: np.ndarray, bias: float, bits: int):
        if weight.shape != (1 << bits,):
            raise ValueError(f"lexical weight has shape {weight.shape}, expected ({1 << bits},)")
        self.weight = np.asarray(weight, dtype=np.float64)
        self.bias = float(bias)
        self.bits = bits

    def score(self, bodies: list[list[int]]) -> np.ndarray:
        out = np.full(len(bodies), self.bias)
        for i, body in enumerate(bodies):
            c = hashed_ngrams(body, self.bits)
            if len(c):
                out[i] += self.weight[c].sum() / np.sqrt(len(c))
        return out
