"""Foundation figures: the router's TTFT overhead and decode throughput beside transformers' generate().

  .venv/bin/python scripts/measure_foundation.py [--runs 5] [--out docs/foundation.json]

1. TTFT of a 32-token prompt (max_tokens 1) sent through the router vs sent straight to the worker's Serve
   stream, against one local stack (subprocesses, embedded default), interleaved, many samples per run;
   the router's overhead is the difference of medians. Reported: median over `--runs` runs.
2. Decode tokens/s at batch 1, 8 and 32 (32-token prompts, 64 new tokens, greedy, ignore EOS) through the
   engine's scheduler + model runner, beside transformers' generate() on the same weights and batch.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time

import grpc
import torch

from qllm.up import Stack, StackConfig
from qllm.v1 import router_pb2, router_pb2_grpc, worker_pb2, worker_pb2_grpc


def prompt_of(tokenizer, n_tokens: int, salt: int) -> str:
    words = f"request {salt} asks the mixture of experts model a short question about serving ".split()
    text = ""
    while len(tokenizer.encode(text)) < n_tokens:
        text += words[len(text) % len(words)] + " "
    ids = tokenizer.encode(text)[:n_tokens]
    return tokenizer.decode(ids)


async def ttft_samples(stack: Stack, tokenizer, samples: int) -> tuple[list[float], list[float]]:
    router_addr = stack.config.router_address
    worker_addr = [a for n, a, _ in stack.procs if n == "worker0"][0]
    via_router, direct = [], []
    async with grpc.aio.insecure_channel(router_addr) as rch, grpc.aio.insecure_channel(worker_addr) as wch:
        router = router_pb2_grpc.RouterStub(rch)
        worker = worker_pb2_grpc.WorkerStub(wch)
        outgoing: asyncio.Queue = asyncio.Queue()

        async def commands():
            while (cmd := await outgoing.get()) is not None:
                yield cmd

        stream = worker.Serve(commands())
        for i in range(samples + 5):
            prompt = prompt_of(tokenizer, 32, i)
            t0 = time.perf_counter()
            call = router.Generate(router_pb2.GenerateRequest(prompt=prompt, max_tokens=1, ignore_eos=True,
                                                              priority=1))
            await call.read()
            t1 = time.perf_counter()
            while await call.read() is not grpc.aio.EOF:
                pass
            outgoing.put_nowait(worker_pb2.WorkerCommand(submit=worker_pb2.SubmitRequest(
                request_id=f"direct-{i}", prompt=prompt, priority=1,
                sampling=worker_pb2.SamplingParams(max_tokens=1, top_p=1.0, ignore_eos=True))))
            t2 = time.perf_counter()
            while True:
                event = await stream.read()
                if event.tokens.finished:
                    break
            t3 = time.perf_counter()
            if i >= 5:  # warm-up
                via_router.append((t1 - t0) * 1000)
                direct.append((t3 - t2) * 1000)
        outgoing.put_nowait(None)
    return via_router, direct


def decode_throughput(batch: int, new_tokens: int = 64, prompt_len: int = 32, device: str = "cpu",
                      runs: int = 3) -> dict:
    """Engine vs transformers' generate() on the same weights, prompts and device: tokens/s (median of
    `runs` timed runs after a warm-up, prefill included) and how many sequences came out identical."""
    from worker.engine_core import EngineConfig, EngineCore
    from worker.model_loader import build_default_model, load_model
    from worker.model_runner import ModelRunner
    from worker.request import Request, SamplingParams

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    loaded = load_model(None, device=device)
    runner = ModelRunner(loaded, num_blocks=2048, block_size=16)
    prompts = [[(7 * b + j) % 8000 + 3 for j in range(prompt_len)] for b in range(batch)]

    def engine_run() -> tuple[float, list[list[int]]]:
        core = EngineCore(runner, EngineConfig(max_num_seqs=batch, max_num_batched_tokens=4096,
                                               kv_budget_tokens=2048 * 16, block_size=16))
        reqs = [Request(f"r{b}", p, SamplingParams(max_tokens=new_tokens, ignore_eos=True))
                for b, p in enumerate(prompts)]
        t0 = time.perf_counter()
        core.run_to_completion(reqs)
        sync()
        return time.perf_counter() - t0, [r.output_token_ids for r in reqs]

    ref = build_default_model().to(device)
    ids = torch.tensor(prompts, device=device)

    def hf_run() -> tuple[float, list[list[int]]]:
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                               min_new_tokens=new_tokens, do_sample=False)
        sync()
        return time.perf_counter() - t0, out[:, prompt_len:].tolist()

    engine_run(), hf_run()  # warm-up
    engine = [engine_run() for _ in range(runs)]
    hf = [hf_run() for _ in range(runs)]
    e = statistics.median(t for t, _ in engine)
    h = statistics.median(t for t, _ in hf)
    same = sum(a == b for a, b in zip(engine[-1][1], hf[-1][1]))
    return {"batch": batch, "engine_tok_s": batch * new_tokens / e, "hf_generate_tok_s": batch * new_tokens / h,
            "ratio": h / e, "identical_sequences": same}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--samples", type=int, default=40)
    parser.add_argument("--out", default=None)
    parser.add_argument("--skip-decode", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    from worker.model_loader import load_default_tokenizer

    tokenizer = load_default_tokenizer()
    result: dict = {"ttft_runs": []}
    with Stack(StackConfig(port_offset=300, metrics=False, log_dir="/tmp/qllm-measure-logs")) as stack:
        for run in range(args.runs):
            via, direct = asyncio.run(ttft_samples(stack, tokenizer, args.samples))
            r = {"router_p50_ms": statistics.median(via), "worker_p50_ms": statistics.median(direct)}
            r["overhead_p50_ms"] = r["router_p50_ms"] - r["worker_p50_ms"]
            result["ttft_runs"].append(r)
            print(f"run {run}: TTFT via router {r['router_p50_ms']:.2f} ms, direct to worker "
                  f"{r['worker_p50_ms']:.2f} ms, overhead {r['overhead_p50_ms']:.2f} ms", flush=True)
    for key in ("router_p50_ms", "worker_p50_ms", "overhead_p50_ms"):
        result[key] = statistics.median(r[key] for r in result["ttft_runs"])
    print(f"median of {args.runs} runs: router overhead at p50 = {result['overhead_p50_ms']:.2f} ms "
          f"(router {result['router_p50_ms']:.2f} ms vs worker {result['worker_p50_ms']:.2f} ms)")
    if not args.skip_decode:
        result["decode"] = []
        for batch in (1, 8, 32):
            d = decode_throughput(batch)
            result["decode"].append(d)
            print(f"decode batch {batch:2d}: engine {d['engine_tok_s']:.0f} tok/s, transformers generate "
                  f"{d['hf_generate_tok_s']:.0f} tok/s (engine/generate {d['ratio']:.2f}x)", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
