"""Workload generation (pure: files in, a list of request specs out; no network, no clock).

Arrivals and lengths come from real traces (shared/data/traces); prompt text from real prompts
(shared/data/prompts), cut or extended to the target token count with the served model's tokenizer.

The `chatbot` scenario (build_chatbot_workload) is different: one class, real ShareGPT prompts of the length
ranker's held-out split, each with its own real response length; only the arrivals come from a trace.

Scaling, per class (the `mixed` and `idle-ls` scenarios):
- time: the trace's inter-arrival gaps are multiplied by `trace mean rate / target rate` (burstiness is kept,
  the mean rate is the target), or by `time_scale` when that is given. The window starts at a seeded random
  row of the trace and wraps around at its end.
- lengths: each trace length is multiplied by `geometric middle of the target range / trace median` and
  clipped to the range, so the ordering of lengths (what a length ranker sees) survives, and the median
  lands in the middle of the range. Prompt + output always fit the model's context.
"""

from __future__ import annotations

import csv
import json
import math
import os
import random
from dataclasses import asdict, dataclass, field
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from statistics import median
from typing import Iterator, Sequence

from bench.tokens import REPO, Tokenizer

LS, BE = "LS", "BE"


def data_dir() -> Path:
    """shared/data next to the repository, or $QLLM_SHARED_DATA."""
    env = os.environ.get("QLLM_SHARED_DATA")
    return Path(env) if env else REPO.parent / "shared" / "data"


# ----------------------------------------------------------------------------------------------- traces


@dataclass(frozen=True)
class Trace:
    name: str
    times: tuple[float, ...]  # seconds since the first row, sorted
    inputs: tuple[int, ...]
    outputs: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.times)

    @property
    def span_s(self) -> float:
        return self.times[-1] - self.times[0]

    @property
    def mean_rate(self) -> float:
        return (len(self) - 1) / self.span_s if self.span_s > 0 else float(len(self))


def _azure_seconds(stamp: str) -> float:
    stamp = stamp.strip()
    if "." in stamp:
        head, frac = stamp.split(".", 1)
        stamp = f"{head}.{frac[:6]}"
        return datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S.%f").timestamp()
    return datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S").timestamp()


def _read_azure(path: Path) -> list[tuple[float, int, int]]:
    with open(path, newline="") as f:
        return [(_azure_seconds(r["TIMESTAMP"]), int(r["ContextTokens"]), int(r["GeneratedTokens"]))
                for r in csv.DictReader(f)]


def _read_mooncake(path: Path) -> list[tuple[float, int, int]]:
    rows = []
    with open(path) as f:
        for line in f:
            if line.strip():
                r = json.loads(line)
                rows.append((float(r["timestamp"]) / 1000.0, int(r["input_length"]), int(r["output_length"])))
    return rows


# name -> (file under traces/, reader)
TRACES = {
    "azure-conv": ("azure_llm_2023_conv.csv", _read_azure),
    "azure-code": ("azure_llm_2023_code.csv", _read_azure),
    "mooncake-conv": ("mooncake_conversation_trace.jsonl", _read_mooncake),
    "mooncake-synthetic": ("mooncake_synthetic_trace.jsonl", _read_mooncake),
}


@lru_cache(maxsize=16)
def load_trace(name: str, root: str | None = None) -> Trace:
    if name not in TRACES:
        raise ValueError(f"unknown trace {name!r}; known: {', '.join(sorted(TRACES))}")
    filename, reader = TRACES[name]
    path = Path(root or data_dir()) / "traces" / filename
    if not path.is_file():
        raise FileNotFoundError(f"trace {name}: {path} not found (set QLLM_SHARED_DATA to the shared data folder)")
    rows = sorted(reader(path))
    if len(rows) < 2:
        raise ValueError(f"trace {name}: needs at least two rows, {path} has {len(rows)}")
    t0 = rows[0][0]
    return Trace(name, tuple(r[0] - t0 for r in rows), tuple(r[1] for r in rows), tuple(r[2] for r in rows))


# ----------------------------------------------------------------------------------------------- prompts

# name -> (file under prompts/, text field)
PROMPT_SOURCES = {
    "sharegpt": ("sharegpt_v3_first_turn_pairs.jsonl", "prompt"),
    "arena": ("arena_prompts.jsonl", "prompt"),
    "alpaca": ("alpaca_eval_prompts.jsonl", "instruction"),
}


@lru_cache(maxsize=8)
def load_prompts(source: str, root: str | None = None) -> tuple[str, ...]:
    if source not in PROMPT_SOURCES:
        raise ValueError(f"unknown prompt source {source!r}; known: {', '.join(sorted(PROMPT_SOURCES))}")
    filename, key = PROMPT_SOURCES[source]
    path = Path(root or data_dir()) / "prompts" / filename
    if not path.is_file():
        raise FileNotFoundError(f"prompts {source}: {path} not found (set QLLM_SHARED_DATA to the shared data folder)")
    texts = []
    with open(path) as f:
        for line in f:
            if line.strip():
                text = json.loads(line).get(key)
                if isinstance(text, str) and text.strip():
                    texts.append(text.strip())
    if not texts:
        raise ValueError(f"prompts {source}: {path} holds no prompts")
    return tuple(texts)


class PromptFitter:
    """Produces prompt texts of an exact token count from a seeded walk over real prompts: a text longer than
    the target is cut, a shorter one is extended with the next prompts of the walk."""

    SEP = "\n\n"

    def __init__(self, texts: Sequence[str], tokenizer: Tokenizer, rng: random.Random):
        self.texts = list(texts)
        self.order = list(range(len(self.texts)))
        rng.shuffle(self.order)
        self.pos = 0
        self.tok = tokenizer
        self._cache: dict[int, list[int]] = {}

    def _next_ids(self) -> list[int]:
        i = self.order[self.pos % len(self.order)]
        self.pos += 1
        if i not in self._cache:
            self._cache[i] = self.tok.encode(self.texts[i] + self.SEP)
        return self._cache[i]

    def fit(self, n_tokens: int) -> tuple[str, int]:
        """Returns (text, its token count); the count is n_tokens except where decoding then re-encoding a cut
        changes it (a split multi-byte character); then it is at most n_tokens where that is reachable."""
        ids: list[int] = []
        start = self.pos
        while len(ids) < n_tokens:
            if self.pos - start > len(self.order):
                raise ValueError("the prompt pool holds no tokens")
            ids.extend(self._next_ids())
        ids = ids[:n_tokens]
        text = self.tok.decode(ids)
        count = len(self.tok.encode(text))
        for _ in range(8):
            if count <= n_tokens or len(ids) <= 1:
                break
            ids = ids[:max(1, len(ids) - (count - n_tokens))]
            text = self.tok.decode(ids)
            count = len(self.tok.encode(text))
        return text, count


# ----------------------------------------------------------------------------------------------- workload


@dataclass
class ClassSpec:
    """One traffic class of a workload."""

    name: str  # LS or BE
    trace: str
    rate: float  # requests/s (mean), unless WorkloadConfig.time_scale is set
    prompt_range: tuple[int, int]
    output_range: tuple[int, int]
    prompt_source: str = "sharegpt"


@dataclass
class WorkloadConfig:
    classes: list[ClassSpec]
    duration_s: float
    seed: int = 0
    context_tokens: int = 4096
    time_scale: float | None = None  # multiplies trace gaps; overrides the class rates
    data_root: str | None = None


@dataclass
class RequestSpec:
    index: int
    cls: str
    arrival_s: float  # offset from the start of the run
    prompt: str
    prompt_tokens: int
    max_tokens: int
    trace_input_tokens: int
    trace_output_tokens: int
    response_words: float | None = None  # chatbot: the real response's length in words

    def to_dict(self, with_prompt: bool = False) -> dict:
        d = asdict(self)
        if not with_prompt:
            d.pop("prompt")
        return d


@dataclass
class Workload:
    requests: list[RequestSpec]
    info: dict = field(default_factory=dict)

    def of_class(self, cls: str) -> list[RequestSpec]:
        return [r for r in self.requests if r.cls == cls]


def geometric_middle(lo: int, hi: int) -> float:
    return math.sqrt(lo * hi)


def scale_length(x: int, factor: float, lo: int, hi: int) -> int:
    return int(min(hi, max(lo, round(x * factor))))


def _arrivals(trace: Trace, rng: random.Random, duration_s: float, scale: float) -> Iterator[tuple[float, int]]:
    """(offset in the run, trace row) for a window of the trace starting at a random row, wrapping around."""
    n = len(trace)
    start = rng.randrange(n)
    wrap_gap = trace.span_s / (n - 1)  # one mean gap between the last row and the first again
    offset, i = 0.0, start
    t_start = trace.times[start]
    while True:
        t = (trace.times[i] + offset - t_start) * scale
        if t >= duration_s:
            return
        yield t, i
        i += 1
        if i == n:
            i, offset = 0, offset + trace.span_s + wrap_gap


def build_workload(cfg: WorkloadConfig, tokenizer: Tokenizer) -> Workload:
    """The same config, seed and tokenizer give the same workload, byte for byte."""
    requests: list[RequestSpec] = []
    info: dict = {"seed": cfg.seed, "duration_s": cfg.duration_s, "context_tokens": cfg.context_tokens,
                  "time_scale": cfg.time_scale, "tokenizer": getattr(tokenizer, "name", "?"), "classes": {}}
    for spec in cfg.classes:
        lo_p, hi_p = spec.prompt_range
        lo_o, hi_o = spec.output_range
        if not (1 <= lo_p <= hi_p and 1 <= lo_o <= hi_o):
            raise ValueError(f"{spec.name}: bad length ranges prompt={spec.prompt_range} output={spec.output_range}")
        if lo_p + lo_o > cfg.context_tokens:
            raise ValueError(f"{spec.name}: the shortest prompt + output ({lo_p}+{lo_o}) exceeds the context "
                             f"({cfg.context_tokens} tokens)")
        trace = load_trace(spec.trace, cfg.data_root)
        if cfg.time_scale is not None:
            scale = cfg.time_scale
        elif spec.rate > 0:
            scale = trace.mean_rate / spec.rate
        else:
            continue
        p_factor = geometric_middle(lo_p, hi_p) / max(1.0, median(trace.inputs))
        o_factor = geometric_middle(lo_o, hi_o) / max(1.0, median(trace.outputs))
        rng = random.Random(f"{cfg.seed}/{spec.name}/arrivals")
        fitter = PromptFitter(load_prompts(spec.prompt_source, cfg.data_root), tokenizer,
                              random.Random(f"{cfg.seed}/{spec.name}/prompts"))
        count = 0
        for t, row in _arrivals(trace, rng, cfg.duration_s, scale):
            out = scale_length(trace.outputs[row], o_factor, lo_o, hi_o)
            out = min(out, cfg.context_tokens - lo_p)
            target = min(scale_length(trace.inputs[row], p_factor, lo_p, hi_p), cfg.context_tokens - out)
            prompt, n_tok = fitter.fit(target)
            if n_tok + out > cfg.context_tokens:  # a re-encode grew the cut prompt: shorten the output instead
                out = cfg.context_tokens - n_tok
            requests.append(RequestSpec(0, spec.name, t, prompt, n_tok, out, trace.inputs[row], trace.outputs[row]))
            count += 1
        info["classes"][spec.name] = {
            "trace": spec.trace, "prompt_source": spec.prompt_source, "target_rate": spec.rate,
            "realized_rate": count / cfg.duration_s if cfg.duration_s > 0 else 0.0, "count": count,
            "time_multiplier": scale, "prompt_range": list(spec.prompt_range),
            "output_range": list(spec.output_range), "prompt_scale": p_factor, "output_scale": o_factor,
        }
    requests.sort(key=lambda r: (r.arrival_s, r.cls))
    for i, r in enumerate(requests):
        r.index = i
    for name, ci in info["classes"].items():
        reqs = [r for r in requests if r.cls == name]
        if reqs:
            ci["prompt_tokens_mean"] = sum(r.prompt_tokens for r in reqs) / len(reqs)
            ci["max_tokens_mean"] = sum(r.max_tokens for r in reqs) / len(reqs)
            # the load offered: what the server must sustain to keep up (compare with the measured tok/s)
            ci["offered_prompt_tok_s"] = sum(r.prompt_tokens for r in reqs) / cfg.duration_s
            ci["offered_output_tok_s"] = sum(r.max_tokens for r in reqs) / cfg.duration_s
    return Workload(requests, info)


# ----------------------------------------------------------------------------------------------- chatbot

TOKENS_PER_WORD = 1.3  # ShareGPT response words -> tokens (the usual English rule of thumb)


@dataclass
class ChatbotConfig:
    """The `chatbot` scenario: one class (BE), ShareGPT first turns replayed at Azure conv arrivals.

    Each request is one real prompt of the length ranker's held-out test split (predictor/data.py), whole or
    cut to `max_prompt_tokens` (its head kept), and its output length (`max_tokens`, sent with ignore_eos) is
    that prompt's real response length: `response_words x tokens_per_word x output_scale`, clipped to
    `output_range` and to what the context leaves after the prompt."""

    duration_s: float
    rate: float  # requests/s (mean), unless time_scale is set
    seed: int = 0
    trace: str = "azure-conv"
    max_prompt_tokens: int = 1024
    output_range: tuple[int, int] = (8, 1024)
    output_scale: float = 1.0  # the one global factor on every response length
    tokens_per_word: float = TOKENS_PER_WORD
    context_tokens: int = 4096
    split_seed: int = 0  # predictor/data.py's split seed: the one the shipped ranker was trained with
    time_scale: float | None = None
    data_root: str | None = None


@lru_cache(maxsize=4)
def held_out_prompts(root: str | None = None, split_seed: int = 0) -> tuple:
    """The ranker's held-out ShareGPT test split, as predictor/data.py makes it (Examples: prompt, words).

    `split(load_sharegpt(root)).test` is the same list as `load_split(root).test`: dedupe groups by
    (source, prompt) and the test part is drawn from ShareGPT alone, so the other sources do not change it
    (tests/bench/test_chatbot_scenario.py checks this on the real data)."""
    from predictor.data import load_sharegpt, split

    path = Path(root or data_dir())
    if not (path / "prompts" / PROMPT_SOURCES["sharegpt"][0]).is_file():
        raise FileNotFoundError(f"chatbot: {path / 'prompts' / PROMPT_SOURCES['sharegpt'][0]} not found "
                                "(set QLLM_SHARED_DATA to the shared data folder)")
    test = split(load_sharegpt(path), seed=split_seed).test
    if not test:
        raise ValueError(f"chatbot: the held-out split of {path} is empty")
    return tuple(test)


def response_tokens(words: float, cfg: ChatbotConfig) -> int:
    """A response's length in tokens before the context cap: monotone in `words`, so the order survives."""
    lo, hi = cfg.output_range
    return int(min(hi, max(lo, round(words * cfg.tokens_per_word * cfg.output_scale))))


def cut_prompt(text: str, tokenizer: Tokenizer, max_tokens: int) -> tuple[str, int, int]:
    """(text, its token count, the full text's token count): the text itself when it fits, else its first
    `max_tokens` tokens (shortened further if decoding and re-encoding the cut grows it)."""
    ids = tokenizer.encode(text)
    full = len(ids)
    if full <= max_tokens:
        return text, full, full
    ids = ids[:max_tokens]
    cut = tokenizer.decode(ids)
    count = len(tokenizer.encode(cut))
    for _ in range(8):
        if count <= max_tokens or len(ids) <= 1:
            break
        ids = ids[:max(1, len(ids) - (count - max_tokens))]
        cut = tokenizer.decode(ids)
        count = len(tokenizer.encode(cut))
    return cut, count, full


def build_chatbot_workload(cfg: ChatbotConfig, tokenizer: Tokenizer) -> Workload:
    """The same config, seed and tokenizer give the same workload, byte for byte. Prompts are drawn without
    replacement (a seeded shuffle of the held-out split; it repeats only after every prompt was used)."""
    lo, hi = cfg.output_range
    if not 1 <= lo <= hi:
        raise ValueError(f"chatbot: bad output range {cfg.output_range}")
    if cfg.max_prompt_tokens < 1 or cfg.max_prompt_tokens + lo > cfg.context_tokens:
        raise ValueError(f"chatbot: the longest prompt + shortest output ({cfg.max_prompt_tokens}+{lo}) exceeds "
                         f"the context ({cfg.context_tokens} tokens)")
    if cfg.output_scale <= 0 or cfg.tokens_per_word <= 0:
        raise ValueError("chatbot: output_scale and tokens_per_word must be > 0")
    trace = load_trace(cfg.trace, cfg.data_root)
    pool = held_out_prompts(cfg.data_root, cfg.split_seed)
    info: dict = {"seed": cfg.seed, "duration_s": cfg.duration_s, "context_tokens": cfg.context_tokens,
                  "time_scale": cfg.time_scale, "tokenizer": getattr(tokenizer, "name", "?"), "classes": {}}
    if cfg.time_scale is not None:
        scale = cfg.time_scale
    elif cfg.rate > 0:
        scale = trace.mean_rate / cfg.rate
    else:
        return Workload([], info)
    rng = random.Random(f"{cfg.seed}/chatbot/arrivals")
    order = list(range(len(pool)))
    random.Random(f"{cfg.seed}/chatbot/prompts").shuffle(order)
    requests: list[RequestSpec] = []
    cut = 0
    for k, (t, row) in enumerate(_arrivals(trace, rng, cfg.duration_s, scale)):
        example = pool[order[k % len(order)]]
        prompt, n_tok, full = cut_prompt(example.prompt, tokenizer, cfg.max_prompt_tokens)
        cut += full > n_tok
        out = min(response_tokens(example.words, cfg), cfg.context_tokens - n_tok)
        requests.append(RequestSpec(k, BE, t, prompt, n_tok, out, full,
                                    round(example.words * cfg.tokens_per_word), response_words=example.words))
    count = len(requests)
    info["classes"][BE] = {
        "trace": cfg.trace, "prompt_source": f"sharegpt held-out test split (predictor/data.py, seed "
                                             f"{cfg.split_seed}; {len(pool)} prompts)",
        "target_rate": cfg.rate, "realized_rate": count / cfg.duration_s if cfg.duration_s > 0 else 0.0,
        "count": count, "time_multiplier": scale, "prompt_range": [1, cfg.max_prompt_tokens],
        "output_range": [lo, hi], "tokens_per_word": cfg.tokens_per_word, "output_scale": cfg.output_scale,
        "held_out_prompts": len(pool), "split_seed": cfg.split_seed, "prompts_cut": cut,
        "distinct_prompts": len({order[k % len(order)] for k in range(count)}),
    }
    if requests:
        ci = info["classes"][BE]
        ci["prompt_tokens_mean"] = sum(r.prompt_tokens for r in requests) / count
        ci["max_tokens_mean"] = sum(r.max_tokens for r in requests) / count
        ci["offered_prompt_tok_s"] = sum(r.prompt_tokens for r in requests) / cfg.duration_s
        ci["offered_output_tok_s"] = sum(r.max_tokens for r in requests) / cfg.duration_s
    return Workload(requests, info)
