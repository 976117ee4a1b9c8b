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
