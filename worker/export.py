"""`qllm export-model DIR`: write the embedded default model as a standard Hugging Face checkpoint directory.

The directory (config.json, model.safetensors, generation_config.json, tokenizer files) loads with
AutoModelForCausalLM/AutoTokenizer.from_pretrained, with `qllm worker --model DIR`, and with other engines.
"""

from __future__ import annotations

import argparse
import os
import sys


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.description = __doc__.splitlines()[0]
    parser.add_argument("dir", help="output directory (created if missing; files in it are overwritten)")
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "float16", "bfloat16"],
        help="dtype of the saved weights (default: float32, the embedded default's own dtype)",
    )


def run(args: argparse.Namespace) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from worker.model_loader import export_default

    # Building the model is tiny; one thread keeps it polite on shared machines.
    torch.set_num_threads(1)
    try:
        export_default(args.dir, dtype=args.dtype)
    except ValueError as exc:
        print(f"qllm export-model: {exc}", file=sys.stderr)
        return 2
    print(f"wrote the embedded default model ({args.dtype}) to {os.path.abspath(args.dir)}")
    return 0
