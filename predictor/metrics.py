"""Rank-correlation metrics (numpy only)."""

from __future__ import annotations

import numpy as np


def kendall_tau(x, y) -> float:
    """Kendall's tau-b (ties in either variable handled), O(n^2) memory in blocks; fine for n <= ~20k."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    n = len(x)
    if n < 2:
        return float("nan")
    concordant = 0.0
    tx = ty = 0.0  # pairs not tied in x / not tied in y
    block = max(1, 4_000_000 // n)
    for start in range(0, n, block):
        sx = np.sign(x[start:start + block, None] - x[None, :])
        sy = np.sign(y[start:start + block, None] - y[None, :])
        concordant += float((sx * sy).sum())
        tx += float(np.abs(sx).sum())
        ty += float(np.abs(sy).sum())
    if tx == 0 or ty == 0:
        return float("nan")
    return concordant / np.sqrt(tx * ty)


def mean_batch_tau(scores, truth, batch: int = 64, seed: int = 0, rounds: int = 20) -> float:
    """Mean tau over random batches of `batch` items (what a scheduler ranking one queue sees)."""
    scores, truth = np.asarray(scores), np.asarray(truth)
    rng = np.random.default_rng(seed)
    taus = []
    for _ in range(rounds):
        perm = rng.permutation(len(scores))
        for s in range(0, len(perm) - batch + 1, batch):
            idx = perm[s:s + batch]
            t = kendall_tau(scores[idx], truth[idx])
            if not np.isnan(t):
                taus.append(t)
    return float(np.mean(taus)) if taus else float("nan")
