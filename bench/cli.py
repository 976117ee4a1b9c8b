"""`qllm bench`: replays real traces against the stack and compares policies.

    qllm bench --scenario mixed --policies fcfs,priority,qllm --duration 60 --out bench-out
    qllm bench --scenario chatbot --policies arrival,ltr,speculative,oracle --duration 60 --out bench-out
    qllm bench --scenario agent --policies no-pin,fixed-ttl,ttl,pin-forever --duration 60 --out bench-out

For each bench policy (bench/policies.py) a fresh local stack is started, warmed up, and fed the same seeded
workload; the idle LS floor is measured first on the first stack. `--repeat N` does that N times, the
policy order rotated each round, and reports every ratio as median (min-max) over the rounds.
`--target HOST:PORT` measures a running router instead, `--openai-url URL --model NAME` an OpenAI-compatible
peer (vLLM, SGLang). Writes OUT/NAME.json, OUT/NAME.md, OUT/NAME-ttft-cdf.png (+ OUT/NAME-sweep.png) and
OUT/NAME.requests.jsonl (`--summary-only`: the first two only).

`qllm bench report FILE.json ...` prints the tables of saved results; `qllm bench report --update
docs/benchmarks.md` regenerates the blocks of docs generated from docs/results/*.json (bench/report_command.py).

This module parses the arguments; bench/runner.py runs them, with what differs by scenario in bench/scenarios/.
"""

from __future__ import annotations

import argparse
import os

from bench import policies as bench_policies
from bench import report_command, runner
from bench.agent.trace import SOURCES as AGENT_SOURCES
from bench.scenarios import SCENARIOS
from bench.scenarios.base import DEFAULT_POLICIES, Scenario
from bench.workload import BE, LS


def _range(text: str) -> tuple[int, int]:
    lo, sep, hi = text.partition(":")
    try:
        pair = (int(lo), int(hi if sep else lo))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected LO:HI token counts, e.g. 32:128") from None
    if not 1 <= pair[0] <= pair[1]:
        raise argparse.ArgumentTypeError(f"{text!r}: expected 1 <= LO <= HI")
    return pair


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.ArgumentDefaultsHelpFormatter
    # per scenario where it differs from the common default
    policies = ", ".join(f"{s.name}: {s.policies}" for s in SCENARIOS.values() if s.policies != DEFAULT_POLICIES)
    drain_caps = ", ".join(f"{s.name}: {s.default_drain_cap_s:g}" for s in SCENARIOS.values()
                           if s.default_drain_cap_s != Scenario.default_drain_cap_s)
    be_rates = ", ".join(f"{s.name}: {s.default_be_rate:g}" for s in SCENARIOS.values())
    p.description = __doc__.split("\n\n")[0]
    # `qllm bench report ...` renders committed results (bench/report_command.py); plain `qllm bench` runs one.
    sub = p.add_subparsers(dest="bench_command", metavar="report")
    report_command.configure_parser(sub.add_parser("report", help="the Markdown tables of result JSONs; "
                                                   "--update rewrites the generated blocks in a docs file"))
    g = p.add_argument_group("run")
    g.add_argument("--scenario", choices=tuple(SCENARIOS), default="mixed",
                   help="; ".join(f"{s.name}: {s.summary}" for s in SCENARIOS.values()))
    g.add_argument("--policies", default=None,
                   help=f"comma-separated bench policies, one fresh stack each (known: "
                        f"{', '.join(bench_policies.known())}; combine parts with '+'); "
                        f"default {DEFAULT_POLICIES} ({policies}), "
                        "or a label with --target/--openai-url")
    g.add_argument("--duration", type=float, default=60.0, help="seconds of arrivals per policy")
    g.add_argument("--drain-cap", type=float, default=None,
                   help="seconds after the last arrival until still-running requests are cancelled (and counted); "
                        f"default {Scenario.default_drain_cap_s:g} ({drain_caps})")
    g.add_argument("--out", default="bench-out", help="output directory")
    g.add_argument("--name", default=None, help="file name stem (default: the scenario)")
    g.add_argument("--seed", type=int, default=0, help="workload seed")
    g.add_argument("--sweep", default=None, help="run each policy at several values, e.g. be-rate=0.5,1,2")
    g.add_argument("--repeat", type=int, default=1,
                   help="rounds: each runs every policy on a fresh stack, the order rotated by one per round (round "
                        "r starts at policy r mod the count) and measures its own idle floor on its first stack; "
                        "the JSON keeps every round's runs, the report gives each ratio as median (min-max)")
    g.add_argument("--warmup", type=int, default=2, help="unmeasured requests on each fresh stack first")
    g.add_argument("--with-floor", action=argparse.BooleanOptionalAction, default=None,
                   help="measure the idle floor first, in this run (default: on for mixed): LS requests one at a "
                        "time (chatbot: its BE requests)")
    g.add_argument("--floor-requests", type=int, default=20, help="requests in the floor measurement")
    g.add_argument("--dry-run", action="store_true", help="build and describe the workload; send nothing")
    g.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="tqdm progress bars")
    g.add_argument("--summary-only", action="store_true",
                   help="write only NAME.json (per-run summaries, no request log) and NAME.md, e.g. to commit "
                        "under docs/results (`qllm bench report` makes the tables from them)")
    g.add_argument("--save-requests", action=argparse.BooleanOptionalAction, default=True,
                   help="write every request's timings to NAME.requests.jsonl")

    w = p.add_argument_group("workload")
    w.add_argument("--ls-rate", type=float, default=1.0, help="LS mean arrival rate, requests/s")
    w.add_argument("--be-rate", type=float, default=None,
                   help="BE mean arrival rate, requests/s; default per scenario "
                        f"({be_rates}: each overloads one "
                        "embedded-default worker on a shared 2-core machine, docs/benchmarks.md)")
    w.add_argument("--rate", type=float, default=1.0, help="multiplies both class rates")
    w.add_argument("--time-scale", type=float, default=None,
                   help="multiply the traces' own timestamps by this instead of matching --ls-rate/--be-rate")
    w.add_argument("--ls-trace", default="azure-conv", help="trace for LS arrivals and lengths")
    w.add_argument("--be-trace", default="mooncake-conv", help="trace for BE arrivals and lengths")
    w.add_argument("--prompts", default="sharegpt", help="prompt text source (sharegpt, arena, alpaca)")
    w.add_argument("--ls-prompt-tokens", type=_range, default=(32, 128), help="LS prompt length range LO:HI")
    w.add_argument("--ls-output-tokens", type=_range, default=(16, 64), help="LS output length range LO:HI")
    w.add_argument("--be-prompt-tokens", type=_range, default=(512, 2048), help="BE prompt length range LO:HI")
    w.add_argument("--be-output-tokens", type=_range, default=(128, 512), help="BE output length range LO:HI")
    w.add_argument("--context-tokens", type=int, default=4096, help="model context: prompt + output must fit")
    w.add_argument("--chatbot-trace", default="azure-conv", help="chatbot: trace for the arrivals (only)")
    w.add_argument("--chatbot-prompt-tokens", type=int, default=1024,
                   help="chatbot: a longer prompt is cut to its first this-many tokens")
    w.add_argument("--chatbot-output-tokens", type=_range, default=(8, 1024),
                   help="chatbot: outputs (response words x 1.3 x --chatbot-output-scale) are clipped to LO:HI")
    w.add_argument("--chatbot-output-scale", type=float, default=1.0,
                   help="chatbot: one factor on every real response length (keeps their order)")
    w.add_argument("--chatbot-max-num-seqs", type=int, default=8,
                   help="chatbot, stack mode: the worker's --max-num-seqs (0 = the worker's own default, 32); the "
                        "router releases BE only up to it, so the rest waits in the router's BE order")
    w.add_argument("--split-seed", type=int, default=0,
                   help="chatbot: seed of predictor/data.py's train/val/test split; the prompts are its test part "
                        "(0 = the split the shipped ranker was trained on)")
    w.add_argument("--tokenizer", default=None,
                   help="tokenizer.json (or a directory with one) to count tokens; default: --model's in stack "
                        "mode, else the embedded default's")

    a = p.add_argument_group("agent scenario (bench/scenarios/agent.py; docs/benchmarks.md, \"Scenario agent\")")
    a.add_argument("--agent-rate", type=float, default=0.35, help="agent: programs/s (Poisson), x --rate")
    a.add_argument("--agent-mix", default=",".join(AGENT_SOURCES),
                   help="agent: trace agents the programs are drawn from, round-robin (miniswe, magagent)")
    a.add_argument("--agent-max-turns", type=int, default=8,
                   help="agent: a program's turns = its session's first N calls")
    a.add_argument("--agent-context-scale", type=float, default=0.5,
                   help="agent: tokens of each real text piece (first prompt, tool result) x this")
    a.add_argument("--agent-max-piece-tokens", type=int, default=640, help="agent: cap of one text piece")
    a.add_argument("--agent-max-context-tokens", type=int, default=3584,
                   help="agent: a program's final prompt + output fits this (pieces shrink by one factor)")
    a.add_argument("--agent-output-scale", type=float, default=0.15,
                   help="agent: max_tokens = the real output's tokens x this, clipped to --agent-output-tokens")
    a.add_argument("--agent-output-tokens", type=_range, default=(8, 32), help="agent: output length range LO:HI")
    a.add_argument("--agent-gap-scale", type=float, default=0.5,
                   help="agent: multiplies the real tool gaps (trace gap - the traced LLM's time)")
    a.add_argument("--agent-max-gap-s", type=float, default=20.0, help="agent: real tool gaps are clipped to this")
    a.add_argument("--agent-priority", choices=(LS, BE), default=BE, help="agent: the class the turns are sent as")
    a.add_argument("--pin-sample-s", type=float, default=0.5,
                   help="agent: seconds between polls of the workers' Describe (KV held by pins)")
    a.add_argument("--agent-worker", action="append", default=[],
                   help="agent with --target: worker HOST:PORT(s) to poll for pinned KV (stack mode finds its own)")

    s = p.add_argument_group("SLOs")
    s.add_argument("--ls-ttft-slo-ms", type=float, default=None,
                   help="LS TTFT SLO (default: --slo-floor-multiple x the idle floor's TTFT p50)")
    s.add_argument("--slo-floor-multiple", type=float, default=5.0, help="LS TTFT SLO as a multiple of the floor")
    s.add_argument("--ls-tpot-slo-ms", type=float, default=None,
                   help="LS TPOT SLO (default: --tpot-slo-floor-multiple x the idle floor's TPOT p50)")
    s.add_argument("--tpot-slo-floor-multiple", type=float, default=3.0,
                   help="LS TPOT SLO as a multiple of the floor")
    s.add_argument("--be-ttft-slo-ms", type=float, default=None, help="BE TTFT SLO (default: none)")

    k = p.add_argument_group("stack (default mode: a fresh local stack per policy)")
    k.add_argument("--workers", type=int, default=1, help="workers per stack")
    k.add_argument("--model", default=None,
                   help="stack mode: HF MoE checkpoint directory (default: embedded); peer mode: the model name")
    k.add_argument("--port-offset", type=int, default=300, help="added to every service port of the bench stacks")
    k.add_argument("--worker-arg", action="append", default=[], help="extra worker flag (repeatable)")
    k.add_argument("--router-arg", action="append", default=[], help="extra router flag (repeatable)")
    k.add_argument("--stack-timeout", type=float, default=180.0, help="seconds to wait for a stack to be SERVING")
    k.add_argument("--log-dir", default=None, help="service logs (default OUT/logs)")
    k.add_argument("--target", default=None, help="HOST:PORT of a running router to measure instead")
    k.add_argument("--metrics-url", action="append", default=[],
                   help="worker Prometheus URL(s) to scrape with --target (stack mode finds its own)")

    o = p.add_argument_group("peer (OpenAI-compatible server)")
    o.add_argument("--openai-url", default=None, help="base URL, e.g. http://127.0.0.1:8000")
    o.add_argument("--openai-priority", default="LS=0,BE=1",
                   help="integer `priority` per class (lower = first, vLLM); 'none' leaves the field out")
    o.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"), help="bearer token [env OPENAI_API_KEY]")


async def run(args: argparse.Namespace) -> int:
    """qllm/cli.py's entry point: runs the parsed arguments (bench/runner.py), or `qllm bench report`."""
    if getattr(args, "bench_command", None) == "report":
        return report_command.run(args)
    return await runner.run(args)
