"""int8 KV quality under pressure (issue 7): greedy tokens of requests whose KV was quantized to int8 and
dequantized, against an unpressured run of the same requests, on the embedded default (CPU).

    .venv/bin/python scripts/measure_kv_tiers.py --requests 256 --out docs/kv_tiers.json

Requests run in groups under a KV budget too small for a group, with the cost model set so every victim is
quantized (host pool off, recompute made expensive, --kv-int8 all); swap runs the same groups as a control
(it must match exactly). Reports the share of quantized requests whose greedy tokens are identical, and
otherwise the position of the first divergent output token.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from worker import kv_tiers  # noqa: E402
from worker.engine_core import EngineConfig, EngineCore  # noqa: E402
from worker.model_loader import load_model  # noqa: E402
from worker.model_runner import ModelRunner  # noqa: E402
from worker.request import Priority, Request, SamplingParams  # noqa: E402

FORCED = dict(prefill_s_per_token=1.0, decode_step_s=0.01, swap_out_bytes_per_s=1e9, swap_in_bytes_per_s=1e9,
              quantize_bytes_per_s=1e9, dequantize_bytes_per_s=1e9)


def run_group(loaded, prompts, n_out, blocks, **cfg):
    runner = ModelRunner(loaded, blocks, 16)
    core = EngineCore(runner, EngineConfig(policy="priority-evict", kv_budget_tokens=blocks * 16, block_size=16,
                                           max_num_batched_tokens=256, admission_output_fraction=0.0, **cfg),
                      lambda outputs: None)
    moved: set[str] = set()
    if core.kv_store is not None:
        kv = core.scheduler.kv
        kv.set_cost_model(kv_tiers.CostModel(block_bytes=kv.cost_model.block_bytes,
                                             int8_block_bytes=kv.cost_model.int8_block_bytes, **FORCED))
        apply = core.kv_store.apply

        def apply_noting(moves):  # which requests had their KV moved away
            moved.update(m.request_id for m in moves if m.kind in ("quantize", "swap_out"))
            apply(moves)
        core.kv_store.apply = apply_noting
    reqs = [Request(f"r{i}", p, SamplingParams(max_tokens=n_out, ignore_eos=True), Priority.BEST_EFFORT,
                    arrival_time=float(i)) for i, p in enumerate(prompts)]
    core.run_to_completion(reqs)
    return [r.output_token_ids for r in reqs], moved, dict(core.scheduler.kv.move_counts)


def first_divergence(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=256)
    p.add_argument("--group", type=int, default=8, help="requests run together under the small budget")
    p.add_argument("--blocks", type=int, default=20, help="KV blocks of 16 tokens for a group")
    p.add_argument("--output-tokens", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the figures as JSON here")
    args = p.parse_args()
    torch.set_num_threads(1)
    loaded = load_model(None)
    rng = random.Random(args.seed)
    vocab = loaded.model.config.vocab_size
    prompts = [[rng.randrange(1, vocab) for _ in range(rng.randint(64, 160))] for _ in range(args.requests)]
    started = time.monotonic()
    rows, moves = [], {"int8": {}, "swap": {}}
    for g in range(0, len(prompts), args.group):
        group = prompts[g:g + args.group]
        ref, _, _ = run_group(loaded, group, args.output_tokens, blocks=1024)
        q, quantized, qc = run_group(loaded, group, args.output_tokens, args.blocks, kv_policy="alise",
                                     kv_int8="all", kv_host_budget_tokens=0)
        s, swapped, sc = run_group(loaded, group, args.output_tokens, args.blocks, kv_policy="alise", kv_int8="off")
        for kind, counts in (("int8", qc), ("swap", sc)):
            for k, v in counts.items():
                moves[kind][k] = moves[kind].get(k, 0) + v
        for i in range(len(group)):
            rid = f"r{i}"
            rows.append({"quantized": rid in quantized, "swapped": rid in swapped,
                         "int8_divergence": first_divergence(q[i], ref[i]),
                         "swap_identical": s[i] == ref[i]})
    quantized = [r for r in rows if r["quantized"]]
    diverged = [r["int8_divergence"] for r in quantized if r["int8_divergence"] is not None]
    swapped = [r for r in rows if r["swapped"]]
    result = {
        "requests": len(rows), "output_tokens": args.output_tokens, "group": args.group,
        "kv_blocks_per_group": args.blocks,
        "int8": {"quantized_requests": len(quantized),
                 "identical": len(quantized) - len(diverged),
                 "identical_share": round((len(quantized) - len(diverged)) / max(1, len(quantized)), 4),
                 "first_divergence_positions": sorted(diverged),
                 "first_divergence_median": statistics.median(diverged) if diverged else None,
                 "moves": moves["int8"]},
        "swap_control": {"swapped_requests": len(swapped),
                         "identical": sum(r["swap_identical"] for r in swapped),
                         "all_requests_identical": all(r["swap_identical"] for r in rows), "moves": moves["swap"]},
        "seconds": round(time.monotonic() - started, 1),
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
