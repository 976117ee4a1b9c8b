"""The result document (JSON), its schema check, the Markdown table and the PNG plots."""

from __future__ import annotations

import json
import math
import os
import statistics
from pathlib import Path
from typing import Any, Sequence

from bench.stats import PERCENTILES, RequestRecord

CLASSES = ("LS", "BE")
DIST_KEYS = tuple(f"p{q}" for q in PERCENTILES) + ("mean",)


# ----------------------------------------------------------------------------------------------- comparisons


def _get(run: dict | None, cls: str, *path: str) -> float | None:
    node: Any = (run or {}).get("classes", {}).get(cls)
    for key in path:
        if not isinstance(node, dict):
            return None
        node = node.get(key)
    return node if isinstance(node, (int, float)) else None


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def _e2e_mean(run: dict | None) -> float | None:
    """Mean E2E over the completed requests of every class (each class's mean weighted by its completed)."""
    total = weight = 0.0
    for cls in CLASSES:
        mean, n = _get(run, cls, "e2e_ms", "mean"), _get(run, cls, "completed")
        if mean is not None and n:
            total, weight = total + mean * n, weight + n
    return total / weight if weight else None


# The ratios of a comparisons() row that the report shows, in its column order.
RATIO_KEYS = ("ls_ttft_p50_vs_floor", "ls_ttft_p99_vs_floor", "ls_ttft_p50_vs_baseline", "ls_ttft_p99_vs_baseline",
              "be_output_tok_s_vs_baseline", "total_output_tok_s_vs_baseline", "e2e_mean_vs_baseline",
              "be_e2e_mean_vs_baseline", "be_e2e_p99_vs_baseline")


def comparisons(runs: Sequence[dict], floor: dict | None, baseline: str | None = None) -> dict:
    """Ratios within one round: each run against the idle LS floor, and each policy against the baseline
    policy (default: the first run's; with rotated rounds the runner names it) at the same sweep point."""
    if not runs:
        return {"baseline": None, "rows": []}
    baseline = baseline or runs[0]["policy"]
    base_by_point = {json.dumps(r.get("sweep"), sort_keys=True): r for r in runs if r["policy"] == baseline}
    rows = []
    for run in runs:
        base = base_by_point.get(json.dumps(run.get("sweep"), sort_keys=True))
        row = {"policy": run["policy"]}
        if run.get("sweep"):
            row["sweep"] = run["sweep"]
        for q in ("p50", "p99"):
            row[f"ls_ttft_{q}_vs_floor"] = _ratio(_get(run, "LS", "ttft_ms", q), _get(floor, "LS", "ttft_ms", q))
        for q in ("p50", "p99"):
            row[f"ls_ttft_{q}_vs_baseline"] = _ratio(_get(run, "LS", "ttft_ms", q), _get(base, "LS", "ttft_ms", q))
        row["ls_tpot_p50_vs_baseline"] = _ratio(_get(run, "LS", "tpot_ms", "p50"), _get(base, "LS", "tpot_ms", "p50"))
        row["be_output_tok_s_vs_baseline"] = _ratio(_get(run, "BE", "output_tok_s"), _get(base, "BE", "output_tok_s"))
        row["total_output_tok_s_vs_baseline"] = _ratio(run.get("total_output_tok_s"),
                                                       (base or {}).get("total_output_tok_s"))
        # end-to-end latency (what a BE order changes): all classes' mean, and BE's mean and p99
        row["e2e_mean_vs_baseline"] = _ratio(_e2e_mean(run), _e2e_mean(base))
        row["be_e2e_mean_vs_baseline"] = _ratio(_get(run, "BE", "e2e_ms", "mean"), _get(base, "BE", "e2e_ms", "mean"))
        row["be_e2e_p99_vs_baseline"] = _ratio(_get(run, "BE", "e2e_ms", "p99"), _get(base, "BE", "e2e_ms", "p99"))
        rows.append(row)
    return {"baseline": baseline, "rows": rows}


def spread(values: Sequence[float | None]) -> dict | None:
    """{"median", "min", "max", "n"} of the values that are there (n of them); None when none is."""
    xs = [v for v in values if v is not None]
    if not xs:
        return None
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


def comparisons_over_rounds(per_round: Sequence[dict]) -> dict:
    """The rounds' comparisons() in one: per policy (and sweep point), each ratio's spread over the rounds."""
    rows: dict[str, dict] = {}  # policy and sweep point -> {"policy", "sweep"?, ratio -> [value per round]}
    for comp in per_round:
        for row in comp["rows"]:
            key = json.dumps([row["policy"], row.get("sweep")], sort_keys=True)
            acc = rows.setdefault(key, {"policy": row["policy"], **({"sweep": row["sweep"]} if row.get("sweep")
                                                                    else {})})
            for k, v in row.items():
                if k not in ("policy", "sweep"):
                    acc.setdefault(k, []).append(v)
    # (a round without the policy adds nothing to its lists: n in each spread says how many rounds had it)
    out = [{k: (v if k in ("policy", "sweep") else spread(v)) for k, v in acc.items()} for acc in rows.values()]
    return {"baseline": per_round[0]["baseline"] if per_round else None, "rounds": len(per_round), "rows": out}


# ----------------------------------------------------------------------------------------------- schema


class SchemaError(ValueError):
    pass


def _num(value: Any, where: str, *, allow_none: bool = False, lo: float | None = None, hi: float | None = None):
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (isinstance(value, float) and
                                                                          not math.isfinite(value)):
        raise SchemaError(f"{where}: expected a finite number{' or null' if allow_none else ''}, got {value!r}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise SchemaError(f"{where}: {value} outside [{lo}, {hi}]")


def _int(value: Any, where: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise SchemaError(f"{where}: expected a count (int >= 0), got {value!r}")


def _dict(value: Any, where: str) -> dict:
    if not isinstance(value, dict):
        raise SchemaError(f"{where}: expected an object, got {type(value).__name__}")
    return value


def validate_class(c: Any, where: str) -> None:
    c = _dict(c, where)
    for key in ("count", "errors"):
        if key not in c:
            raise SchemaError(f"{where}.{key}: missing")
        _int(c[key], f"{where}.{key}")
    for key in ("ttft_ms", "tpot_ms", "e2e_ms"):
        d = _dict(c.get(key), f"{where}.{key}")
        for k in DIST_KEYS:
            if k not in d:
                raise SchemaError(f"{where}.{key}.{k}: missing")
            _num(d[k], f"{where}.{key}.{k}", allow_none=True, lo=0)
    if "slo_attainment" not in c:
        raise SchemaError(f"{where}.slo_attainment: missing")
    _num(c["slo_attainment"], f"{where}.slo_attainment", allow_none=True, lo=0, hi=1)
    _num(c.get("output_tok_s"), f"{where}.output_tok_s", lo=0)


def validate(doc: Any) -> None:
    """Raises SchemaError naming the first field that breaks the documented shape."""
    doc = _dict(doc, "$")
    if not isinstance(doc.get("scenario"), str) or not doc["scenario"]:
        raise SchemaError("$.scenario: expected a non-empty string")
    _dict(doc.get("params"), "$.params")
    runs = doc.get("runs")
    if not isinstance(runs, list) or not runs:
        raise SchemaError("$.runs: expected a non-empty list")
    for i, run in enumerate(runs):
        where = f"$.runs[{i}]"
        run = _dict(run, where)
        if not isinstance(run.get("policy"), str) or not run["policy"]:
            raise SchemaError(f"{where}.policy: expected a non-empty string")
        classes = _dict(run.get("classes"), f"{where}.classes")
        for cls, c in classes.items():
            if cls not in CLASSES:
                raise SchemaError(f"{where}.classes: unknown class {cls!r}")
            validate_class(c, f"{where}.classes.{cls}")
        _num(run.get("total_output_tok_s"), f"{where}.total_output_tok_s", lo=0)
        if doc["scenario"] == "agent" or "jct_ms" in run:  # agent programs: JCT, prefix hits, pinned KV
            from bench.agent.summary import validate_run

            validate_run(run, where, SchemaError)
        if "round" in run:
            _int(run["round"], f"{where}.round")
    floors = [("$.params.floor", doc["params"].get("floor"))]
    if "rounds" in doc:
        rounds = doc["rounds"]
        if not isinstance(rounds, list) or not rounds:
            raise SchemaError("$.rounds: expected a non-empty list")
        for i, r in enumerate(rounds):
            _int(_dict(r, f"$.rounds[{i}]").get("round"), f"$.rounds[{i}].round")
            floors.append((f"$.rounds[{i}].floor", r.get("floor")))
    for where, floor in floors:
        if floor is not None:
            for cls, c in _dict(_dict(floor, where).get("classes"), f"{where}.classes").items():
                validate_class(c, f"{where}.classes.{cls}")
    json.dumps(doc, allow_nan=False)  # no NaN / Infinity anywhere


# ----------------------------------------------------------------------------------------------- markdown


def _f(value: Any, digits: int = 1) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _pct(value: Any) -> str:
    return "–" if value is None else f"{100 * value:.0f}%"


def _sweep_label(run: dict) -> str:
    return ", ".join(f"{k}={v:g}" if isinstance(v, (int, float)) else f"{k}={v}"
                     for k, v in (run.get("sweep") or {}).items())


def _ratio_cell(value: Any) -> str:
    """One ratio: a number, or over rounds its median (min-max)."""
    if isinstance(value, dict):
        return f"{value['median']:.2f} ({value['min']:.2f}-{value['max']:.2f})"
    return _f(value, 2)


def _slo_text(slo: dict) -> str | None:
    ls_slo = slo.get("LS", {})
    parts = [f"{label} {ls_slo[key]:.1f} ms" for key, label in (("ttft_ms", "TTFT"), ("tpot_ms", "TPOT"))
             if ls_slo.get(key) is not None]
    return " and ".join(parts) or None


def markdown(doc: dict) -> str:
    p = doc["params"]
    runs = doc["runs"]
    rounds = doc.get("rounds") or []
    sweeping = any(r.get("sweep") for r in runs)
    lines = [f"# Benchmark `{doc['scenario']}`", ""]
    facts = [f"duration {p.get('duration_s')} s of arrivals, drain cap {p.get('drain_cap_s')} s",
             f"seed {p.get('seed')}", f"target {p.get('target')}"]
    for cls, ci in (p.get("workload", {}).get("classes") or {}).items():
        facts.append(f"{cls}: {ci['count']} req, {ci['realized_rate']:.2f} req/s from {ci['trace']}, prompt "
                     f"{ci['prompt_range'][0]}–{ci['prompt_range'][1]} tok (mean {_f(ci.get('prompt_tokens_mean'), 0)}), "
                     f"output {ci['output_range'][0]}–{ci['output_range'][1]} tok (mean {_f(ci.get('max_tokens_mean'), 0)}); "
                     f"offered {_f(ci.get('offered_prompt_tok_s'), 0)} prompt + {_f(ci.get('offered_output_tok_s'), 0)} "
                     "output tok/s")
    if rounds:
        facts.append(f"{len(rounds)} rounds, each running every policy, the order rotated by one per round (" + "; ".join(f"{r['round']}: {', '.join(r.get('order') or [])}" for r in rounds)
                     + "); the idle floor and the LS SLO are each round's own")
    slo_text = _slo_text(p.get("slo", {}))
    if slo_text:
        facts.append(f"LS SLO{' (round 1)' if rounds else ''}: {slo_text} "
                     f"({p.get('slo', {}).get('LS', {}).get('source') or ''})")
    if len(rounds) > 1:
        facts.append("LS SLO by round: " + "; ".join(f"{r['round']}: {_slo_text(r.get('slo') or {}) or '–'}"
                                                     for r in rounds))
    lines += [f"- {x}" for x in facts] + [""]
    head = ["policy"] + (["round"] if rounds else []) + (["sweep"] if sweeping else []) + [
        "class", "n", "err", "cancel", "no token", "TTFT p50", "TTFT p90", "TTFT p99", "TPOT p50", "TPOT p99",
        "E2E p50", "E2E p99", "E2E mean", "SLO", "out tok/s"]
    # Results from before the cancel-time rule (their TTFT is over requests with a first token) say nothing.
    ttft_rule = " TTFT counts requests without a first token at their cancel time." if p.get(
        "ttft_counts_cancelled") else ""
    lines += ["Times in ms." + ttft_rule, "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def lead(label: str, round_no: Any, sweep: str) -> list[str]:
        return [label] + ([str(round_no)] if rounds else []) + ([sweep] if sweeping else [])

    def row(cells: list[str], cls: str, c: dict) -> str:
        cells = cells + [
            cls, str(c["count"]), str(c["errors"]), str(c.get("cancelled", 0)), str(c.get("without_first_token", 0)),
            _f(c["ttft_ms"]["p50"]), _f(c["ttft_ms"]["p90"]), _f(c["ttft_ms"]["p99"]),
            _f(c["tpot_ms"]["p50"]), _f(c["tpot_ms"]["p99"]), _f(c["e2e_ms"]["p50"]), _f(c["e2e_ms"]["p99"]),
            _f(c["e2e_ms"]["mean"]),
            _pct(c["slo_attainment"]), _f(c["output_tok_s"])]
        return "| " + " | ".join(cells) + " |"

    floors = [(r["round"], r.get("floor")) for r in rounds] if rounds else [("", p.get("floor"))]
    for round_no, floor in floors:
        if floor:
            for cls, c in floor["classes"].items():
                lines.append(row(lead(f"idle floor ({floor.get('policy')})", round_no, ""), cls, c))
    for run in runs:
        for cls in CLASSES:
            if cls in run["classes"]:
                lines.append(row(lead(run["policy"], run.get("round", ""), _sweep_label(run)), cls,
                                 run["classes"][cls]))
    extra = (["round"] if rounds else []) + (["sweep"] if sweeping else [])
    lines += ["", "| " + " | ".join(["policy", *extra, "total out tok/s"]) + " |", "|---|" + "---|" * (len(extra) + 1)]
    for run in runs:
        lines.append("| " + " | ".join(lead(run["policy"], run.get("round", ""), _sweep_label(run))
                                       + [_f(run["total_output_tok_s"])]) + " |")
    comp = doc.get("comparisons") or {}
    if comp.get("rows"):
        over = f"; median (min-max) over {comp['rounds']} rounds" if comp.get("rounds") else ""
        lines += ["", f"Ratios (baseline `{comp['baseline']}`; floor = idle LS{over}):", "",
                  "| policy" + (" | sweep" if sweeping else "") + " | LS TTFT p50 / floor | LS TTFT p99 / floor "
                  "| LS TTFT p50 / base | LS TTFT p99 / base | BE tok/s / base | total tok/s / base "
                  "| E2E mean / base | BE E2E mean / base | BE E2E p99 / base |",
                  "|---|" + ("---|" if sweeping else "") + "---|---|---|---|---|---|---|---|---|"]
        for r in comp["rows"]:
            lines.append(f"| {r['policy']}" + (f" | {_sweep_label(r)}" if sweeping else "") + " | "
                         + " | ".join(_ratio_cell(r[k]) for k in RATIO_KEYS) + " |")

    def run_label(run: dict) -> str:
        tags = ([f"round {run['round']}"] if run.get("round") else []) + ([_sweep_label(run)] if run.get("sweep")
                                                                        else [])
        return run["policy"] + (f" ({', '.join(tags)})" if tags else "")

    timing_runs = [r for r in runs if r.get("worker_timing")]
    if timing_runs:
        lines += ["", "Worker timing (from its histograms; ms). The last two columns give each preemption's latency "
                  "in layers of the very step it paused (1.0 = one decoder layer):", "",
                  "| policy | layer mean | layer p99 | preemptions | preemption latency p50 | p99 "
                  "| in layers p50 | in layers p99 |", "|---|---|---|---|---|---|---|---|"]
        for run in timing_runs:
            t = run["worker_timing"]
            layer, pre = t.get("layer") or {}, t.get("preemption_latency") or {}
            in_layers = t.get("preemption_latency_layers") or {}
            # The layers histogram is unitless; histogram_summary scales by 1000 for ms, undo it here.
            rel50 = in_layers["p50_ms"] / 1000 if in_layers else None
            rel99 = in_layers["p99_ms"] / 1000 if in_layers else None
            lines.append(f"| {run_label(run) if run.get('round') else run['policy']} | {_f(layer.get('mean_ms'), 2)} "
                         f"| {_f(layer.get('p99_ms'), 2)} "
                         f"| {_f(pre.get('count'), 0)} | {_f(pre.get('p50_ms'), 2)} | {_f(pre.get('p99_ms'), 2)} "
                         f"| {_f(rel50, 2)} | {_f(rel99, 2)} |")
    metric_runs = [r for r in runs if r.get("worker_metrics")]
    if metric_runs:
        lines += ["", "Worker metrics (change over the run; counters only):", ""]
        for run in metric_runs:
            shown = {k: v for k, v in run["worker_metrics"].items() if v}
            lines.append(f"- {run_label(run)}: " + (", ".join(f"`{k}` {v:g}" for k, v in list(shown.items())[:24])
                                                   or "no counter changed"))
    from bench.agent.summary import markdown as agent_markdown

    return "\n".join(lines) + "\n" + agent_markdown(doc)


# ----------------------------------------------------------------------------------------------- plots


def _cdf(values: Sequence[float]) -> tuple[list[float], list[float]]:
    xs = sorted(values)
    n = len(xs)
    return xs, [(i + 1) / n for i in range(n)]


def _floors(floor_records) -> dict[str, Sequence[RequestRecord]]:
    """Floor records by label: {label: records} (one per round), or one list (labelled "idle floor")."""
    if not floor_records:
        return {}
    return dict(floor_records) if isinstance(floor_records, dict) else {"idle floor": floor_records}


def plot_ttft_cdf(path: str | os.PathLike, doc: dict, records: dict[str, Sequence[RequestRecord]],
                  floor_records=None) -> None:
    """One panel per class, one line per run (key = run label); floor_records: as _floors takes them.
    Requests that never got a token are the gap between the line's top and 1."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    classes = [c for c in CLASSES if any(r.cls == c for recs in records.values() for r in recs)]
    fig, axes = plt.subplots(1, max(1, len(classes)), figsize=(6 * max(1, len(classes)), 4.2), squeeze=False)
    for ax, cls in zip(axes[0], classes):
        series = list(records.items())
        floors = _floors(floor_records)
        if cls == "LS":
            series = list(floors.items()) + series
        for label, recs in series:
            recs = [r for r in recs if r.cls == cls]
            ttft = [r.ttft_s * 1000 for r in recs if r.ttft_s is not None]
            if not ttft:
                continue
            xs, ys = _cdf(ttft)
            ys = [y * len(ttft) / len(recs) for y in ys]
            is_floor = label in floors
            ax.step(xs, ys, where="post", label=label, linestyle="--" if is_floor else "-",
                    color="black" if is_floor else None)
        slo = (doc["params"].get("slo", {}).get(cls) or {}).get("ttft_ms")
        if slo:
            ax.axvline(slo, color="red", linewidth=0.8, linestyle=":", label=f"SLO {slo:.0f} ms")
        ax.set_xscale("log")
        ax.set_xlabel("TTFT (ms, log)")
        ax.set_ylabel("fraction of requests")
        ax.set_ylim(0, 1.02)
        ax.set_title(f"{doc['scenario']}: {cls} TTFT CDF")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def sweep_series(doc: dict, key: str, policy: str, figure) -> tuple[list, list, list, list]:
    """x values and, per x, the median, min and max over rounds of figure(run) for one policy's sweep runs."""
    by_x: dict = {}
    for r in doc["runs"]:
        if r["policy"] == policy and key in (r.get("sweep") or {}):
            v = figure(r)
            if v is not None:
                by_x.setdefault(r["sweep"][key], []).append(v)
    xs = sorted(by_x)
    return (xs, [statistics.median(by_x[x]) for x in xs], [min(by_x[x]) for x in xs], [max(by_x[x]) for x in xs])


def plot_sweep(path: str | os.PathLike, doc: dict, key: str) -> None:
    """LS SLO attainment and BE output throughput against the swept parameter, one line per policy: with
    --repeat the median over rounds, the bars spanning min to max."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    policies = list(dict.fromkeys(r["policy"] for r in doc["runs"]))
    for policy in policies:
        for ax, cls, field in ((ax1, "LS", "slo_attainment"), (ax2, "BE", "output_tok_s")):
            xs, med, lo, hi = sweep_series(doc, key, policy, lambda r: _get(r, cls, field))
            if xs:
                ax.errorbar(xs, med, yerr=[[m - a for m, a in zip(med, lo)], [b - m for m, b in zip(med, hi)]],
                            marker="o", capsize=3, label=policy)
    ax1.set_xlabel(key)
    ax1.set_ylabel("LS SLO attainment (TTFT and TPOT)")
    ax1.set_ylim(0, 1.02)
    ax1.set_title("LS SLO attainment")
    ax2.set_xlabel(key)
    ax2.set_ylabel("BE output tokens/s")
    ax2.set_title("BE throughput")
    for ax in (ax1, ax2):
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------- writing


def write(out_dir: str | os.PathLike, name: str, doc: dict, records: dict[str, Sequence[RequestRecord]],
          floor_records=None, sweep_key: str | None = None, save_requests: bool = True,
          plots: bool = True) -> list[Path]:
    """Writes name.json, name.md, (optionally) the plots and name.requests.jsonl; returns the paths.
    floor_records: one list, or {label: records} with one floor per round."""
    validate(doc)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = [out / f"{name}.json", out / f"{name}.md"]
    written[0].write_text(json.dumps(doc, indent=2, allow_nan=False) + "\n")
    written[1].write_text(markdown(doc))
    if save_requests:
        path = out / f"{name}.requests.jsonl"
        with open(path, "w") as f:
            for label, recs in list(_floors(floor_records).items()) + list(records.items()):
                for r in recs:
                    f.write(json.dumps({"run": label, **r.to_dict()}) + "\n")
        written.append(path)
    if not plots:
        return written
    cdf = out / f"{name}-ttft-cdf.png"
    plot_ttft_cdf(cdf, doc, records, floor_records)
    written.append(cdf)
    from bench.agent.summary import plot_pinned

    pinned = out / f"{name}-pinned-kv.png"
    if plot_pinned(pinned, doc):
        written.append(pinned)
    if sweep_key:
        sweep = out / f"{name}-sweep.png"
        plot_sweep(sweep, doc, sweep_key)
        written.append(sweep)
    return written
