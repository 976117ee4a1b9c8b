"""The headline table: a few ratios from each of several committed results, each the median over its rounds
with the min-max range, so that the figures a reader quotes are generated from the data like every other
table (`<!-- bench-headline: results/a.json results/b.json -->` blocks, bench/report_command.py).

Per `qllm bench` result, for each policy against the result's baseline: LS TTFT p50 and p99 and LS E2E
mean as baseline / policy (how many times faster), BE and total output tok/s as policy / baseline, E2E mean
of all requests as baseline / policy. For every policy, the baseline too, against its round's idle floor:
LS TTFT p50, TPOT p50 and E2E mean over the floor's, TTFT p99 and TPOT p99 over the floor's p50 (how
issue 15's targets are written), and LS SLO attainment. Per agent result its JCT ratios; per side-by-side
(scripts/peer_vllm.py) result qllm / vLLM per dtype. Every ratio is computed per round, then summarised,
so an inverted ratio's median and range are those of the inverted per-round values.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from bench.report import spread

# (comparison key, label, invert): invert = the baseline over the policy, read "x times faster".
POLICY_FIGURES: tuple[tuple[str, str, bool], ...] = (
    ("ls_ttft_p50_vs_baseline", "LS TTFT p50, {base} / {policy}", True),
    ("ls_ttft_p99_vs_baseline", "LS TTFT p99, {base} / {policy}", True),
    ("ls_ttft_p50_vs_floor", "LS TTFT p50, {policy} / idle floor", False),
    ("be_output_tok_s_vs_baseline", "BE output tok/s, {policy} / {base}", False),
    ("total_output_tok_s_vs_baseline", "total output tok/s, {policy} / {base}", False),
    ("e2e_mean_vs_baseline", "E2E mean (all requests), {base} / {policy}", True),
)
# (LS figure, its stat, the idle floor's stat, label): the issue-15 targets are written against the floor's p50.
FLOOR_FIGURES: tuple[tuple[str, str, str, str], ...] = (
    ("ttft_ms", "p99", "p50", "LS TTFT p99, {policy} / idle floor p50"),
    ("tpot_ms", "p50", "p50", "LS TPOT p50, {policy} / idle floor"),
    ("tpot_ms", "p99", "p50", "LS TPOT p99, {policy} / idle floor p50"),
    ("e2e_ms", "mean", "mean", "LS E2E mean, {policy} / idle floor"),
)
PEER_FIGURES: tuple[tuple[str, str, bool], ...] = (
    ("idle_ls_ttft_p50_ms", "idle LS TTFT p50, qllm / vLLM ({dtype})", False),
    ("idle_ls_tpot_p50_ms", "idle LS TPOT p50, qllm / vLLM ({dtype})", False),
    ("be_output_tok_s", "BE output tok/s under the load, qllm / vLLM ({dtype})", False),
    ("ls_ttft_p99_ms", "LS TTFT p99 under the load, vLLM / qllm ({dtype})", True),
)


def _fmt(v: float, digits: int) -> str:
    return f"{v:.{digits}f}"


def _cells(values: list[float | None]) -> tuple[str, str, str]:
    """median, range (n) and the per-round values, in round order ("–" where a round has none)."""
    s = spread(values)
    digits = 2 if s["median"] < 100 else 0
    rounds = " / ".join("–" if v is None else _fmt(v, digits) for v in values)
    return _fmt(s["median"], digits), f"{_fmt(s['min'], digits)}-{_fmt(s['max'], digits)} (n={s['n']})", rounds


def _inverse(v: float | None) -> float | None:
    return None if v is None or v == 0 else 1.0 / v


def _same(v):
    return v


def _per_round(doc: dict, policy: str, key: str, fn: Callable[[Any], Any]) -> list:
    """A comparison ratio in each round (fn applied to each round's value)."""
    rounds = doc.get("rounds") or []
    comps = [r.get("comparisons") for r in rounds] if rounds else [doc.get("comparisons")]
    values = []
    for comp in comps:
        for row in (comp or {}).get("rows") or []:
            if row["policy"] == policy and not row.get("sweep"):
                values.append(fn(row.get(key)))
    return values


def _ls_ratio(doc: dict, policy: str, figure: str, stat: str, against: str | None,
              against_stat: str | None = None) -> list:
    """In each round, an LS figure of the policy's run over the same figure (its `against_stat`, default the
    same stat) of that round's idle floor (against=None) or of the `against` policy's run."""
    rounds = doc.get("rounds") or [{"round": None, "floor": (doc.get("params") or {}).get("floor")}]

    def ls(run: dict | None, which: str = stat) -> float | None:
        return ((((run or {}).get("classes") or {}).get("LS") or {}).get(figure) or {}).get(which)

    def run_of(name: str, round_no) -> dict | None:
        return next((r for r in doc.get("runs") or [] if r["policy"] == name and r.get("round") == round_no
                     and not r.get("sweep")), None)

    values = []
    for entry in rounds:
        a = ls(run_of(policy, entry.get("round")))
        other = entry.get("floor") if against is None else run_of(against, entry.get("round"))
        b = ls(other, against_stat or stat)
        values.append(a / b if a is not None and b else None)
    return values


def _slo_attainment(doc: dict, policy: str) -> list:
    return [((r.get("classes") or {}).get("LS") or {}).get("slo_attainment") for r in doc.get("runs") or []
            if r["policy"] == policy and not r.get("sweep")]


def _bench_rows(doc: dict) -> list[tuple[str, list]]:
    comp = doc.get("comparisons") or {}
    base = comp.get("baseline")
    rows: list[tuple[str, list]] = []

    def add(label: str, values: list) -> None:
        if any(v is not None for v in values):
            rows.append((label, values))

    for row in comp.get("rows") or []:
        policy = row["policy"]
        if row.get("sweep"):
            continue
        if policy != base:
            for key, label, invert in POLICY_FIGURES:
                add(label.format(base=base, policy=policy), _per_round(doc, policy, key, _inverse if invert else _same))
            add(f"LS E2E mean, {base} / {policy}", _ls_ratio(doc, base, "e2e_ms", "mean", policy))
        else:
            add(f"LS TTFT p50, {policy} / idle floor", _per_round(doc, policy, "ls_ttft_p50_vs_floor", _same))
        for figure, stat, floor_stat, label in FLOOR_FIGURES:
            add(label.format(policy=policy), _ls_ratio(doc, policy, figure, stat, None, floor_stat))
        add(f"LS SLO attainment (TTFT and TPOT), {policy}", _slo_attainment(doc, policy))
    per_round = [r.get("jct_ratios") or [] for r in doc.get("rounds") or []] or [doc.get("jct_ratios") or []]
    for ratio in doc.get("jct_ratios") or []:
        add(f"JCT mean, {ratio['ratio']}", [next((x.get("jct_mean") for x in rows_ if x["ratio"] == ratio["ratio"]),
                                                 None) for rows_ in per_round])
    return rows


def _peer_rows(doc: dict) -> list[tuple[str, list]]:
    rows = []
    for dtype in doc.get("summary") or {}:
        mine = [r for r in doc.get("rounds") or [] if r.get("dtype") == dtype]
        for key, label, invert in PEER_FIGURES:
            values = [(_inverse if invert else _same)((r.get("ratio") or {}).get(key)) for r in mine]
            if any(v is not None for v in values):
                rows.append((label.format(dtype=dtype), values))
    return rows


def _source(doc: dict) -> str:
    p = doc.get("params") or {}
    rounds = p.get("repeat") or p.get("rounds") or len(doc.get("rounds") or []) or 1
    return f"{rounds} round{'s' if rounds != 1 else ''}, seed {p.get('seed')}, commit {p.get('git_commit') or '?'}"


def markdown(docs: list[tuple[str, dict]]) -> str:
    """The headline table of (path as written in the marker, result document) pairs, in that order."""
    lines = ["| result | figure | median | range over rounds | each round |", "|---|---|---|---|---|"]
    for path, doc in docs:
        rows = _peer_rows(doc) if "summary" in doc and "rounds" in doc and "runs" not in doc else _bench_rows(doc)
        name = f"`{Path(path).name}` ({_source(doc)})"
        for label, values in rows:
            lines.append(f"| {name} | {label} | " + " | ".join(_cells(values)) + " |")
            name = ""
    return "\n".join(lines) + "\n"
