"""Profile one engine step of the embedded default: where the time of a decode batch (and a mixed step) goes.

  .venv/bin/python scripts/profile_engine_step.py [--dtype float32] [--decodes 30] [--context 1400]
                                                  [--prefill 512] [--threads 1] [--steps 20] [--top 15]
                                                  [--modules-only] [--no-profile] [--policy fcfs] [--ls]

Builds the real scheduler and model runner, prefills `--decodes` requests of `--context` tokens, then times
`--steps` decode-only steps and as many mixed steps (the decodes plus a `--prefill`-token chunk of a new
request), and prints each kind's median step time and torch.profiler's top ops by self CPU time. With
`--decodes 0` it times prefill-only steps (an idle worker's TTFT step).
--modules-only turns off the native decode stages and MoE experts (worker/native_stages.py, worker/moe.py;
the native decode attention stays), which is how the engine ran before them. --no-profile times the steps
without torch.profiler (its per-op hooks add a few ms to a step of many small ops) and prints no op table.
--policy picks the scheduler and --ls makes the decodes LS requests: `--policy qllm --ls --decodes 1 --context 100
--prefill 0` times the LS-only one-row step an LS stream decodes in under qllm.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile

from worker.engine_core import EngineConfig, EngineCore
from worker.model_loader import load_model
from worker.model_runner import ModelRunner
from worker.request import Priority, Request, SamplingParams


def build(args):
    loaded = load_model(None, device=args.device, dtype=args.dtype)
    block_size = 16
    kv_tokens = (args.decodes + 2) * (args.context + 4 * args.steps + 64) + args.steps * (args.prefill + 64)
    num_blocks = -(-kv_tokens // block_size)
    runner = ModelRunner(loaded, num_blocks, block_size)
    core = EngineCore(runner, EngineConfig(policy=args.policy, max_num_seqs=args.decodes + 2,
                                           max_num_batched_tokens=max(args.prefill, 2048),
                                           kv_budget_tokens=num_blocks * block_size, block_size=block_size))
    vocab = loaded.model.config.vocab_size
    for i in range(args.decodes):
        ids = [(31 * i + 7 * j) % (vocab - 1) + 1 for j in range(args.context)]
        core.add_request(Request(f"d{i}", ids, SamplingParams(max_tokens=3 * args.steps + 16, ignore_eos=True),
                                 Priority.LATENCY_SENSITIVE if args.ls else Priority.BEST_EFFORT))
    while any(r.num_computed_tokens < r.num_prompt_tokens for r in core.scheduler.requests.values()):
        core.step()
    return core, vocab


def step(core):
    """One engine step, timed: scheduling, the model and the update."""
    started = time.perf_counter()
    core.step()
    return time.perf_counter() - started


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--decodes", type=int, default=30)
    p.add_argument("--context", type=int, default=1400)
    p.add_argument("--prefill", type=int, default=512)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--modules-only", action="store_true",
                   help="transformers' modules for every stage (QLLM_NATIVE_STAGES=0 QLLM_NATIVE_MOE=0)")
    p.add_argument("--no-profile", action="store_true", help="step times only, without torch.profiler's overhead")
    p.add_argument("--policy", default="fcfs", help="the scheduler (worker/scheduler): fcfs, priority, qllm, ...")
    p.add_argument("--ls", action="store_true", help="the decodes are LS requests (else BE)")
    args = p.parse_args()
    if args.modules_only:
        os.environ["QLLM_NATIVE_STAGES"] = os.environ["QLLM_NATIVE_MOE"] = "0"
    torch.set_num_threads(args.threads)
    core, vocab = build(args)
    # --decodes 0: prefill-only steps; --prefill 0: decode steps only
    kinds = (("decode",) if args.decodes else ()) + (("mixed",) if args.prefill else ())
    for kind in kinds:
        times = []
        with profile(activities=[ProfilerActivity.CPU]) if not args.no_profile else contextlib.nullcontext() as prof:
            for k in range(args.steps):
                if kind == "mixed":  # a fresh prefill request each step, so every step carries one chunk
                    ids = [(13 * k + j) % (vocab - 1) + 1 for j in range(args.prefill)]
                    core.add_request(Request(f"p{k}", ids, SamplingParams(max_tokens=1, ignore_eos=True)))
                times.append(step(core))
        chunk = f" + a {args.prefill}-token chunk" if kind == "mixed" else ""
        print(f"\n== {kind}: {args.decodes} decodes{chunk}; step median "
              f"{1000 * statistics.median(times):.1f} ms (min {1000 * min(times):.1f}, max {1000 * max(times):.1f})")
        if prof is None:
            continue
        total = sum(e.self_cpu_time_total for e in prof.key_averages())
        print(f"  torch ops: {total / 1000 / len(times):.1f} ms of each step (the rest: Python, native kernel)")
        rows = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:args.top]
        for e in rows:
            print(f"  {100 * e.self_cpu_time_total / total:5.1f}%  {e.count:7d} calls  "
                  f"{e.self_cpu_time_total / max(1, e.count):8.1f} us/call  {e.key}")


if __name__ == "__main__":
    main()
