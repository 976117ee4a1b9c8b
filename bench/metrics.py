"""Worker metrics from its Prometheus endpoint, scraped before and after a run; the report keeps the change of
every counter-like series (`*_total`, histogram `*_sum` / `*_count`) of qllm's own metrics."""

from __future__ import annotations

import asyncio
import re
import urllib.request

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*(?:\{.*\})?)\s+(\S+)(?:\s+\S+)?$")
_SKIP_PREFIXES = ("python_", "process_", "promhttp_")


def parse(text: str) -> dict[str, float]:
    """Prometheus text exposition -> {"name{labels}": value}."""
    out = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        if m:
            try:
                out[m.group(1)] = float(m.group(2))
            except ValueError:
                continue
    return out


def _base_name(series: str) -> str:
    return series.split("{", 1)[0]


def counter_deltas(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    deltas = {}
    for series, value in after.items():
        name = _base_name(series)
        if name.startswith(_SKIP_PREFIXES) or name.endswith("_created"):
            continue
        if name.endswith(("_total", "_sum", "_count")):
            deltas[series] = value - before.get(series, 0.0)
    return dict(sorted(deltas.items()))


def bucket_deltas(before: dict[str, float], after: dict[str, float], name: str) -> list[tuple[float, float]]:
    """(upper bound in seconds, cumulative count) of histogram `name` over the run, summed over label sets."""
    prefix = name + "_bucket{"
    totals: dict[float, float] = {}
    for series, value in after.items():
        if not series.startswith(prefix):
            continue
        le = re.search(r'le="([^"]+)"', series)
        if le is None:
            continue
        bound = float(le.group(1))
        totals[bound] = totals.get(bound, 0.0) + value - before.get(series, 0.0)
    return sorted(totals.items())


def histogram_summary(before: dict[str, float], after: dict[str, float], name: str) -> dict | None:
    """Count, mean and bucket-interpolated p50/p90/p99 (in ms) of a Prometheus histogram over the run."""
    buckets = bucket_deltas(before, after, name)
    count = sum(v - before.get(k, 0.0) for k, v in after.items() if k.split("{")[0] == name + "_count")
    total = sum(v - before.get(k, 0.0) for k, v in after.items() if k.split("{")[0] == name + "_sum")
    if not buckets or count <= 0:
        return None
    out = {"count": count, "mean_ms": 1000 * total / count}
    for label, q in (("p50_ms", 0.5), ("p90_ms", 0.9), ("p99_ms", 0.99)):
        out[label] = 1000 * _quantile(buckets, q * count)
    return out


def _quantile(buckets: list[tuple[float, float]], rank: float) -> float:
    """Linear interpolation inside the bucket that holds `rank` (as Prometheus' histogram_quantile)."""
    lower_bound, lower_count = 0.0, 0.0
    for bound, cumulative in buckets:
        if cumulative >= rank:
            if bound == float("inf"):
                return lower_bound
            width = cumulative - lower_count
            return lower_bound + (bound - lower_bound) * ((rank - lower_count) / width if width else 1.0)
        lower_bound, lower_count = bound, cumulative
    return lower_bound


def _fetch(url: str, timeout_s: float) -> str:
    with urllib.request.urlopen(url, timeout=timeout_s) as resp:  # noqa: S310 (local metrics endpoint)
        return resp.read().decode("utf-8", "replace")


async def scrape(url: str, timeout_s: float = 2.0) -> dict[str, float] | None:
    """None when the endpoint is not there (metrics off, an older worker)."""
    try:
        return parse(await asyncio.to_thread(_fetch, url, timeout_s))
    except (OSError, ValueError):
        return None


async def scrape_all(urls: list[str]) -> list[dict | None]:
    return [await scrape(u) for u in urls]


# Histograms whose distribution the report shows: a decoder layer's time in steps with BE work, and the
# preemption latency (LS arrival at the worker until the BE step parked).
TIMING_HISTOGRAMS = {"layer": "qllm_worker_layer_seconds",
                     "preemption_latency": "qllm_worker_preemption_latency_seconds",
                     "preemption_latency_layers": "qllm_worker_preemption_latency_layers"}


def worker_timing(before: list[dict | None], after: list[dict | None]) -> dict | None:
    """Per histogram: count, mean and p50/p90/p99 in ms (first worker that has it; one worker per bench)."""
    out = {}
    for b, a in zip(before, after):
        if a is None:
            continue
        for key, name in TIMING_HISTOGRAMS.items():
            if key not in out:
                summary = histogram_summary(b or {}, a, name)
                if summary is not None:
                    out[key] = summary
    return out or None


def counter_totals(before: list[dict | None], after: list[dict | None]) -> dict | None:
    """The change of every counter over the run, summed over the workers that answered (None: none did)."""
    total: dict[str, float] = {}
    seen = False
    for b, a in zip(before, after):
        if a is None:
            continue
        seen = True
        for key, value in counter_deltas(b or {}, a).items():
            total[key] = total.get(key, 0.0) + value
    return total if seen else None
