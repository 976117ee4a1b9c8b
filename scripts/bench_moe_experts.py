"""The experts of one layer, native kernel (worker/moe.py) against transformers' grouped_mm, on cold weights.

  .venv/bin/python scripts/bench_moe_experts.py [--rows 1,4,16,32,64] [--experts 8] [--hidden 256]
                                                [--inter 512] [--top-k 2] [--repeats 20]

Shapes default to the embedded model's. Before each call a 20 MB buffer is written, so the experts' weights
come from memory as in a real step (a layer's weights are evicted by the other layers'). Prints the median
time of each path per row count and the largest difference between their outputs. This is how
worker/moe.py's NATIVE_MAX_ROWS was chosen.
"""

from __future__ import annotations

import argparse
import statistics
import time
import types

import torch
from transformers.integrations.moe import grouped_mm_experts_forward

from worker import moe


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", default="1,4,16,32,64")
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--inter", type=int, default=512)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--repeats", type=int, default=20)
    args = p.parse_args()
    torch.set_num_threads(1)
    fn = moe.native_kernel()
    if fn is None:
        raise SystemExit("no native kernel here (no C compiler, or QLLM_NATIVE=0)")
    e, h, i, k = args.experts, args.hidden, args.inter, args.top_k
    experts = types.SimpleNamespace(
        gate_up_proj=torch.randn(e, 2 * i, h) * 0.05, down_proj=torch.randn(e, h, i) * 0.05, num_experts=e,
        has_gate=True, has_bias=False, is_transposed=False, is_concatenated=True, has_post_expert_norm=False,
        _is_expert_parallel=False, act_fn=torch.nn.SiLU())
    experts._apply_gate = lambda gu: torch.nn.functional.silu(gu.chunk(2, -1)[0]) * gu.chunk(2, -1)[1]
    flush = torch.randn(5_000_000)
    for rows in (int(r) for r in args.rows.split(",")):
        x = torch.randn(rows, h)
        ids = torch.stack([torch.randperm(e)[:k] for _ in range(rows)])
        weights = torch.rand(rows, k)
        out = torch.empty_like(x)

        def native():
            fn(x.data_ptr(), ids.data_ptr(), weights.data_ptr(), experts.gate_up_proj.data_ptr(),
               experts.down_proj.data_ptr(), 0, out.data_ptr(), rows, k, h, i, e, 1)
            return out

        def grouped():
            return grouped_mm_experts_forward(experts, x, ids, weights)

        diff = (native() - grouped()).abs().max().item()
        times = {}
        for name, f in (("native", native), ("grouped_mm", grouped)):
            ts = []
            for _ in range(args.repeats):
                flush.add_(1)
                started = time.perf_counter()
                f()
                ts.append(time.perf_counter() - started)
            times[name] = statistics.median(ts) * 1000
        print(f"{rows:4d} rows: native {times['native']:.3f} ms, grouped_mm {times['grouped_mm']:.3f} ms "
              f"({times['grouped_mm'] / times['native']:.2f}x), max |diff| {diff:.2e}")


if __name__ == "__main__":
    main()
