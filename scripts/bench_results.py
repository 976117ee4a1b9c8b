"""Regenerate the results docs/benchmarks.md quotes: each scenario's command, three rounds, its summary JSON
copied to docs/results/, then every generated table of the docs rewritten (`make bench-results`).

  .venv/bin/python scripts/bench_results.py [--only NAME,...] [--peer-venv DIR] [--dry-run]

Runs one command after another; give the machine to it (nothing else running: the figures are ratios within
a run, but a busy machine moves them). About two hours on the 2-core machine here, the vLLM side-by-side
(only with --peer-venv, float32 and bfloat16) half an hour more. Prints each command's wall time. The results of earlier
commits that the docs keep for comparison (docs/results/*-before-*.json and the like) are not rerun.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
RESULTS = REPO / "docs" / "results"

# (docs/results name, the JSON the command writes under its --out, the command after `qllm bench`).
# chatbot and agent run on seed 1: their tuned defaults were chosen on seed 0 (docs/benchmarks.md).
BENCH = (
    ("make-bench", "mixed.json", "--scenario mixed --policies fcfs,priority,qllm --be-rate 1.5 --repeat 3"),
    ("mixed-ls-pacing", "mixed.json",
     "--scenario mixed --policies fcfs,priority,qllm,qllm-no-pacing --be-rate 1.0 --duration 60 --repeat 3"),
    ("mixed-ablation", "mixed.json",
     "--scenario mixed --policies qllm,qllm-no-park,qllm-no-inner-park,qllm-no-ls-steps,qllm-no-reserve,qllm-no-pacing,"
     "priority-evict --be-rate 1.0 --duration 30 --repeat 3"),
    ("mixed-ablation-60s", "mixed.json",
     "--scenario mixed --policies fcfs,qllm,qllm-no-ls-steps,qllm-no-reserve,qllm-no-inner-park --be-rate 1.0 "
     "--duration 60 --repeat 3"),
    ("mixed-ablation-native", "mixed.json",
     "--scenario mixed --policies qllm,qllm-no-park,qllm-no-ls-steps,qllm-no-reserve,qllm-no-pacing,priority-evict "
     "--be-rate 1.0 --duration 30 --repeat 3"),
    ("mixed-tpot-tradeoff", "mixed.json",
     "--scenario mixed --policies fcfs,qllm,qllm-tpot-25,qllm-tpot-50,qllm-tpot-100 --be-rate 1.0 --duration 30 "
     "--repeat 3"),
    ("mixed-ls-budget", "mixed.json",
     "--scenario mixed --policies fcfs,qllm,qllm-budget-256,qllm-budget-512 --be-rate 1.0 --duration 30 --repeat 3"),
    ("memory-pressure", "memory-pressure.json",
     "--scenario memory-pressure --policies recompute,alise,alise-oracle --duration 60 --repeat 3"),
    ("chatbot", "chatbot.json",
     "--scenario chatbot --policies arrival,ltr,speculative,oracle --duration 60 --seed 1 --repeat 3"),
    ("agent", "agent.json", "--scenario agent --policies no-pin,fixed-ttl,ttl,pin-forever --duration 60 --seed 1 --repeat 3"),
)
PEERS = (
    ("peer-vllm-fp32", "peer.json", "--dtypes float32 --rounds 3 --be-rate 1.0 --duration 30 --threads 1"),
    # bfloat16 is emulated on a CPU without AVX512-BF16/AMX (docs/benchmarks.md says which this was)
    ("peer-vllm-bf16", "peer.json", "--dtypes bfloat16 --rounds 3 --be-rate 1.0 --duration 30 --threads 1"),
)


def commands(names: set[str] | None, peer_venv: str | None, out_root: Path) -> list[tuple[str, Path, list[str]]]:
    """(docs/results name, the JSON it writes, argv) of each result to regenerate, in order."""
    todo = []
    for name, written, args in BENCH:
        if names is None or name in names:
            out = out_root / name
            todo.append((name, out / written,
                         [str(BIN / "qllm"), "bench", *args.split(), "--summary-only", "--out", str(out)]))
    for name, written, args in PEERS:
        if peer_venv and (names is None or name in names):
            out = out_root / name
            todo.append((name, out / written, [sys.executable, str(REPO / "scripts" / "peer_vllm.py"),
                                               "--peer-venv", peer_venv, *args.split(), "--out", str(out)]))
    return todo


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", default=None, help="comma-separated docs/results names (default: all)")
    p.add_argument("--peer-venv", default=None, help="vLLM's CPU build venv (scripts/peer_vllm.py); "
                                                     "without it the side-by-side runs are skipped")
    p.add_argument("--out", default=str(REPO / "bench-out" / "results"), help="where the runs write")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    args = p.parse_args(argv)
    names = set(args.only.split(",")) if args.only else None
    known = {b[0] for b in BENCH} | {p[0] for p in PEERS}
    if names and names - known:
        p.error(f"unknown result(s) {', '.join(sorted(names - known))}; known: {', '.join(sorted(known))}")
    todo = commands(names, args.peer_venv, Path(args.out))
    walls = []
    for name, written, cmd in todo:
        print(f"== {name}: {' '.join(cmd)}", flush=True)
        if args.dry_run:
            continue
        started = time.monotonic()
        rc = subprocess.call(cmd, cwd=REPO)
        wall = time.monotonic() - started
        walls.append((name, rc, wall))
        print(f"== {name}: exit {rc}, {wall / 60:.1f} min", flush=True)
        if rc != 0 or not written.is_file():
            print(f"bench_results: {name} failed; docs/results/{name}.json left as it was", file=sys.stderr)
            continue
        shutil.copyfile(written, RESULTS / f"{name}.json")
    if args.dry_run:
        return 0
    rc = subprocess.call([str(BIN / "qllm"), "bench", "report", "--update", str(REPO / "docs" / "benchmarks.md")])
    for name, code, wall in walls:
        print(f"{name}: exit {code}, {wall / 60:.1f} min")
    return 1 if rc or any(code for _, code, _ in walls) else 0


if __name__ == "__main__":
    sys.exit(main())
