"""Quantiles read off the worker's Prometheus histograms, against a known distribution."""

import numpy as np
import pytest

from bench import metrics


def exposition(name: str, values: list[float], bounds: list[float]) -> dict[str, float]:
    out = {}
    for b in bounds:
        out[f'{name}_bucket{{le="{b}"}}'] = float(sum(v <= b for v in values))
    out[f'{name}_bucket{{le="+Inf"}}'] = float(len(values))
    out[f"{name}_count"] = float(len(values))
    out[f"{name}_sum"] = float(sum(values))
    return out


def test_histogram_summary_matches_known_values():
    rng = np.random.default_rng(0)
    values = list(rng.uniform(0.001, 0.011, size=2000))
    bounds = [i / 1000 for i in range(1, 13)]
    summary = metrics.histogram_summary({}, exposition("h", values, bounds), "h")
    assert summary["count"] == 2000
    assert summary["mean_ms"] == pytest.approx(1000 * np.mean(values))
    for key, q in (("p50_ms", 50), ("p90_ms", 90), ("p99_ms", 99)):
        assert summary[key] == pytest.approx(1000 * np.percentile(values, q), abs=0.2)


def test_histogram_summary_subtracts_the_before_scrape():
    bounds = [0.001, 0.002, 0.004]
    before = exposition("h", [0.0035] * 100, bounds)
    after = exposition("h", [0.0035] * 100 + [0.0015] * 10, bounds)
    summary = metrics.histogram_summary(before, after, "h")
    assert summary["count"] == 10 and 1.0 <= summary["p99_ms"] <= 2.0


def test_histogram_summary_none_without_samples():
    assert metrics.histogram_summary({}, {}, "h") is None
