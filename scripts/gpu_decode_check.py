"""On a GPU: the engine's greedy tokens and decode throughput against transformers' generate(), batch 1/8/32.

    python scripts/gpu_decode_check.py --device cuda --out gpu.json

Both run the embedded default (fp32) on the same device; tokens/s counts generated tokens over wall time,
prefill included, after one warm-up run each. A device check, not a CI test (CI has no GPU).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from worker.kv_blocks import BlockAllocator  # noqa: E402
from worker.model_loader import build_default_model, load_model  # noqa: E402
from worker.model_runner import ModelRunner  # noqa: E402
from worker.request import Request, SamplingParams  # noqa: E402
from worker.scheduler import SchedulerConfig, make_scheduler  # noqa: E402


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def engine_run(runner, prompts, n_out):
    sched = make_scheduler("fcfs", SchedulerConfig(max_num_seqs=64, max_num_batched_tokens=2048),
                           BlockAllocator(runner.cache.num_blocks, runner.block_size))
    reqs = [Request(f"r{i}", p, SamplingParams(max_tokens=n_out, ignore_eos=True)) for i, p in enumerate(prompts)]
    for r in reqs:
        sched.add_request(r)
    start = time.perf_counter()
    while sched.has_unfinished():
        out = sched.schedule()
        sched.update(out, runner.execute(out))
    sync()
    return time.perf_counter() - start, [r.output_token_ids for r in reqs]


def hf_run(model, prompts, n_out, device):
    start = time.perf_counter()
    ids = torch.tensor(prompts, device=device)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n_out, min_new_tokens=n_out,
                         do_sample=False)
    sync()
    return time.perf_counter() - start, out[:, len(prompts[0]):].tolist()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    loaded = load_model(None, device=args.device)
    runner = ModelRunner(loaded, num_blocks=1024, block_size=16)
    reference = build_default_model().to(args.device)
    vocab = loaded.model.config.vocab_size
    name = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else args.device
    result = {"device": name, "torch": torch.__version__, "runs": []}
    for batch in (1, 8, 32):
        # same-length prompts so generate() needs no padding and both see identical inputs
        prompts = [[(7 * i + 13 * j) % (vocab - 1) + 1 for j in range(args.prompt_tokens)] for i in range(batch)]
        engine_run(runner, prompts, 4)
        hf_run(reference, prompts, 4, args.device)
        e_s, e_tokens = engine_run(runner, prompts, args.tokens)
        h_s, h_tokens = hf_run(reference, prompts, args.tokens, args.device)
        same = sum(a == b for a, b in zip(e_tokens, h_tokens))
        row = {"batch": batch, "engine_tok_s": round(batch * args.tokens / e_s, 1),
               "generate_tok_s": round(batch * args.tokens / h_s, 1), "identical_sequences": same}
        result["runs"].append(row)
        print(json.dumps(row), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
