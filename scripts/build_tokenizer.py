#!/usr/bin/env python3
"""Train the embedded default model's tokenizer (byte-level BPE, 8192 tokens) and write it to worker/embedded/.

Reproducible by construction: a fixed list of corpus files read in file order, line order and field order,
a fixed trainer configuration, and a single-threaded trainer (HF `tokenizers` breaks ties between equally
frequent pairs deterministically, so the result does not depend on the thread count either; one thread just
keeps it polite on shared machines). The corpus is read from `<repo>/../shared/data/prompts` (or `--data`)
and never copied into the repo; only the trained tokenizer files are written.

    .venv/bin/python scripts/build_tokenizer.py            # what `make tokenizer` runs
    .venv/bin/python scripts/build_tokenizer.py --check    # rebuild in memory, fail if it differs from the shipped file
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

# Must be set before `tokenizers` starts its thread pool.
os.environ.setdefault("RAYON_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DATA = REPO.parent / "shared" / "data" / "prompts"
DEFAULT_OUT = REPO / "worker" / "embedded"

VOCAB_SIZE = 8192  # including the special tokens
MIN_FREQUENCY = 2
EOS_TOKEN = "<|endoftext|>"  # end of text; also the padding token
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = [EOS_TOKEN, IM_START, IM_END]  # ids 0, 1, 2 (the trainer puts them first, in this order)
MODEL_MAX_LENGTH = 4096  # = max_position_embeddings of worker/embedded/config.json

# ChatML, the format Qwen models use; the im_start/im_end special tokens exist for it.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# (file, fields whose string values are training text). Order matters for reproducibility.
CORPUS: list[tuple[str, tuple[str, ...]]] = [
    ("sharegpt_v3_first_turn_pairs.jsonl", ("prompt", "response")),
    ("alpaca_eval_prompts.jsonl", ("instruction",)),
    ("alpaca_eval_outputs_text.jsonl", ("output",)),
]


def iter_corpus(data_dir: Path) -> Iterator[str]:
    for name, fields in CORPUS:
        path = data_dir / name
        with path.open(encoding="utf-8") as f:
            for line in f:
                line = line.strip()
                if not line:
                    continue
                record = json.loads(line)
                for field in fields:
                    value = record.get(field)
                    if isinstance(value, str) and value:
                        yield value


def train(data_dir: Path) -> Tokenizer:
    missing = [name for name, _ in CORPUS if not (data_dir / name).is_file()]
    if missing:
        raise SystemExit(f"build_tokenizer: corpus files missing under {data_dir}: {', '.join(missing)}")
    tokenizer = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=MIN_FREQUENCY,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: any text is encodable
        show_progress=False,
    )
    tokenizer.train_from_iterator(iter_corpus(data_dir), trainer=trainer)
    actual = tokenizer.get_vocab_size(with_added_tokens=True)
    if actual != VOCAB_SIZE:
        raise SystemExit(f"build_tokenizer: trained vocab has {actual} tokens, expected {VOCAB_SIZE}")
    for i, tok in enumerate(SPECIAL_TOKENS):
        if tokenizer.token_to_id(tok) != i:
            raise SystemExit(f"build_tokenizer: special token {tok} got id {tokenizer.token_to_id(tok)}, expected {i}")
    return tokenizer


def tokenizer_config() -> dict:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": MODEL_MAX_LENGTH,
        "bos_token": None,  # like Qwen: no BOS is prepended; config.bos_token_id still names <|endoftext|>
        "eos_token": EOS_TOKEN,
        "pad_token": EOS_TOKEN,
        "unk_token": None,
        "additional_special_tokens": [IM_START, IM_END],
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }


def special_tokens_map() -> dict:
    return {
        "eos_token": EOS_TOKEN,
        "pad_token": EOS_TOKEN,
        "additional_special_tokens": [IM_START, IM_END],
    }


def render(tokenizer: Tokenizer) -> dict[str, str]:
    """File name -> exact file text (fixed key order and indent, trailing newline)."""
    return {
        "tokenizer.json": tokenizer.to_str(pretty=False) + "\n",
        "tokenizer_config.json": json.dumps(tokenizer_config(), indent=2, ensure_ascii=False) + "\n",
        "special_tokens_map.json": json.dumps(special_tokens_map(), indent=2, ensure_ascii=False) + "\n",
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder holding the prompt/response jsonl files")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where to write the tokenizer files")
    parser.add_argument("--check", action="store_true", help="do not write; exit 1 if the files under --out differ")
    args = parser.parse_args(argv)

    files = render(train(args.data))
    if args.check:
        stale = [n for n, text in files.items() if not (args.out / n).is_file() or (args.out / n).read_text(encoding="utf-8") != text]
        if stale:
            print(f"build_tokenizer: stale or missing under {args.out}: {', '.join(stale)}", file=sys.stderr)
            return 1
        print("build_tokenizer: up to date")
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (args.out / name).write_text(text, encoding="utf-8")
        digest = hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]
        print(f"wrote {args.out / name} ({len(text.encode('utf-8'))} bytes, sha256 {digest})")
    print(f"vocab {VOCAB_SIZE}; eos/pad {EOS_TOKEN} = 0, {IM_START} = 1, {IM_END} = 2")
    return 0


if __name__ == "__main__":
    sys.exit(main())
