"""LS TTFT under load against the idle floor's TTFT for the same prompt lengths, from a bench request log.

  .venv/bin/python scripts/ttft_vs_prompt.py REQUESTS.jsonl [--policy qllm] [--extract OUT.jsonl]

Issue 15 bounds the loaded LS TTFT p99 by 2x the idle floor's TTFT p50. The floor's 20 requests and a run's LS
requests draw prompts from the same lengths, but the p99 of a run's ~74 LS requests is within one request of the
slowest, and the slowest prompts prefill longest even on an idle worker. Per round this fits the floor's TTFT
against prompt tokens (least squares), then prints: the loaded LS TTFT p99 against the floor's p50; the p99 the
fit alone gives for the loaded run's prompts (the part of the ratio no scheduler removes); each loaded request's
excess over the fit; and, for the slowest three, the other LS requests that arrived in the 150 ms before them.

REQUESTS.jsonl is `NAME.requests.jsonl` from `qllm bench` without `--summary-only`. TTFT and percentiles are the
bench's own (bench/stats.py: from the send, interpolated between ranks). `--extract` writes only the LS rows'
fields this script reads, small enough for docs/results/.
"""

from __future__ import annotations

import argparse
import json
import statistics

from bench.stats import percentile

FIELDS = ("run", "cls", "arrival_s", "sent_s", "prompt_tokens", "first_token_s")


def ttft_ms(row: dict) -> float | None:
    """As bench/stats.py's RequestRecord.ttft_s, in ms."""
    if row.get("sent_s") is None or row.get("first_token_s") is None:
        return None
    return 1e3 * (row["first_token_s"] - row["sent_s"])


def round_of(run: str) -> str:
    """'idle floor r2' -> 'r2'; a single-round run is named without a round ('qllm', 'idle floor')."""
    last = run.split()[-1]
    return last if last[:1] == "r" and last[1:].isdigit() else ""


def report(rows: list[dict], policy: str) -> None:
    for rnd in sorted({round_of(r["run"]) for r in rows}):
        def named(base: str) -> list[dict]:
            name = f"{base} {rnd}".strip()
            return [r for r in rows if r["run"] == name and r["cls"] == "LS" and ttft_ms(r) is not None]

        floor, loaded = named("idle floor"), named(policy)
        if len(floor) < 2 or not loaded:
            continue
        xs, ys = [r["prompt_tokens"] for r in floor], [ttft_ms(r) for r in floor]
        try:
            slope, intercept = statistics.linear_regression(xs, ys)
        except statistics.StatisticsError:  # every floor prompt of one length: no slope to fit
            slope, intercept = 0.0, statistics.mean(ys)
        p50 = statistics.median(ys)
        got = [ttft_ms(r) for r in loaded]
        fit = [intercept + slope * r["prompt_tokens"] for r in loaded]
        excess = [g - f for g, f in zip(got, fit)]
        print(f"{rnd or 'the run'}: floor {len(floor)} requests, TTFT p50 {p50:.1f} ms, slowest {max(ys) / p50:.2f}x "
              f"its p50; fit {intercept:.1f} ms + {slope:.3f} ms per prompt token")
        print(f"  {policy} LS, {len(loaded)} requests: TTFT p50 {statistics.median(got):.1f} ms, p99 {percentile(got, 99):.1f} ms "
              f"= {percentile(got, 99) / p50:.2f}x the floor's p50")
        print(f"  the fit for the same prompts: p99 {percentile(fit, 99):.1f} ms = {percentile(fit, 99) / p50:.2f}x the "
              f"floor's p50 (longest prompt {max(r['prompt_tokens'] for r in loaded)} tokens)")
        print(f"  excess over the fit: p50 {statistics.median(excess):+.1f}, p90 {percentile(excess, 90):+.1f}, "
              f"p99 {percentile(excess, 99):+.1f} ms")
        for r in sorted(loaded, key=lambda r: -ttft_ms(r))[:3]:
            before = [(round(1e3 * (r["arrival_s"] - o["arrival_s"])), o["prompt_tokens"]) for o in loaded
                      if o is not r and 0 <= r["arrival_s"] - o["arrival_s"] <= 0.15]
            print(f"  slow: TTFT {ttft_ms(r):.0f} ms, prompt {r['prompt_tokens']}, fit "
                  f"{intercept + slope * r['prompt_tokens']:.0f} ms; LS arrivals in the 150 ms before it "
                  f"(ms earlier, prompt tokens): {before or 'none'}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("requests")
    p.add_argument("--policy", default="qllm")
    p.add_argument("--extract", help="write the LS rows' fields this script reads to this JSONL file")
    args = p.parse_args()
    with open(args.requests, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    if args.extract:
        with open(args.extract, "w", encoding="utf-8") as out:
            for r in rows:
                if r["cls"] == "LS":
                    out.write(json.dumps({k: r.get(k) for k in FIELDS}) + "\n")
    report(rows, args.policy)


if __name__ == "__main__":
    main()
