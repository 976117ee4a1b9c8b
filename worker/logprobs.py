"""Log-probabilities of sampled tokens, for the requests that ask (vLLM's `logprobs`, OpenAI's `top_logprobs`).

They are the model's own: log_softmax of the step's fp32 logits, before temperature and top_p (vLLM's default
"raw_logprobs"), so they equal log_softmax of transformers' logits for the same sequence. Only the rows of
requests that set `logprobs` are touched; a step where nobody asks costs one look at its requests.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(slots=True)
class TokenLogprobs:
    token_id: int
    logprob: float
    rank: int                                   # 1 = the most likely token
    top: list[tuple[int, float]] = field(default_factory=list)   # (token id, logprob), most likely first


def sampled_logprobs(logits: torch.Tensor, tokens: list[int], scheduled: list) -> dict[str, TokenLogprobs]:
    """logits: [n, vocab] float32, one row per entry of `scheduled` (whose .request.sampling says what is
    asked), tokens: the token sampled from each row. Returns request id -> the sampled token's entry."""
    rows = [j for j, s in enumerate(scheduled) if s.request.sampling.logprobs and s.request.beam is None]
    if not rows:
        return {}
    index = torch.tensor(rows, dtype=torch.long, device=logits.device)
    logprobs = torch.log_softmax(logits.index_select(0, index).float(), dim=-1)
    chosen = torch.tensor([tokens[j] for j in rows], dtype=torch.long, device=logits.device)
    chosen_lp = logprobs.gather(1, chosen[:, None])
    ranks = (logprobs > chosen_lp).sum(dim=-1) + 1
    k = max(scheduled[j].request.sampling.top_logprobs for j in rows)
    top_lp = top_ids = None
    if k:
        top_lp, top_ids = logprobs.topk(k, dim=-1)
        top_lp, top_ids = top_lp.tolist(), top_ids.tolist()
    chosen_lp, ranks = chosen_lp[:, 0].tolist(), ranks.tolist()
    out: dict[str, TokenLogprobs] = {}
    for i, j in enumerate(rows):
        req = scheduled[j].request
        n = req.sampling.top_logprobs
        top = list(zip(top_ids[i][:n], top_lp[i][:n])) if n else []
        out[req.request_id] = TokenLogprobs(tokens[j], chosen_lp[i], ranks[i], top)
    return out
