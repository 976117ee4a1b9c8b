"""Prompt/response-length data for training and evaluating length rankers (shared/data/prompts).

Each source gives (prompt, output length in words). Prompts are deduplicated by their normalised text
(lower case, whitespace collapsed); duplicates keep the median length. The split is by prompt: ShareGPT
prompts are shuffled with a fixed seed into test / val / train, and a prompt of any other source whose
normalised text is in ShareGPT's test or val part is dropped, so no prompt text is on both sides.

Sources: ShareGPT first turns (the target), AlpacaEval (median words over the 227 models), Arena
(median over models), hh-rlhf harmless (multi-turn context as the prompt, mean of the chosen and rejected
reply lengths).
"""

from __future__ import annotations

import csv
import json
import os
import random
import re
import statistics
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

_SPACES = re.compile(r"\s+")


@dataclass(frozen=True)
class Example:
    source: str
    prompt: str
    words: float  # output length in whitespace-separated words

    @property
    def key(self) -> str:
        return normalise(self.prompt)


def normalise(prompt: str) -> str:
    return _SPACES.sub(" ", prompt.strip().lower())


def data_dir() -> Path:
    """shared/data: $QLLM_DATA_DIR, else ../shared/data beside the repo, else /work/shared/data."""
    env = os.environ.get("QLLM_DATA_DIR")
    candidates = [Path(env)] if env else []
    repo = Path(__file__).resolve().parent.parent
    candidates += [repo.parent / "shared" / "data", repo / "shared" / "data", Path("/work/shared/data")]
    for c in candidates:
        if (c / "prompts").is_dir():
            return c
    raise FileNotFoundError("shared/data not found; set QLLM_DATA_DIR")


def _jsonl(path: Path):
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def load_sharegpt(root: Path) -> list[Example]:
    return [Example("sharegpt", r["prompt"], float(r["response_words"]))
            for r in _jsonl(root / "prompts" / "sharegpt_v3_first_turn_pairs.jsonl")]


def load_alpaca(root: Path) -> list[Example]:
    prompts = {r["prompt_id"]: r["instruction"] for r in _jsonl(root / "prompts" / "alpaca_eval_prompts.jsonl")}
    out = []
    with open(root / "prompts" / "alpaca_eval_output_words_wide.csv", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            pid = int(row.pop("prompt_id"))
            vals = [float(v) for v in row.values() if v not in ("", None)]
            if pid in prompts and vals:
                out.append(Example("alpaca", prompts[pid], statistics.median(vals)))
    return out


def load_arena(root: Path) -> list[Example]:
    prompts = {(r["benchmark"], r["uid"]): r["prompt"] for r in _jsonl(root / "prompts" / "arena_prompts.jsonl")}
    lengths: dict[tuple[str, str], list[float]] = defaultdict(list)
    with open(root / "prompts" / "arena_output_lengths.csv", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            if row["answer_words"]:
                lengths[(row["benchmark"], row["uid"])].append(float(row["answer_words"]))
    return [Example("arena", prompts[k], statistics.median(v)) for k, v in lengths.items() if k in prompts]


def format_turns(turns: list[dict]) -> str:
    return "\n\n".join(f"{'User' if t['role'] == 'user' else 'Assistant'}: {t['content']}" for t in turns)


def load_hh(root: Path) -> list[Example]:
    return [Example("hh", format_turns(r["context"]), (r["chosen_words"] + r["rejected_words"]) / 2)
            for r in _jsonl(root / "prompts" / "hh_rlhf_harmless_base_test.jsonl")]


LOADERS = {"sharegpt": load_sharegpt, "alpaca": load_alpaca, "arena": load_arena, "hh": load_hh}


def dedupe(examples: list[Example]) -> list[Example]:
    """One example per (source, normalised prompt), with the median length of its duplicates."""
    groups: dict[tuple[str, str], list[Example]] = defaultdict(list)
    for e in examples:
        if e.prompt.strip():
            groups[(e.source, e.key)].append(e)
    return [Example(g[0].source, g[0].prompt, statistics.median(x.words for x in g)) for g in groups.values()]


@dataclass
class Split:
    train: list[Example]
    val: list[Example]
    test: list[Example]  # ShareGPT only


def split(examples: list[Example], *, seed: int = 0, test_frac: float = 0.15, val_frac: float = 0.10) -> Split:
    examples = dedupe(examples)
    share = sorted((e for e in examples if e.source == "sharegpt"), key=lambda e: e.key)
    random.Random(seed).shuffle(share)
    n_test, n_val = int(len(share) * test_frac), int(len(share) * val_frac)
    test, val, train = share[:n_test], share[n_test:n_test + n_val], share[n_test + n_val:]
    held = {e.key for e in test} | {e.key for e in val}
    train += [e for e in examples if e.source != "sharegpt" and e.key not in held]
    return Split(train=train, val=val, test=test)


def load_split(root: Path | None = None, sources=("sharegpt", "alpaca", "arena", "hh"), seed: int = 0) -> Split:
    root = root or data_dir()
    examples: list[Example] = []
    for name in sources:
        examples += LOADERS[name](root)
    return split(examples, seed=seed)
