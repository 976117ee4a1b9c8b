"""The trained ranking head: a small MLP over [standardised embedding layers + prompt features], and the
listwise loss it is trained with (ListMLE, as in vllm-ltr)."""

from __future__ import annotations

import torch
from torch import nn


class RankHead(nn.Module):
    def __init__(self, in_dim: int, hidden: int = 256, dropout: float = 0.1):
        super().__init__()
        self.net = nn.Sequential(
            nn.Dropout(dropout),
            nn.Linear(in_dim, hidden),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(-1)


def listmle_loss(scores: torch.Tensor, lengths: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """ListMLE over lists [B, L]: -log P(true order | scores) under the Plackett-Luce model, where the true
    order puts the longest output first (so larger score = longer). Ties in `lengths` are broken at random."""
    noise = torch.rand(lengths.shape, generator=generator) * 1e-3
    order = torch.argsort(lengths + noise, dim=1, descending=True)
    s = torch.gather(scores, 1, order)
    # log sum_{j >= i} exp(s_j) for every position i
    tail_lse = torch.logcumsumexp(s.flip(1), dim=1).flip(1)
    return (tail_lse - s).sum(1).mean()
