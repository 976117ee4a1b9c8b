"""How much can a BE order gain on the chatbot workload? A queueing simulation, no model, no services.

    .venv/bin/python scripts/simulate_be_orders.py --batch 1,4,8,32 --load 1.3,2.0,3.0 --window 60,300

One worker whose decode step takes `base + per_seq x batch` seconds (measured here on the embedded
default: 5.5 ms + 1.8 ms x batch), Poisson arrivals at `load` x its capacity for `window` seconds, then
drained; the router releases up to `batch` requests in the order's choice (arrival, ltr, oracle). Output
lengths are the ranker's held-out ShareGPT test split (response words x 1.3, clipped 8:1024, as the chatbot
scenario sends them); `ltr` scores are log length plus Gaussian noise of `--noise` (printed as Kendall tau).
Prints mean E2E ratios per configuration, averaged over `--repeats` seeds (docs/benchmarks.md, chatbot).
"""

from __future__ import annotations

import argparse
import heapq
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from predictor.data import load_split  # noqa: E402
from predictor.metrics import kendall_tau  # noqa: E402


def simulate(lengths, keys, arrivals, batch, base, per_seq) -> np.ndarray:
    """E2E of each request: queue in `keys` order (lowest first), at most `batch` decoding at once."""
    n, t, i = len(lengths), 0.0, 0
    queue: list = []
    running: dict[int, int] = {}
    done = np.zeros(n)
    while i < n or queue or running:
        while i < n and arrivals[i] <= t:
            heapq.heappush(queue, (keys[i], i))
            i += 1
        while queue and len(running) < batch:
            _, j = heapq.heappop(queue)
            running[j] = lengths[j]
        if not running:
            t = arrivals[i]
            continue
        t += base + per_seq * len(running)
        for j in list(running):
            running[j] -= 1
            if running[j] == 0:
                done[j] = t
                del running[j]
    return done - arrivals


def floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",")]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", default="8", help="max_num_seqs values, comma-separated")
    p.add_argument("--load", default="1.3,2.0", help="offered load, x capacity")
    p.add_argument("--window", default="60", help="arrival window, seconds")
    p.add_argument("--noise", type=float, default=1.0, help="ltr score noise (log-length units)")
    p.add_argument("--base", type=float, default=5.5e-3)
    p.add_argument("--per-seq", type=float, default=1.8e-3)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    words = np.array([e.words for e in load_split().test], dtype=float)
    all_lengths = np.clip(np.round(words * 1.3), 8, 1024).astype(int)
    rng = np.random.default_rng(args.seed)
    for batch in (int(b) for b in floats(args.batch)):
        capacity = batch / (all_lengths.mean() * (args.base + args.per_seq * batch))  # requests/s
        for load in floats(args.load):
            for window in floats(args.window):
                ratios, taus = [], []
                for _ in range(args.repeats):
                    n = rng.poisson(load * capacity * window)
                    lengths = all_lengths[rng.choice(len(all_lengths), n)]
                    arrivals = np.sort(rng.uniform(0, window, n))
                    scores = np.log(lengths) + rng.normal(0, args.noise, n)
                    mean = {name: simulate(lengths, keys, arrivals, batch, args.base, args.per_seq).mean()
                            for name, keys in (("arrival", np.arange(n)), ("ltr", scores), ("oracle", lengths))}
                    ratios.append((mean["arrival"] / mean["ltr"], mean["arrival"] / mean["oracle"],
                                   mean["ltr"] / mean["oracle"]))
                    taus.append(kendall_tau(scores, lengths))
                r = np.mean(ratios, axis=0)
                print(f"max_num_seqs {batch} capacity {capacity:.2f}/s load {load} window {window:g}s: "
                      f"arrival/ltr {r[0]:.2f} arrival/oracle {r[1]:.2f} ltr/oracle {r[2]:.2f} "
                      f"(ltr tau {np.mean(taus):.2f})", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
