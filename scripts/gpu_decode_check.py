"""On a GPU: the engine's greedy tokens and decode throughput against transformers' generate(), batch 1/8/32.

    python scripts/gpu_decode_check.py --device cuda --out gpu.json

scripts/measure_foundation.py's decode comparison on another device: both run the embedded default (fp32);
tokens/s counts generated tokens over wall time, prefill included, after a warm-up run each. A device
check, not a CI test (CI has no GPU).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from measure_foundation import decode_throughput  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--runs", type=int, default=1, help="timed runs per batch (median)")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    name = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else args.device
    result = {"device": name, "torch": torch.__version__, "runs": []}
    for batch in (1, 8, 32):
        row = decode_throughput(batch, args.tokens, args.prompt_tokens, args.device, args.runs)
        result["runs"].append(row)
        print(json.dumps(row), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
