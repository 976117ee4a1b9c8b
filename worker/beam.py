"""Beam search with a patience factor (Kasai et al., "A Call for Clarity in Beam Search"), run inside the
engine's continuous batch.

A beam request is one scheduler request (one admission, one KV reservation, one preemption unit). Its prompt
is prefilled once, like any request; from then on each engine step feeds all its live beams as decode rows
of the same batch as everybody else (so a parked BE step parks its beams too), and `BeamSearch.step` picks
the next beams from the log-probabilities of those rows.

Selection follows Hugging Face's vectorised `_beam_search` (transformers 5.x) exactly: the 2 x num_beams
best continuations over num_beams x vocab; a candidate that hits a stopping criterion (EOS, or max_tokens)
is finished when it ranks among the first num_beams, and is never continued; the first num_beams
non-finished candidates are the next beams. A finished candidate scores
`sum_logprobs / generated_len ** length_penalty` (EOS counted in generated_len). Stopping: the search ends
when it has collected round(num_beams x patience) finished candidates (patience 1 = HF's
`early_stopping=True`; patience 2 keeps searching, at the same breadth, until twice as many have finished),
or when max_tokens is reached, where, as in HF, the first num_beams candidates of that last step are finished.
The answer is the best finished candidate.

KV layout. The request owns one block table (from worker/kv_blocks.py), laid out as

    [ prompt blocks (ceil(P / bs)) | beam 0's region (R blocks) | beam 1's region | ... ]

Every beam reads the prompt's *full* blocks (the first P // bs) in place, shared, never copied. A beam's own
region holds a copy of the partially filled last prompt block (if any) followed by its generated tokens'
KV. When beams are reselected, a region is overwritten with its source beam's region, only the blocks
written so far (HF reorders its whole cache the same way); nothing else moves.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from worker.logprobs import TokenLogprobs


@dataclass
class BeamRow:
    """One live beam as a decode row of a step (duck-types the runner's view of a ScheduledRequest)."""

    request: object
    parent: object                 # the request's ScheduledRequest
    start: int
    block_table: list[int]
    token_ids: list[int]
    num_tokens: int = 1
    samples: bool = True


@dataclass
class Hypothesis:
    tokens: list[int]
    score: float          # sum_logprobs / len ** length_penalty
    sum_logprobs: float
    eos: bool
    # Per token, when the request asked for logprobs (worker/logprobs.py TokenLogprobs).
    logprobs: list = field(default_factory=list)


def finished_target(num_beams: int, patience: float) -> int:
    """round(num_beams x patience), half rounding up, at least 1."""
    return max(1, int(math.floor(num_beams * patience + 0.5)))


def layout_blocks(prompt_len: int, max_tokens: int, num_beams: int, block_size: int) -> tuple[int, int, int]:
    """(shared full prompt blocks, prompt blocks, blocks per beam region)."""
    shared = prompt_len // block_size
    prompt_blocks = -(-prompt_len // block_size)
    region = -(-(prompt_len - shared * block_size + max_tokens) // block_size)
    return shared, prompt_blocks, region


def kv_tokens(prompt_len: int, max_tokens: int, num_beams: int, block_size: int) -> int:
    """KV tokens a beam request reserves: its prompt once plus num_beams regions."""
    _, prompt_blocks, region = layout_blocks(prompt_len, max_tokens, num_beams, block_size)
    return (prompt_blocks + num_beams * region) * block_size


def kv_tokens_copying_prompt(prompt_len: int, max_tokens: int, num_beams: int, block_size: int) -> int:
    """What the same beams would reserve if each held its own copy of the prompt (no sharing)."""
    return num_beams * -(-(prompt_len + max_tokens) // block_size) * block_size


@dataclass
class BeamSearch:
    num_beams: int
    patience: float
    length_penalty: float
    max_tokens: int
    prompt_len: int
    block_size: int
    eos_token_ids: frozenset[int] = frozenset()
    # The request's logprobs / top_logprobs: each hypothesis then carries its tokens' log-probabilities (the
    # model's, as for a sampled token), ranks and alternatives.
    logprobs: bool = False
    top_logprobs: int = 0
    # State, reset on (recompute) preemption.
    beams: list[list[int]] = field(default_factory=list)      # generated tokens of each live beam
    scores: list[float] = field(default_factory=list)         # their sum of log-probabilities
    beam_logprobs: list[list] = field(default_factory=list)   # with logprobs: each live beam's TokenLogprobs
    finished: list[Hypothesis] = field(default_factory=list)
    done: bool = False

    def __post_init__(self):
        self.shared_blocks, self.prompt_blocks, self.region_blocks = layout_blocks(
            self.prompt_len, self.max_tokens, self.num_beams, self.block_size)
        self.target = finished_target(self.num_beams, self.patience)

    @property
    def kv_tokens(self) -> int:
        return (self.prompt_blocks + self.num_beams * self.region_blocks) * self.block_size

    @property
    def started(self) -> bool:
        return bool(self.beams)

    def reset(self) -> None:
        self.beams, self.scores, self.beam_logprobs, self.finished, self.done = [], [], [], [], False

    # --- layout -------------------------------------------------------------------------------------------
    def region(self, table: list[int], slot: int) -> list[int]:
        first = self.prompt_blocks + slot * self.region_blocks
        return table[first:first + self.region_blocks]

    def block_table(self, table: list[int], slot: int) -> list[int]:
        """Beam `slot`'s view: the shared full prompt blocks, then its own region."""
        return table[:self.shared_blocks] + self.region(table, slot)

    def rows(self, scheduled) -> list[BeamRow]:
        table = scheduled.block_table
        return [BeamRow(scheduled.request, scheduled, scheduled.start, self.block_table(table, b), [toks[-1]])
                for b, toks in enumerate(self.beams)]

    # --- selection -----------------------------------------------------------------------------------------
    def step(self, logprobs: torch.Tensor, table: list[int]) -> list[tuple[int, int]]:
        """Advances the search by one token from logprobs [live beams (1 on the first step), vocab].

        Returns the (source, destination) KV block copies the next step needs.
        """
        k = self.num_beams
        first = not self.beams
        prev_len = 0 if first else len(self.beams[0])
        gen_len = prev_len + 1
        if first:
            acc = logprobs[:1]
            beams, scores = [[]], [0.0]
        else:
            beams, scores = self.beams, self.scores
            acc = logprobs + torch.tensor(scores, dtype=logprobs.dtype, device=logprobs.device)[:, None]
        vocab = acc.shape[-1]
        top_lp, top_idx = torch.topk(acc.reshape(-1), k=min(2 * k, acc.numel()))
        at_max = gen_len >= self.max_tokens
        penalty = gen_len ** self.length_penalty
        candidates = [divmod(idx, vocab) for idx in top_idx.tolist()]
        history = self.beam_logprobs or [[]]
        token_logprobs = self._token_logprobs(logprobs, candidates) if self.logprobs else None
        running: list[tuple[float, int, int, int]] = []
        for rank, (lp, (src, tok)) in enumerate(zip(top_lp.tolist(), candidates)):
            eos = tok in self.eos_token_ids
            if eos or at_max:
                if rank < k:
                    self.finished.append(Hypothesis(beams[src] + [tok], lp / penalty, lp, eos,
                                                    history[src] + [token_logprobs[rank]] if token_logprobs else []))
            elif len(running) < k:
                running.append((lp, src, tok, rank))
        self.beams = [beams[src] + [tok] for _, src, tok, _ in running]
        self.scores = [lp for lp, _, _, _ in running]
        if token_logprobs:
            self.beam_logprobs = [history[src] + [token_logprobs[rank]] for _, src, _, rank in running]
        if at_max or len(self.finished) >= self.target or not running:
            self.done = True
            return []
        return self._copies(table, first, [src for _, src, _, _ in running], prev_len)

    def _token_logprobs(self, logprobs: torch.Tensor, candidates: list[tuple[int, int]]) -> list:
        """Each candidate token's log-probability under its beam, its rank there and the beam row's most likely
        tokens (only for requests that ask)."""
        rows = torch.tensor([src for src, _ in candidates], dtype=torch.long, device=logprobs.device)
        toks = torch.tensor([tok for _, tok in candidates], dtype=torch.long, device=logprobs.device)
        chosen = logprobs[rows, toks]
        ranks = ((logprobs[rows] > chosen[:, None]).sum(dim=-1) + 1).tolist()
        tops: list[list] = [[] for _ in candidates]
        if self.top_logprobs:
            top_lp, top_ids = logprobs.topk(self.top_logprobs, dim=-1)
            per_row = [list(zip(i, v)) for i, v in zip(top_ids.tolist(), top_lp.tolist())]
            tops = [per_row[src] for src, _ in candidates]
        return [TokenLogprobs(tok, lp, rank, top)
                for (_, tok), lp, rank, top in zip(candidates, chosen.tolist(), ranks, tops)]

    def _copies(self, table: list[int], first: bool, sources: list[int], prev_len: int) -> list[tuple[int, int]]:
        bs = self.block_size
        if first:
            if self.prompt_len % bs == 0:
                return []
            partial = table[self.shared_blocks]
            return [(partial, self.region(table, slot)[0]) for slot in range(len(sources))]
        # KV written so far in the regions: positions [shared * bs, prompt_len + prev_len).
        used = -(-(self.prompt_len + prev_len - self.shared_blocks * bs) // bs)
        pairs = []
        for slot, src in enumerate(sources):
            if src != slot:
                pairs.extend(zip(self.region(table, src)[:used], self.region(table, slot)[:used]))
        return pairs

    # --- results -------------------------------------------------------------------------------------------
    def ranked(self) -> list[Hypothesis]:
        return sorted(self.finished, key=lambda h: h.score, reverse=True)

    def best(self) -> Hypothesis:
        return max(self.finished, key=lambda h: h.score)


def advance(plan, beam_logprobs: dict) -> tuple[dict[str, int], list[tuple[int, int]]]:
    """Advances each beam request of a finished step by one token from its rows' log-probabilities. Returns
    the token reported per request (it only counts the step) and the KV block copies the next step needs."""
    tokens: dict[str, int] = {}
    copies: list[tuple[int, int]] = []
    for s in plan.scheduled:
        logprobs = beam_logprobs.get(s.request.request_id)
        if logprobs is None:
            continue
        search = s.request.beam
        copies.extend(search.step(logprobs, s.block_table))
        tokens[s.request.request_id] = search.beams[0][-1] if search.beams else 0
    return tokens, copies
