"""What an agent run adds to the result document and its report: JCT over completed programs, programs/s, the
share of prompt tokens served from pinned KV, pinned KV over time, JCT ratios between pin policies; the
Markdown section, the plot, the schema check and the per-program file."""

from __future__ import annotations

import json
import math
from typing import Sequence

from bench.agent.driver import ProgramRecord
from bench.stats import distribution_ms, measured_window_s


def summarize_programs(programs: Sequence[ProgramRecord], samples: Sequence[dict] | None = None) -> dict:
    """What an agent run adds to the usual per-class figures: JCT over completed programs, programs/s, the
    share of prompt tokens served from pinned KV, and the pinned KV over time."""
    turns = [t for p in programs for t in p.turns]
    jct = [p.jct_s for p in programs if p.jct_s is not None]
    window = measured_window_s(turns)
    prompt = sum(t.server_prompt_tokens or 0 for t in turns if t.completed)
    cached = sum(t.cached_prompt_tokens or 0 for t in turns if t.completed)
    ended: dict[str, int] = {}
    for p in programs:
        if not p.completed:
            key = p.ended.split(":")[0] if p.ended else "incomplete"
            ended[key] = ended.get(key, 0) + 1
    pinned = [s["pinned_tokens"] for s in samples or ()]
    return {
        "jct_ms": distribution_ms(jct),
        "programs": {"count": len(programs), "completed": len(jct), "incomplete": len(programs) - len(jct),
                     "ended": ended},
        "programs_per_s": len(jct) / window if window > 0 else 0.0,
        "turns_completed": sum(t.completed for t in turns),
        "prompt_tokens": prompt, "cached_prompt_tokens": cached,
        "prefix_hit_share": cached / prompt if prompt else None,
        "pinned_kv": {"samples": list(samples or ()),
                      "max_tokens": max(pinned) if pinned else None,
                      "mean_tokens": sum(pinned) / len(pinned) if pinned else None},
    }


#: the ratios the report shows: (numerator policy, denominator policy)
RATIOS = (("no-pin", "ttl"), ("ttl", "pin-forever"), ("fixed-ttl", "ttl"))


def ratios(runs: Sequence[dict]) -> list[dict]:
    """Mean and p99 JCT of one policy over another's, for the pairs in RATIOS present in these runs (one
    round's: a policy's last run counts)."""
    by = {r["policy"]: r for r in runs if r.get("jct_ms") and not r.get("sweep")}
    out = []
    for a, b in RATIOS:
        if a in by and b in by:
            row = {"ratio": f"{a} / {b}"}
            for q in ("mean", "p50", "p99"):
                x, y = by[a]["jct_ms"].get(q), by[b]["jct_ms"].get(q)
                row[f"jct_{q}"] = x / y if x is not None and y else None
            out.append(row)
    return out


def ratios_over_rounds(per_round: Sequence[Sequence[dict]]) -> list[dict]:
    """The rounds' ratios() in one: each JCT ratio's spread (median, min, max) over the rounds."""
    from bench.report import spread

    by_ratio: dict[str, dict[str, list]] = {}
    for rows in per_round:
        for row in rows:
            acc = by_ratio.setdefault(row["ratio"], {})
            for key, value in row.items():
                if key != "ratio":
                    acc.setdefault(key, []).append(value)
    return [{"ratio": name, **{k: spread(v) for k, v in acc.items()}} for name, acc in by_ratio.items()]


def finish_document(doc: dict) -> None:
    """doc["jct_ratios"]: the run's; with rounds, each round's in its entry of doc["rounds"] and their spread."""
    if not doc.get("rounds"):
        doc["jct_ratios"] = ratios(doc["runs"])
        return
    per_round = []
    for entry in doc["rounds"]:
        entry["jct_ratios"] = ratios([r for r in doc["runs"] if r.get("round") == entry["round"]])
        per_round.append(entry["jct_ratios"])
    doc["jct_ratios"] = ratios_over_rounds(per_round)


def _ratio_cell(v) -> str:
    if isinstance(v, dict):
        return f"{v['median']:.2f} ({v['min']:.2f}-{v['max']:.2f})"
    return _f(v, 2)


def _f(v, digits: int = 1) -> str:
    if v is None:
        return "–"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def markdown(doc: dict) -> str:
    """The agent section of the report (empty when no run carries jct_ms)."""
    runs = [r for r in doc.get("runs", []) if r.get("jct_ms")]
    if not runs:
        return ""
    lines = ["", "Agent programs (JCT = first turn sent to last turn finished; s; hit share = prompt tokens served "
             "from pinned KV / prompt tokens):", "",
             "| policy | programs | done | JCT p50 | JCT p99 | JCT mean | turn TTFT p50 (ms) | turn TTFT p99 (ms) "
             "| hit share | pinned KV mean | pinned KV max | programs/s | out tok/s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        j = r["jct_ms"]
        cls = next(iter(r.get("classes", {}).values()), {})
        ttft = cls.get("ttft_ms", {})
        pk = r.get("pinned_kv", {})
        hit = r.get("prefix_hit_share")
        label = r["policy"] + (" " + json.dumps(r["sweep"]) if r.get("sweep") else "") + (
            f" (round {r['round']})" if r.get("round") else "")
        lines.append(
            f"| {label} | {r['programs']['count']} "
            f"| {r['programs']['completed']} | {_f(_s(j['p50']))} | {_f(_s(j['p99']))} | {_f(_s(j['mean']))} "
            f"| {_f(ttft.get('p50'), 0)} | {_f(ttft.get('p99'), 0)} | {'–' if hit is None else f'{100 * hit:.0f}%'} "
            f"| {_f(pk.get('mean_tokens'), 0)} | {_f(pk.get('max_tokens'))} | {_f(r.get('programs_per_s'), 3)} "
            f"| {_f(r.get('total_output_tok_s'))} |")
    rows = doc["jct_ratios"] if "jct_ratios" in doc else ratios(doc["runs"])
    if rows:
        over = f" (median (min-max) over {len(doc['rounds'])} rounds)" if doc.get("rounds") else ""
        lines += ["", f"| JCT ratio{over} | mean | p50 | p99 |", "|---|---|---|---|"]
        for row in rows:
            lines.append(f"| {row['ratio']} | {_ratio_cell(row['jct_mean'])} | {_ratio_cell(row['jct_p50'])} "
                         f"| {_ratio_cell(row['jct_p99'])} |")
    return "\n".join(lines) + "\n"


def _s(ms):
    return None if ms is None else ms / 1000.0


def plot_pinned(path, doc: dict) -> bool:
    """Memory held by pins over time, one line per run; False (nothing written) when no run has samples."""
    runs = [r for r in doc.get("runs", []) if (r.get("pinned_kv") or {}).get("samples")]
    if not runs:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.2))
    capacity = 0
    for r in runs:
        s = r["pinned_kv"]["samples"]
        ax.plot([x["t_s"] for x in s], [x["pinned_tokens"] for x in s], label=r["policy"], linewidth=1.2)
        capacity = max(capacity, max(x.get("capacity_tokens", 0) for x in s))
    if capacity:
        ax.axhline(capacity, color="grey", linestyle=":", linewidth=0.8, label=f"KV capacity {capacity}")
    ax.set_xlabel("time since the first program (s)")
    ax.set_ylabel("KV tokens held by pins")
    ax.set_title(f"{doc.get('scenario', 'agent')}: memory held by pins")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def validate_run(run: dict, where: str, error=ValueError) -> None:
    """The agent fields of one run (report.validate calls this for runs that carry jct_ms)."""
    j = run.get("jct_ms")
    if not isinstance(j, dict):
        raise error(f"{where}.jct_ms: expected an object")
    for k in ("p50", "p99", "mean"):
        if k not in j:
            raise error(f"{where}.jct_ms.{k}: missing")
        v = j[k]
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0):
            raise error(f"{where}.jct_ms.{k}: expected a number >= 0 or null, got {v!r}")
    p = run.get("programs")
    if not isinstance(p, dict) or not all(isinstance(p.get(k), int) for k in ("count", "completed", "incomplete")):
        raise error(f"{where}.programs: expected count, completed, incomplete")
    hit = run.get("prefix_hit_share")
    if hit is not None and not (isinstance(hit, (int, float)) and 0 <= hit <= 1):
        raise error(f"{where}.prefix_hit_share: expected a share in [0, 1] or null, got {hit!r}")
    if not isinstance((run.get("pinned_kv") or {}).get("samples"), list):
        raise error(f"{where}.pinned_kv.samples: expected a list")


def write_programs(path, records: dict[str, Sequence[ProgramRecord]]) -> None:
    """One line per program and run (JCT, how it ended), for figures not computed here."""
    with open(path, "w") as f:
        for label, recs in records.items():
            for r in recs:
                f.write(json.dumps({"run": label, **r.to_dict()}) + "\n")
