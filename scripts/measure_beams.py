"""Beam search beside greedy traffic: latency and throughput at patience 1, 2, 4, and the KV that sharing the
prompt saves.

  .venv/bin/python scripts/measure_beams.py [--runs 3] [--out docs/beams.json]

One in-process engine (the real core thread and asyncio facade, embedded default, fcfs, torch threads 1).
Each scenario submits at once `--greedy` greedy requests (32-token prompts, 32 new tokens, ignore EOS) and
`--beams` beam requests (32-token prompts, num_beams 4, max_tokens 16), all best-effort; reported are medians
over `--runs` runs of each scenario, the scenarios interleaved run by run. "greedy only" is the same greedy
load with no beams beside it.

EOS: the random-weight embedded model almost never emits its EOS id 0, so every beam would run to max_tokens
and patience would change nothing. The engine's EOS is therefore set to a token this model emits often after
these prompts (found by a probe search, printed), so that candidates finish at varied depths as with a real
model. With `--ignore-eos` the beams run to max_tokens instead (depth = max_tokens, patience irrelevant).

KV: blocks a beam request reserves with the prompt's full blocks shared by all beams (each beam owns a copy
of the partially filled last prompt block plus its generated tokens), against each beam holding its own
copy of the prompt, for several prompt lengths (block size 16, num_beams 4, max_tokens 16). These are the
allocator's figures (tests/worker/test_beam.py checks the allocator reserves exactly this).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import statistics
import time

import torch

from worker import beam as beam_mod
from worker.engine import AsyncEngine, EngineConfig
from worker.model_loader import load_model
from worker.model_runner import ModelRunner
from worker.request import SamplingParams

K, BEAM_TOKENS, GREEDY_TOKENS, PROMPT = 4, 16, 32, 32


def prompt_ids(tokenizer, salt: int, n: int = PROMPT) -> list[int]:
    words = f"request {salt} asks the mixture of experts model a short question about serving ".split()
    ids: list[int] = []
    i = 0
    while len(ids) < n:
        ids += tokenizer.encode(words[i % len(words)] + " ")
        i += 1
    return ids[:n]


async def scenario(engine: AsyncEngine, tokenizer, n_greedy: int, n_beams: int, patience: float | None,
                   ignore_eos: bool, tag: str) -> dict:
    async def one(rid, ids, sp):
        t0 = time.perf_counter()
        first = None
        tokens = 0
        hyps = depth = 0
        async for out in engine.generate(rid, ids, sp):
            if first is None and out.new_token_ids:
                first = time.perf_counter() - t0
            tokens += len(out.new_token_ids)
            if out.beams:
                hyps, depth = len(out.beams), max(len(t) for t, _ in out.beams)
        return rid, time.perf_counter() - t0, first, tokens, hyps, depth

    jobs = []
    for i in range(n_greedy):
        jobs.append(one(f"{tag}-g{i}", prompt_ids(tokenizer, i), SamplingParams(max_tokens=GREEDY_TOKENS,
                                                                                 ignore_eos=True)))
    if patience is not None:
        for i in range(n_beams):
            jobs.append(one(f"{tag}-b{i}", prompt_ids(tokenizer, 100 + i),
                            SamplingParams(max_tokens=BEAM_TOKENS, num_beams=K, patience=patience or 1.0,
                                           ignore_eos=ignore_eos or patience == 0)))
    steps0 = engine.core.num_steps
    t0 = time.perf_counter()
    results = await asyncio.gather(*jobs)
    wall = time.perf_counter() - t0
    greedy = [r for r in results if "-g" in r[0]]
    beams = [r for r in results if "-b" in r[0]]
    out = {"wall_s": wall, "steps": engine.core.num_steps - steps0,
           "greedy_e2e_p50_ms": 1000 * statistics.median(r[1] for r in greedy),
           "greedy_tpot_ms": 1000 * statistics.median((r[1] - r[2]) / max(1, r[3] - 1) for r in greedy),
           "greedy_tok_s": sum(r[3] for r in greedy) / wall}
    if beams:
        last = max(r[1] for r in beams)
        out.update({"beam_e2e_p50_ms": 1000 * statistics.median(r[1] for r in beams),
                    "beam_e2e_max_ms": 1000 * last,
                    "beam_req_s": len(beams) / last,
                    "beam_depth_mean": statistics.mean(r[5] for r in beams),
                    "beam_finished_mean": statistics.mean(r[4] for r in beams),
                    "beam_out_tokens_mean": statistics.mean(r[3] for r in beams)})
    return out


def probe_eos(engine_runner, tokenizer, n_beams: int) -> int:
    """A token the ignore-EOS beam searches of the measured prompts emit often, past their first token."""
    from worker.engine_core import EngineCore
    from worker.request import Request

    core = EngineCore(engine_runner, EngineConfig(kv_budget_tokens=512 * 16, block_size=16))
    reqs = []
    for i in range(n_beams):
        ids = prompt_ids(tokenizer, 100 + i)
        r = Request(f"probe{i}", ids, SamplingParams(max_tokens=BEAM_TOKENS, num_beams=K, ignore_eos=True))
        r.beam = beam_mod.BeamSearch(K, 1.0, 1.0, BEAM_TOKENS, len(ids), 16)
        reqs.append(r)
    core.run_to_completion(reqs)
    counts = collections.Counter(t for r in reqs for h in r.beam.finished for t in h.tokens[1:])
    return counts.most_common(1)[0][0]


def kv_table(block_size: int = 16) -> list[dict]:
    rows = []
    for p in (32, 100, 512, 2000):
        shared = beam_mod.kv_tokens(p, BEAM_TOKENS, K, block_size) // block_size
        copied = beam_mod.kv_tokens_copying_prompt(p, BEAM_TOKENS, K, block_size) // block_size
        rows.append({"prompt_tokens": p, "num_beams": K, "max_tokens": BEAM_TOKENS, "blocks_shared": shared,
                     "blocks_copied": copied, "saved": 1 - shared / copied})
    return rows


async def main_async(args) -> dict:
    torch.set_num_threads(1)
    loaded = load_model(None)
    config = EngineConfig(policy="fcfs", kv_budget_tokens=16384)
    runner = ModelRunner(loaded, config.kv_budget_tokens // config.block_size, config.block_size)
    eos = None if args.ignore_eos else probe_eos(runner, loaded.tokenizer, args.beams)
    engine = AsyncEngine(runner, loaded.tokenizer, [eos] if eos is not None else loaded.eos_token_ids,
                         loaded.max_context, config)
    engine.start()
    names = ["greedy only", "patience 1", "patience 2", "patience 4", "ignore EOS (full depth)"]
    patience = {"greedy only": None, "patience 1": 1.0, "patience 2": 2.0, "patience 4": 4.0,
                "ignore EOS (full depth)": 0}
    samples: dict[str, list[dict]] = {n: [] for n in names}
    try:
        await scenario(engine, loaded.tokenizer, 2, 1, 1.0, args.ignore_eos, "warm")
        for run in range(args.runs):
            for name in names:
                samples[name].append(await scenario(engine, loaded.tokenizer, args.greedy, args.beams,
                                                    patience[name], args.ignore_eos, f"r{run}-{name}"))
    finally:
        engine.stop()
    table = {name: {key: statistics.median(s[key] for s in runs) for key in runs[0]}
             for name, runs in samples.items()}
    return {"eos_token_id": eos, "runs": args.runs, "greedy": args.greedy, "beams": args.beams, "num_beams": K,
            "beam_max_tokens": BEAM_TOKENS, "greedy_max_tokens": GREEDY_TOKENS, "scenarios": table,
            "kv": kv_table()}


def markdown(res: dict) -> str:
    lines = [f"{res['greedy']} greedy requests (32 new tokens) + {res['beams']} beam requests "
             f"(num_beams {res['num_beams']}, max_tokens {res['beam_max_tokens']}), submitted together; "
             f"EOS id {res['eos_token_id']}; medians of {res['runs']} runs.", "",
             "| scenario | beam depth (steps) | finished hyps | best length | beam e2e p50 ms | beam e2e max ms "
             "| beam req/s | greedy e2e p50 ms | greedy TPOT ms | greedy tok/s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, r in res["scenarios"].items():
        b = (f"{r['beam_depth_mean']:.1f} | {r['beam_finished_mean']:.1f} | {r['beam_out_tokens_mean']:.1f} | "
             f"{r['beam_e2e_p50_ms']:.0f} | {r['beam_e2e_max_ms']:.0f} | {r['beam_req_s']:.2f}"
             ) if "beam_e2e_p50_ms" in r else "- | - | - | - | - | -"
        lines.append(f"| {name} | {b} | {r['greedy_e2e_p50_ms']:.0f} | "
                     f"{r['greedy_tpot_ms']:.1f} | {r['greedy_tok_s']:.0f} |")
    lines += ["", "| prompt tokens | beams | max_tokens | blocks, prompt shared | blocks, prompt copied per beam "
              "| saved |", "| --- | --- | --- | --- | --- | --- |"]
    for r in res["kv"]:
        lines.append(f"| {r['prompt_tokens']} | {r['num_beams']} | {r['max_tokens']} | {r['blocks_shared']} | "
                     f"{r['blocks_copied']} | {100 * r['saved']:.0f}% |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--greedy", type=int, default=8)
    parser.add_argument("--beams", type=int, default=4)
    parser.add_argument("--ignore-eos", action="store_true")
    parser.add_argument("--out", default=None, help="also write the figures as JSON here")
    args = parser.parse_args()
    res = asyncio.run(main_async(args))
    print(markdown(res))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
