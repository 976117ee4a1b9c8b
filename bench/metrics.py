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


def _fetch(url: str, timeout_s: float) -> str:
    with urllib.request.urlopen(url, timeout=timeout_s) as resp:  # noqa: S310 (local metrics endpoint)
        return resp.read().decode("utf-8", "replace")


async def scrape(url: str, timeout_s: float = 2.0) -> dict[str, float] | None:
    """None when the endpoint is not there (metrics off, an older worker)."""
    try:
        return parse(await asyncio.to_thread(_fetch, url, timeout_s))
    except (OSError, ValueError):
        return None
