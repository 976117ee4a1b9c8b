"""Offline BE throughput of the engine for a grid of batch limits: what `--max-num-seqs` and
`--max-num-batched-tokens` should default to on this machine.

  .venv/bin/python scripts/measure_batch_limits.py [--requests 48] [--grid 32x512,64x1024,...] [--rounds 2]

Runs the same requests (real ShareGPT-length-like mix: prompts 256-1024 tokens, outputs 64-256, seeded) through
the real scheduler and model runner (fcfs, embedded default, 1 thread, float32 unless --dtype), once per grid
point per round, the grid's order rotated each round, and prints output tokens/s and the median step time.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch

from worker.engine_core import EngineConfig, EngineCore
from worker.model_loader import load_model
from worker.model_runner import ModelRunner
from worker.request import Request, SamplingParams


def run(loaded, seqs: int, tokens: int, kv_tokens: int, workload) -> tuple[float, float]:
    block_size = 16
    runner = ModelRunner(loaded, kv_tokens // block_size, block_size)
    core = EngineCore(runner, EngineConfig(policy="fcfs", max_num_seqs=seqs, max_num_batched_tokens=tokens,
                                           kv_budget_tokens=kv_tokens, block_size=block_size))
    for i, (prompt, out) in enumerate(workload):
        core.add_request(Request(f"r{i}", prompt, SamplingParams(max_tokens=out, ignore_eos=True)))
    steps = []
    started = time.perf_counter()
    while core.has_unfinished_requests():
        t0 = time.perf_counter()
        core.step()
        steps.append(time.perf_counter() - t0)
    elapsed = time.perf_counter() - started
    return sum(out for _, out in workload) / elapsed, statistics.median(steps)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=48)
    p.add_argument("--grid", default="32x512,64x512,64x1024,128x2048")
    p.add_argument("--kv-budget-tokens", type=int, default=65536)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(1)
    loaded = load_model(None, dtype=args.dtype)
    rng = random.Random(args.seed)
    vocab = loaded.model.config.vocab_size
    workload = [([rng.randrange(1, vocab) for _ in range(rng.randint(256, 1024))], rng.randint(64, 256))
                for _ in range(args.requests)]
    grid = [tuple(int(x) for x in g.split("x")) for g in args.grid.split(",")]
    results: dict[tuple[int, int], list[float]] = {g: [] for g in grid}
    for r in range(args.rounds):
        order = grid[r % len(grid):] + grid[:r % len(grid)]
        for seqs, tokens in order:
            tps, step = run(loaded, seqs, tokens, args.kv_budget_tokens, workload)
            results[(seqs, tokens)].append(tps)
            print(f"round {r} max_num_seqs {seqs:4d} max_num_batched_tokens {tokens:5d}: {tps:7.1f} output tok/s, "
                  f"median step {1000 * step:.1f} ms", flush=True)
    base = statistics.median(results[grid[0]])
    for g, v in results.items():
        print(f"{g[0]}x{g[1]}: median {statistics.median(v):.1f} tok/s ({min(v):.1f}-{max(v):.1f}), "
              f"{statistics.median(v) / base:.2f}x {grid[0][0]}x{grid[0][1]}")


if __name__ == "__main__":
    main()
