"""`qllm bench`: replays real traces against the stack and compares policies.

    qllm bench --scenario mixed --policies fcfs,priority,qllm --duration 60 --out bench-out
    qllm bench --scenario chatbot --policies arrival,ltr,speculative,oracle --duration 60 --out bench-out
    qllm bench --scenario agent --policies no-pin,fixed-ttl,ttl,pin-forever --duration 60 --out bench-out

For each bench policy (bench/policies.py) a fresh local stack is started, warmed up, and fed the same seeded
workload; the idle LS floor is measured first on the first stack. `--target HOST:PORT` measures a running
router instead, `--openai-url URL --model NAME` an OpenAI-compatible peer (vLLM, SGLang).
Writes OUT/NAME.json, OUT/NAME.md, OUT/NAME-ttft-cdf.png (+ OUT/NAME-sweep.png) and OUT/NAME.requests.jsonl.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime as _dt
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from bench import agent as bench_agent
from bench import metrics, report
from bench import policies as bench_policies
from bench.client import GrpcSender, replay, replay_sequential
from bench.openai_client import OpenAISender, parse_priorities
from bench.stats import percentile, summarize
from bench.tokens import load_tokenizer
from bench.workload import (BE, LS, ChatbotConfig, ClassSpec, RequestSpec, WorkloadConfig, build_chatbot_workload,
                            build_workload)
from qllm import internal_auth
from qllm.up import KVMANAGER_PORT, PREDICTOR_PORT, ROUTER_PORT, WORKER_PORT, Stack, StackConfig

SCENARIOS = ("mixed", "idle-ls", "chatbot", "agent", "memory-pressure")
SWEEP_KEYS = ("be-rate", "ls-rate", "rate")
DEFAULT_POLICIES = "fcfs,priority,qllm"
# per scenario where it differs from the above
SCENARIO_POLICIES = {"memory-pressure": "recompute,alise",
                     "chatbot": "arrival,ltr,speculative,oracle", "agent": "no-pin,fixed-ttl,ttl,pin-forever"}
# BE requests/s when --be-rate is not given: mixed overloads the worker with long BE work; chatbot's rate
# overloads one embedded-default worker on a shared 2-core machine moderately, so a queue forms and drains
# (docs/benchmarks.md, "Scenario chatbot")
DEFAULT_BE_RATE = {"memory-pressure": 2.0, "mixed": 1.0, "idle-ls": 1.0, "chatbot": 2.0}
DEFAULT_DRAIN_CAP = {"chatbot": 90.0, "agent": 120.0}  # else 30 s

# memory-pressure: a KV budget small against the load (a few BE requests' worth) and vLLM V1's optimistic
# admission (nothing reserved beyond this step), the same for every policy; the policies differ only in what
# a preempted request's KV becomes (docs/benchmarks.md, "Scenario memory-pressure")
MEMORY_PRESSURE_WORKER_ARGS = ("--kv-budget-tokens", "8192", "--admission-output-fraction", "0")


def _range(text: str) -> tuple[int, int]:
    lo, sep, hi = text.partition(":")
    try:
        pair = (int(lo), int(hi if sep else lo))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected LO:HI token counts, e.g. 32:128") from None
    if not 1 <= pair[0] <= pair[1]:
        raise argparse.ArgumentTypeError(f"{text!r}: expected 1 <= LO <= HI")
    return pair


def parse_sweep(text: str | None) -> tuple[str, list[float]] | None:
    """"be-rate=0.5,1,2" -> ("be-rate", [0.5, 1.0, 2.0])."""
    if not text:
        return None
    key, sep, values = text.partition("=")
    key = key.strip()
    if not sep or key not in SWEEP_KEYS:
        raise ValueError(f"--sweep {text!r}: expected KEY=V1,V2,... with KEY one of {', '.join(SWEEP_KEYS)}")
    try:
        vals = [float(v) for v in values.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"--sweep {text!r}: values must be numbers") from None
    if not vals or any(v < 0 for v in vals):
        raise ValueError(f"--sweep {text!r}: expected one or more non-negative numbers")
    return key, vals


def configure_parser(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.ArgumentDefaultsHelpFormatter
    p.description = __doc__.split("\n\n")[0]
    g = p.add_argument_group("run")
    g.add_argument("--scenario", choices=SCENARIOS, default="mixed",
                   help="mixed: LS over an overloading BE background; idle-ls: LS alone, one at a time (the floor); "
                        "chatbot: BE only, held-out ShareGPT prompts with their real response lengths (BE orders); "
                        "agent: multi-turn agent programs from the LMCache agent trace (KV pin policies); "
                        "memory-pressure: BE-heavy with an LS stream under a small KV budget (KV policies)")
    g.add_argument("--policies", default=None,
                   help=f"comma-separated bench policies, one fresh stack each (known: "
                        f"{', '.join(bench_policies.known())}; combine parts with '+'); "
                        f"default {DEFAULT_POLICIES} ({', '.join(f'{k}: {v}' for k, v in SCENARIO_POLICIES.items())}), "
                        "or a label with --target/--openai-url")
    g.add_argument("--duration", type=float, default=60.0, help="seconds of arrivals per policy")
    g.add_argument("--drain-cap", type=float, default=None,
                   help="seconds after the last arrival until still-running requests are cancelled (and counted); "
                        f"default 30 ({', '.join(f'{k}: {v:g}' for k, v in DEFAULT_DRAIN_CAP.items())})")
    g.add_argument("--out", default="bench-out", help="output directory")
    g.add_argument("--name", default=None, help="file name stem (default: the scenario)")
    g.add_argument("--seed", type=int, default=0, help="workload seed")
    g.add_argument("--sweep", default=None, help="run each policy at several values, e.g. be-rate=0.5,1,2")
    g.add_argument("--warmup", type=int, default=2, help="unmeasured requests on each fresh stack first")
    g.add_argument("--with-floor", action=argparse.BooleanOptionalAction, default=None,
                   help="measure the idle floor first, in this run (default: on for mixed): LS requests one at a "
                        "time (chatbot: its BE requests)")
    g.add_argument("--floor-requests", type=int, default=20, help="requests in the floor measurement")
    g.add_argument("--dry-run", action="store_true", help="build and describe the workload; send nothing")
    g.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="tqdm progress bars")
    g.add_argument("--save-requests", action=argparse.BooleanOptionalAction, default=True,
                   help="write every request's timings to NAME.requests.jsonl")

    w = p.add_argument_group("workload")
    w.add_argument("--ls-rate", type=float, default=1.0, help="LS mean arrival rate, requests/s")
    w.add_argument("--be-rate", type=float, default=None,
                   help="BE mean arrival rate, requests/s; default per scenario "
                        f"({', '.join(f'{k}: {v:g}' for k, v in DEFAULT_BE_RATE.items())}: each overloads one "
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

    a = p.add_argument_group("agent scenario (bench/agent.py; docs/benchmarks.md, \"Scenario agent\")")
    a.add_argument("--agent-rate", type=float, default=0.35, help="agent: programs/s (Poisson), x --rate")
    a.add_argument("--agent-mix", default=",".join(bench_agent.SOURCES),
                   help="agent: trace agents the programs are drawn from, round-robin (miniswe, magagent)")
    a.add_argument("--agent-max-turns", type=int, default=8, help="agent: a program's turns = its session's first N calls")
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
    s.add_argument("--ls-tpot-slo-ms", type=float, default=None, help="LS TPOT SLO (default: none)")
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


# ----------------------------------------------------------------------------------------------- helpers


def _be_rate(args) -> float:
    return DEFAULT_BE_RATE.get(args.scenario, 1.0) if args.be_rate is None else args.be_rate


def _drain_cap(args) -> float:
    return DEFAULT_DRAIN_CAP.get(args.scenario, 30.0) if args.drain_cap is None else args.drain_cap


def _chatbot_config(args, sweep: dict | None) -> ChatbotConfig:
    rates = {"be-rate": _be_rate(args), "rate": args.rate}
    rates.update(sweep or {})
    if "ls-rate" in rates:
        raise ValueError("--sweep ls-rate: the chatbot scenario has no LS class (sweep be-rate or rate)")
    return ChatbotConfig(duration_s=args.duration, rate=rates["be-rate"] * rates["rate"], seed=args.seed,
                         trace=args.chatbot_trace, max_prompt_tokens=args.chatbot_prompt_tokens,
                         output_range=args.chatbot_output_tokens, output_scale=args.chatbot_output_scale,
                         context_tokens=args.context_tokens, split_seed=args.split_seed, time_scale=args.time_scale)


def _agent_config(args, sweep: dict | None) -> bench_agent.AgentConfig:
    rates = {"rate": args.rate}
    rates.update(sweep or {})
    if set(rates) - {"rate"}:
        raise ValueError("--sweep: the agent scenario sweeps rate only (programs/s = --agent-rate x rate)")
    return bench_agent.AgentConfig(
        duration_s=args.duration, rate=args.agent_rate * rates["rate"], seed=args.seed,
        mix=tuple(a.strip() for a in args.agent_mix.split(",") if a.strip()), max_turns=args.agent_max_turns,
        context_scale=args.agent_context_scale, max_piece_tokens=args.agent_max_piece_tokens,
        max_context_tokens=args.agent_max_context_tokens, output_scale=args.agent_output_scale,
        output_range=args.agent_output_tokens, gap_scale=args.agent_gap_scale, max_gap_s=args.agent_max_gap_s,
        context_tokens=args.context_tokens)


def _build(args, sweep: dict | None, classes: tuple[str, ...], tokenizer):
    if args.scenario == "agent":
        return bench_agent.build_agent_workload(_agent_config(args, sweep), tokenizer)
    if args.scenario == "chatbot":
        return build_chatbot_workload(_chatbot_config(args, sweep), tokenizer)
    return build_workload(_workload_config(args, sweep, classes), tokenizer)


def _workload_config(args, sweep: dict | None, classes: tuple[str, ...]) -> WorkloadConfig:
    rates = {"ls-rate": args.ls_rate, "be-rate": _be_rate(args), "rate": args.rate}
    rates.update(sweep or {})
    specs = []
    if LS in classes:
        specs.append(ClassSpec(LS, args.ls_trace, rates["ls-rate"] * rates["rate"], args.ls_prompt_tokens,
                               args.ls_output_tokens, args.prompts))
    if BE in classes:
        specs.append(ClassSpec(BE, args.be_trace, rates["be-rate"] * rates["rate"], args.be_prompt_tokens,
                               args.be_output_tokens, args.prompts))
    return WorkloadConfig(specs, duration_s=args.duration, seed=args.seed, context_tokens=args.context_tokens,
                          time_scale=args.time_scale)


def _warmup_specs(specs: list[RequestSpec], n: int) -> list[RequestSpec]:
    """The first n requests of each class with outputs cut to 8 tokens: loads kernels and caches, unmeasured."""
    out = []
    for cls in (LS, BE):
        for s in [s for s in specs if s.cls == cls][:n]:
            out.append(dataclasses.replace(s, index=100_000 + len(out), max_tokens=min(8, s.max_tokens)))
    return out


def _port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).resolve().parents[1],
                             capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _stack_metrics_urls(cfg) -> list[str]:
    if not cfg.metrics:
        return []
    return [f"http://{cfg.host}:{cfg.metrics_port(cfg.port(WORKER_PORT) + i)}/metrics" for i in range(cfg.workers)]


async def _scrape_all(urls: list[str]) -> list[dict | None]:
    return [await metrics.scrape(u) for u in urls]


# Histograms whose distribution the report shows: a decoder layer's time in steps with BE work, and the
# preemption latency (LS arrival at the worker until the BE step parked).
TIMING_HISTOGRAMS = {"layer": "qllm_worker_layer_seconds",
                     "preemption_latency": "qllm_worker_preemption_latency_seconds",
                     "preemption_latency_layers": "qllm_worker_preemption_latency_layers"}


def _worker_timing(before: list[dict | None], after: list[dict | None]) -> dict | None:
    """Per histogram: count, mean and p50/p90/p99 in ms (first worker that has it; one worker per bench)."""
    out = {}
    for b, a in zip(before, after):
        if a is None:
            continue
        for key, name in TIMING_HISTOGRAMS.items():
            if key not in out:
                summary = metrics.histogram_summary(b or {}, a, name)
                if summary is not None:
                    out[key] = summary
    return out or None


def _metric_deltas(before: list[dict | None], after: list[dict | None]) -> dict | None:
    total: dict[str, float] = {}
    seen = False
    for b, a in zip(before, after):
        if a is None:
            continue
        seen = True
        for key, value in metrics.counter_deltas(b or {}, a).items():
            total[key] = total.get(key, 0.0) + value
    return total if seen else None


# ----------------------------------------------------------------------------------------------- run


async def run(args: argparse.Namespace) -> int:
    mode = "openai" if args.openai_url else ("target" if args.target else "stack")
    try:
        sweep = parse_sweep(args.sweep)
        if mode == "stack":
            names = bench_policies.parse_list(args.policies or SCENARIO_POLICIES.get(args.scenario, DEFAULT_POLICIES))
        else:
            names = [n.strip() for n in (args.policies or "").split(",") if n.strip()] or [
                f"peer:{args.model}" if mode == "openai" else "target"]
            if len(names) != 1:
                raise ValueError(f"--policies: with --{'openai-url' if mode == 'openai' else 'target'} the server "
                                 "is already configured; give one label at most")
        if args.scenario == "agent" and mode == "openai":
            raise ValueError("the agent scenario needs the qllm router (program_id, last_turn, tool_name); "
                             "--openai-url is not supported")
        if mode == "openai" and not args.model:
            raise ValueError("--openai-url needs --model NAME (the served model's name)")
        priorities = parse_priorities(args.openai_priority) if mode == "openai" else None
        args.drain_cap = _drain_cap(args)
        if args.duration <= 0 or args.drain_cap < 0:
            raise ValueError("--duration must be > 0 and --drain-cap >= 0")
    except ValueError as exc:
        print(f"qllm bench: {exc}", file=sys.stderr)
        return 2

    scenario = args.scenario
    name = args.name or scenario
    out_dir = Path(args.out)
    classes = {"idle-ls": (LS,), "chatbot": (BE,), "agent": (args.agent_priority,)}.get(scenario, (LS, BE))
    floor_cls = {"chatbot": BE, "agent": args.agent_priority}.get(scenario, LS)  # the class the floor measures
    with_floor = (scenario == "mixed") if args.with_floor is None else args.with_floor
    if scenario == "idle-ls":
        with_floor = False  # the run is the floor
    tokenizer = load_tokenizer(args.tokenizer, args.model if mode == "stack" else None)
    if tokenizer.name == "approx-words":
        print("qllm bench: no tokenizer file found; token counts are word estimates", file=sys.stderr)

    points = [None] if sweep is None else [{sweep[0]: v} for v in sweep[1]]
    try:
        workloads = [_build(args, point, classes, tokenizer) for point in points]
    except (ValueError, FileNotFoundError) as exc:
        print(f"qllm bench: {exc}", file=sys.stderr)
        return 2
    first = workloads[0]
    if args.dry_run:
        for point, workload in zip(points, workloads):
            print(json.dumps({"sweep": point, **workload.info}, indent=2))
        return 0
    if not first.requests:
        print("qllm bench: the workload is empty (rates 0 or a duration too short)", file=sys.stderr)
        return 2

    started = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    base_cfg = None
    if mode == "stack":
        worker_args = list(args.worker_arg)
        if scenario == "memory-pressure":
            worker_args = [*MEMORY_PRESSURE_WORKER_ARGS, *worker_args]  # --worker-arg wins
        if scenario == "chatbot" and args.chatbot_max_num_seqs > 0:
            worker_args = ["--max-num-seqs", str(args.chatbot_max_num_seqs), *worker_args]  # --worker-arg wins
        base_cfg = StackConfig(workers=args.workers, model=args.model, port_offset=args.port_offset,
                               worker_args=worker_args, router_args=list(args.router_arg),
                               log_dir=str(Path(args.log_dir or out_dir / "logs")))
        ports = [base_cfg.port(p) for p in (ROUTER_PORT, PREDICTOR_PORT, KVMANAGER_PORT)]
        ports += [base_cfg.port(WORKER_PORT) + i for i in range(args.workers)]
        taken = [p for p in ports if not _port_free(base_cfg.host, p)]
        if taken:
            print(f"qllm bench: port(s) {', '.join(map(str, taken))} taken; pick another --port-offset",
                  file=sys.stderr)
            return 2

    runs: list[dict] = []
    run_records: dict[str, list] = {}
    program_records: dict[str, list] = {}
    floor_records = None
    floor_policy = None
    failure = None
    cap = max(30.0, args.drain_cap)  # per request, for the closed-loop parts
    for policy, (point, workload) in [(p, pw) for p in names for pw in zip(points, workloads)]:
        label = policy + (f" {next(iter(point))}={next(iter(point.values())):g}" if point else "")
        stack = None
        metrics_urls = list(args.metrics_url)
        worker_addresses = list(args.agent_worker)
        stack_info: dict = {}
        address = args.target
        if mode == "stack":
            cfg = bench_policies.apply(policy, base_cfg)
            cfg = dataclasses.replace(cfg, log_dir=str(Path(base_cfg.log_dir) / label.replace(" ", "_")))
            stack = Stack(cfg)
            metrics_urls = _stack_metrics_urls(cfg)
            worker_addresses = [f"{cfg.host}:{cfg.port(WORKER_PORT) + i}" for i in range(cfg.workers)]
            stack_info = {"address": cfg.router_address, **bench_policies.describe(policy, base_cfg),
                          "log_dir": cfg.log_dir}
            address = cfg.router_address
        if mode == "openai":
            sender = OpenAISender(args.openai_url, args.model, priorities=priorities, api_key=args.api_key)
        else:
            sender = GrpcSender(address, request_id_prefix=f"bench-{label.replace(' ', '-')}")
        try:
            if stack is not None:
                print(f"[{label}] starting stack (logs in {stack.config.log_dir})", file=sys.stderr, flush=True)
                try:
                    await asyncio.to_thread(stack.start, args.stack_timeout)
                except (RuntimeError, TimeoutError, OSError) as exc:
                    failure = f"stack for {label!r} did not start: {exc} (logs in {stack.config.log_dir})"
                    break
            if args.warmup:
                await replay_sequential(sender, _warmup_specs(workload.requests, args.warmup), per_request_cap_s=cap,
                                        gap_s=0.0, progress=args.progress, label=f"{label} warmup")
            if with_floor and floor_records is None:
                floor_records = await replay_sequential(sender, first.of_class(floor_cls)[:args.floor_requests],
                                                        per_request_cap_s=cap, progress=args.progress,
                                                        label=f"{label} idle floor")
                floor_policy = policy
            before = await _scrape_all(metrics_urls)
            agent_doc = None
            if scenario == "agent":
                agent_sender = bench_agent.AgentSender(address, request_id_prefix=f"agent-{label.replace(' ', '-')}",
                                                       priority=args.agent_priority)
                # Describe is internal: a stack's own token (with --target, QLLM_INTERNAL_TOKEN_FILE's).
                token = stack.internal_token if stack is not None else internal_auth.from_args(
                    argparse.Namespace(internal_token_file=os.environ.get("QLLM_INTERNAL_TOKEN_FILE")))
                sampler = bench_agent.PinSampler(worker_addresses, args.pin_sample_s,
                                                 interceptors=internal_auth.client_interceptors(token))
                sampler.start()
                try:
                    programs = await bench_agent.run_programs(
                        agent_sender, workload.programs, duration_s=args.duration, drain_cap_s=args.drain_cap,
                        tokenizer=tokenizer, context_tokens=args.context_tokens, progress=args.progress, label=label)
                finally:
                    samples = await sampler.stop()
                    await agent_sender.close()
                records = [t for p in programs for t in p.turns]
                program_records[label] = programs
                agent_doc = bench_agent.summarize_programs(programs, samples)
            elif scenario == "idle-ls":
                records = await replay_sequential(sender, workload.requests, duration_s=args.duration,
                                                  per_request_cap_s=cap, progress=args.progress, label=label)
            else:
                records = await replay(sender, workload.requests, duration_s=args.duration,
                                       drain_cap_s=args.drain_cap, progress=args.progress, label=label)
            after = await _scrape_all(metrics_urls)
        finally:
            await sender.close()
            if stack is not None:
                stack.stop()  # synchronous: runs even when Ctrl-C cancelled the run
        run_records[label] = records
        runs.append({"policy": policy, **({"sweep": point} if point else {}), "stack": stack_info or None,
                     "worker_metrics": _metric_deltas(before, after),
                     "worker_timing": _worker_timing(before, after), "_records": records, **(agent_doc or {})})
    if failure:
        print(f"qllm bench: {failure}", file=sys.stderr)
        if not runs:
            return 1

    # The LS SLO comes from the floor measured in this same invocation (idle-ls: from its first run).
    ls_slo, slo_source = args.ls_ttft_slo_ms, "--ls-ttft-slo-ms"
    floor_ref = floor_records or (runs[0]["_records"] if scenario == "idle-ls" else None)
    if ls_slo is None:
        slo_source = None
        ttft = [r.ttft_s for r in floor_ref or () if r.cls == LS and r.ttft_s is not None]  # LS floors only
        if ttft:
            p50 = percentile(ttft, 50) * 1000.0
            ls_slo = args.slo_floor_multiple * p50
            slo_source = f"{args.slo_floor_multiple:g} x idle floor TTFT p50 ({p50:.1f} ms)"
    slos = {LS: {"ttft_ms": ls_slo, "tpot_ms": args.ls_tpot_slo_ms, "source": slo_source},
            BE: {"ttft_ms": args.be_ttft_slo_ms, "tpot_ms": None,
                 "source": "--be-ttft-slo-ms" if args.be_ttft_slo_ms is not None else None}}
    floor_doc = None
    if floor_records:
        floor_doc = {"policy": floor_policy, **summarize(floor_records, slos, classes=(floor_cls,))}
    for run_doc in runs:
        run_doc.update(summarize(run_doc.pop("_records"), slos, classes=classes))

    params = {
        "mode": mode, "target": args.openai_url or args.target or "local stack per policy",
        "model": args.model or "embedded default", "policies": names, "duration_s": args.duration,
        "drain_cap_s": args.drain_cap, "seed": args.seed, "warmup": args.warmup,
        "rates": {"ls-rate": args.ls_rate, "be-rate": _be_rate(args), "rate": args.rate, "time_scale": args.time_scale},
        "sweep": {"key": sweep[0], "values": sweep[1]} if sweep else None,
        "slo": slos, "floor": floor_doc, "workload": first.info,
        "openai_priority": priorities if mode == "openai" else None,
        "workers": args.workers if mode == "stack" else None,
        "started_at": started, "git_commit": _git_commit(), "cpu_count": os.cpu_count(),
        "incomplete": failure,
    }
    if sweep:
        params["workload_by_sweep"] = [{"sweep": pt, **w.info} for pt, w in zip(points, workloads)]
    doc = {"scenario": scenario, "params": params, "runs": runs, "comparisons": report.comparisons(runs, floor_doc)}
    if scenario == "agent":
        doc["jct_ratios"] = bench_agent.ratios(runs)
    written = report.write(out_dir, name, doc, run_records, floor_records,
                           sweep_key=sweep[0] if sweep else None, save_requests=args.save_requests)
    if program_records:
        path = out_dir / f"{name}.programs.jsonl"
        bench_agent.write_programs(path, program_records)
        written.append(path)
    print(report.markdown(doc))
    print("wrote " + ", ".join(str(p) for p in written), file=sys.stderr)
    return 1 if failure else 0
