"""What `qllm bench` does for every scenario: checks the arguments, builds the workload (one per sweep point),
then, in each of --repeat rounds (the policy order rotated by one each round), per bench policy and sweep
point starts a fresh local stack (or uses --target / --openai-url), warms it up, measures the idle floor on
the round's first stack, has the scenario drive the workload, and finally writes the result document, its
report and plots (bench/report.py). What differs by scenario is in bench/scenarios/."""

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

from bench import metrics, report
from bench import policies as bench_policies
from bench.client import GrpcSender, replay_sequential
from bench.openai_client import OpenAISender, parse_priorities
from bench.scenarios import SCENARIOS
from bench.scenarios.base import Target, per_request_cap_s
from bench.stats import percentile, summarize
from bench.tokens import load_tokenizer
from bench.workload import BE, LS, RequestSpec
from qllm.up import KVMANAGER_PORT, PREDICTOR_PORT, ROUTER_PORT, WORKER_PORT, Stack, StackConfig

SWEEP_KEYS = ("be-rate", "ls-rate", "rate")


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


def warmup_specs(specs: list[RequestSpec], n: int) -> list[RequestSpec]:
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


def _policy_names(args, scenario, mode: str) -> list[str]:
    if mode == "stack":
        return bench_policies.parse_list(args.policies or scenario.policies)
    names = [n.strip() for n in (args.policies or "").split(",") if n.strip()] or [
        f"peer:{args.model}" if mode == "openai" else "target"]
    if len(names) != 1:
        raise ValueError(f"--policies: with --{'openai-url' if mode == 'openai' else 'target'} the server "
                         "is already configured; give one label at most")
    return names


async def run(args: argparse.Namespace) -> int:
    scenario = SCENARIOS[args.scenario]
    mode = "openai" if args.openai_url else ("target" if args.target else "stack")
    try:
        if args.repeat < 1:
            raise ValueError(f"--repeat {args.repeat}: expected 1 or more rounds")
        sweep = parse_sweep(args.sweep)
        names = _policy_names(args, scenario, mode)
        if mode == "openai" and scenario.openai_refusal:
            raise ValueError(scenario.openai_refusal)
        if mode == "openai" and not args.model:
            raise ValueError("--openai-url needs --model NAME (the served model's name)")
        priorities = parse_priorities(args.openai_priority) if mode == "openai" else None
        args.drain_cap = scenario.drain_cap(args)
        if args.duration <= 0 or args.drain_cap < 0:
            raise ValueError("--duration must be > 0 and --drain-cap >= 0")
    except ValueError as exc:
        print(f"qllm bench: {exc}", file=sys.stderr)
        return 2

    name = args.name or scenario.name
    out_dir = Path(args.out)
    classes = scenario.classes(args)
    floor_cls = scenario.floor_class(args)
    with_floor = scenario.with_floor(args)
    tokenizer = load_tokenizer(args.tokenizer, args.model if mode == "stack" else None)
    if tokenizer.name == "approx-words":
        print("qllm bench: no tokenizer file found; token counts are word estimates", file=sys.stderr)

    points = [None] if sweep is None else [{sweep[0]: v} for v in sweep[1]]
    try:
        workloads = [scenario.build(args, point, tokenizer) for point in points]
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
        base_cfg = StackConfig(workers=args.workers, model=args.model, port_offset=args.port_offset,
                               worker_args=scenario.worker_args(args), router_args=list(args.router_arg),
                               log_dir=str(Path(args.log_dir or out_dir / "logs")))
        ports = [base_cfg.port(p) for p in (ROUTER_PORT, PREDICTOR_PORT, KVMANAGER_PORT)]
        ports += [base_cfg.port(WORKER_PORT) + i for i in range(args.workers)]
        taken = [p for p in ports if not _port_free(base_cfg.host, p)]
        if taken:
            print(f"qllm bench: port(s) {', '.join(map(str, taken))} taken; pick another --port-offset",
                  file=sys.stderr)
            return 2

    repeat = args.repeat
    rounds: list[dict] = []  # per round: its number, policy order, runs and floor (records until summarised)
    run_records: dict[str, list] = {}
    kept: dict[str, object] = {}
    failure = None
    cap = per_request_cap_s(args)
    for round_index in range(repeat):
        # Round r starts at policy r mod len: no policy always runs first (warm caches, a cool machine).
        shift = round_index % len(names)
        order = names[shift:] + names[:shift]
        this_round = {"round": round_index + 1, "order": order, "runs": [], "floor_records": None,
                      "floor_policy": None}
        rounds.append(this_round)
        round_tag = f" r{round_index + 1}" if repeat > 1 else ""
        for policy, (point, workload) in [(p, pw) for p in order for pw in zip(points, workloads)]:
            label = policy + (f" {next(iter(point))}={next(iter(point.values())):g}" if point else "") + round_tag
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
                    await replay_sequential(sender, warmup_specs(workload.requests, args.warmup),
                                            per_request_cap_s=cap, gap_s=0.0, progress=args.progress,
                                            label=f"{label} warmup")
                # The floor is measured once per round, on the round's first stack.
                if with_floor and this_round["floor_records"] is None:
                    this_round["floor_records"] = await replay_sequential(
                        sender, first.of_class(floor_cls)[:args.floor_requests], per_request_cap_s=cap,
                        progress=args.progress, label=f"{label} idle floor")
                    this_round["floor_policy"] = policy
                before = await metrics.scrape_all(metrics_urls)
                driven = await scenario.drive(args, Target(label, sender, address, stack, worker_addresses),
                                              workload, tokenizer)
                after = await metrics.scrape_all(metrics_urls)
            finally:
                await sender.close()
                if stack is not None:
                    stack.stop()  # synchronous: runs even when Ctrl-C cancelled the run
            run_records[label] = driven.records
            if driven.kept is not None:
                kept[label] = driven.kept
            this_round["runs"].append({"policy": policy, **({"sweep": point} if point else {}),
                                       **({"round": round_index + 1} if repeat > 1 else {}),
                                       "stack": stack_info or None,
                                       "worker_metrics": metrics.counter_totals(before, after),
                                       "worker_timing": metrics.worker_timing(before, after),
                                       "_records": driven.records, **driven.run_doc})
        if failure:
            break
    rounds = [r for r in rounds if r["runs"]]
    if failure:
        print(f"qllm bench: {failure}", file=sys.stderr)
        if not rounds:
            return 1

    for this_round in rounds:
        # The LS SLO comes from the floor measured in this same round (idle-ls: from its first run).
        # The LS SLO covers the whole answer: its first token (TTFT) and every one after (TPOT).
        floor_records = this_round["floor_records"]
        floor_ref = floor_records or (this_round["runs"][0]["_records"] if scenario.run_is_floor else None)
        ls_slo, ttft_source = _floor_slo(args.ls_ttft_slo_ms, "--ls-ttft-slo-ms", floor_ref, "ttft_or_cancel_s",
                                         "TTFT", args.slo_floor_multiple)
        ls_tpot_slo, tpot_source = _floor_slo(args.ls_tpot_slo_ms, "--ls-tpot-slo-ms", floor_ref, "tpot_s", "TPOT",
                                              args.tpot_slo_floor_multiple)
        slo_source = "; ".join(s for s in (ttft_source, tpot_source) if s) or None
        slos = {LS: {"ttft_ms": ls_slo, "tpot_ms": ls_tpot_slo, "source": slo_source},
                BE: {"ttft_ms": args.be_ttft_slo_ms, "tpot_ms": None,
                     "source": "--be-ttft-slo-ms" if args.be_ttft_slo_ms is not None else None}}
        floor_doc = None
        if floor_records:
            floor_doc = {"policy": this_round["floor_policy"],
                         **summarize(floor_records, slos, classes=(floor_cls,))}
        for run_doc in this_round["runs"]:
            run_doc.update(summarize(run_doc.pop("_records"), slos, classes=classes))
        this_round.update(slo=slos, floor=floor_doc,
                          comparisons=report.comparisons(this_round["runs"], floor_doc, baseline=names[0]))

    params = {
        "mode": mode, "target": args.openai_url or args.target or "local stack per policy",
        "model": args.model or "embedded default", "policies": names, "duration_s": args.duration,
        "drain_cap_s": args.drain_cap, "seed": args.seed, "warmup": args.warmup,
        "rates": {"ls-rate": args.ls_rate, "be-rate": scenario.be_rate(args), "rate": args.rate,
                  "time_scale": args.time_scale},
        "sweep": {"key": sweep[0], "values": sweep[1]} if sweep else None,
        # with --repeat: round 1's; every round's are in doc["rounds"]
        "slo": rounds[0]["slo"], "floor": rounds[0]["floor"], "workload": first.info,
        "openai_priority": priorities if mode == "openai" else None,
        "workers": args.workers if mode == "stack" else None,
        "started_at": started, "git_commit": _git_commit(), "cpu_count": os.cpu_count(),
        "incomplete": failure,
        # TTFT percentiles count requests cancelled before their first token at their cancel time (bench/stats.py)
        "ttft_counts_cancelled": True,
    }
    if repeat > 1:
        params["repeat"] = repeat
    if sweep:
        params["workload_by_sweep"] = [{"sweep": pt, **w.info} for pt, w in zip(points, workloads)]
    runs = [run for this_round in rounds for run in this_round["runs"]]
    if repeat > 1:
        doc = {"scenario": scenario.name, "params": params, "runs": runs,
               "rounds": [{k: r[k] for k in ("round", "order", "floor", "slo", "comparisons")} for r in rounds],
               "comparisons": report.comparisons_over_rounds([r["comparisons"] for r in rounds])}
    else:  # one round: the document as before --repeat existed
        doc = {"scenario": scenario.name, "params": params, "runs": runs, "comparisons": rounds[0]["comparisons"]}
    scenario.finish_document(doc)
    floors = {("idle floor" + (f" r{r['round']}" if repeat > 1 else "")): r["floor_records"]
              for r in rounds if r["floor_records"]}
    written = report.write(out_dir, name, doc, run_records, floors,
                           sweep_key=sweep[0] if sweep else None,
                           save_requests=args.save_requests and not args.summary_only,
                           plots=not args.summary_only)
    if not args.summary_only:
        written += scenario.write_files(out_dir, name, kept)
    print(report.markdown(doc))
    print("wrote " + ", ".join(str(p) for p in written), file=sys.stderr)
    return 1 if failure else 0


def _floor_slo(given: float | None, flag: str, floor_records, attr: str, label: str,
               multiple: float) -> tuple[float | None, str | None]:
    """An LS SLO in ms: the flag's value, else `multiple` x the idle floor's p50 of `attr` (LS only)."""
    if given is not None:
        return given, flag
    values = [getattr(r, attr) for r in floor_records or () if r.cls == LS and getattr(r, attr) is not None]
    if not values:
        return None, None
    p50 = percentile(values, 50) * 1000.0
    return multiple * p50, f"{label} {multiple:g} x idle floor {label} p50 ({p50:.1f} ms)"
