import math
import random

import numpy as np
import pytest

from bench.stats import RequestRecord, class_summary, distribution_ms, percentile, summarize


@pytest.mark.parametrize("n", [1, 2, 3, 10, 101, 1000])
def test_percentile_matches_numpy(n):
    rng = random.Random(n)
    xs = [rng.lognormvariate(0, 2) for _ in range(n)]
    for q in (0, 1, 25, 50, 90, 99, 99.9, 100):
        assert percentile(xs, q) == pytest.approx(float(np.percentile(xs, q)), rel=1e-12, abs=1e-12)


def test_percentile_known_values():
    assert percentile([1, 2, 3, 4], 50) == 2.5
    assert percentile([5, 1, 3], 0) == 1
    assert percentile([5, 1, 3], 100) == 5
    assert percentile(list(range(1, 101)), 99) == pytest.approx(99.01)
    assert math.isnan(percentile([], 50))
    with pytest.raises(ValueError):
        percentile([1], 101)


def test_distribution_ms_and_empty():
    d = distribution_ms([0.001, 0.002, 0.003])
    assert d == {"p50": 2.0, "p90": pytest.approx(2.8), "p99": pytest.approx(2.98), "mean": pytest.approx(2.0)}
    assert distribution_ms([]) == {"p50": None, "p90": None, "p99": None, "mean": None}


def _rec(i, cls, sent, first, n, tpot, **kw):
    times = [first + k * tpot for k in range(n)]
    return RequestRecord(index=i, cls=cls, arrival_s=sent, prompt_tokens=10, max_tokens=n, sent_s=sent,
                         first_token_s=first if n else None, token_times_s=times,
                         finished_s=kw.pop("finished", times[-1] if times else sent), **kw)


def test_request_figures():
    r = _rec(0, "LS", 1.0, 1.1, 11, 0.02)
    assert r.ttft_s == pytest.approx(0.1)
    assert r.tpot_s == pytest.approx(0.02)
    assert r.e2e_s == pytest.approx(0.3)
    one = _rec(1, "LS", 0.0, 0.05, 1, 0.0)
    assert one.tpot_s is None and one.e2e_s == pytest.approx(0.05)


def test_class_summary_counts_failures_against_slo():
    recs = [
        _rec(0, "LS", 0.0, 0.1, 5, 0.01),  # meets a 150 ms SLO
        _rec(1, "LS", 0.0, 0.2, 5, 0.01),  # misses it
        _rec(2, "LS", 0.0, 0.05, 3, 0.01, cancelled=True),  # fast first token, cancelled: a miss
        _rec(3, "LS", 0.0, 0.0, 0, 0.0, error="UNAVAILABLE: down"),  # never got a token
    ]
    s = class_summary(recs, window_s=2.0, ttft_slo_ms=150)
    assert s["count"] == 4 and s["errors"] == 1 and s["cancelled"] == 1 and s["completed"] == 2
    assert s["without_first_token"] == 1
    assert s["slo_attainment"] == pytest.approx(0.25)
    # TTFT over requests that got a token (3), TPOT/E2E over completed ones (2)
    assert s["ttft_ms"]["p50"] == pytest.approx(100.0)
    assert s["e2e_ms"]["mean"] == pytest.approx((140 + 240) / 2)
    assert s["output_tokens"] == 13 and s["output_tok_s"] == pytest.approx(6.5)
    assert class_summary(recs, 2.0)["slo_attainment"] is None


def test_summarize_window_and_total():
    recs = [_rec(0, "LS", 1.0, 1.1, 10, 0.01), _rec(1, "BE", 2.0, 2.5, 30, 0.05)]
    s = summarize(recs, {"LS": {"ttft_ms": 500}})
    assert s["window_s"] == pytest.approx(2.5 + 29 * 0.05 - 1.0)
    assert s["total_output_tok_s"] == pytest.approx(40 / s["window_s"])
    assert set(s["classes"]) == {"LS", "BE"}
    assert s["classes"]["LS"]["slo_attainment"] == 1.0 and s["classes"]["BE"]["slo_attainment"] is None


def test_ttft_counts_requests_cancelled_before_their_first_token_at_their_cancel_time():
    starved = RequestRecord(index=1, cls="LS", arrival_s=0.0, prompt_tokens=10, max_tokens=5, sent_s=0.5,
                            finished_s=30.5, cancelled=True, finish_reason="cancelled-by-bench")
    never_sent = RequestRecord(index=2, cls="LS", arrival_s=2.0, prompt_tokens=10, max_tokens=5, finished_s=12.0,
                               cancelled=True, finish_reason="not-sent-before-drain-cap")
    failed = _rec(3, "LS", 0.0, 0.0, 0, 0.0, error="UNAVAILABLE: down")
    assert starved.ttft_s is None and starved.ttft_or_cancel_s == pytest.approx(30.0)  # from its send
    assert never_sent.ttft_or_cancel_s == pytest.approx(10.0)  # from its arrival
    assert failed.ttft_or_cancel_s is None
    served = [_rec(0, "LS", 0.0, 0.1, 5, 0.01), _rec(4, "LS", 0.0, 0.3, 5, 0.01)]
    s = class_summary([*served, starved, never_sent, failed], window_s=31.0)
    assert s["without_first_token"] == 3
    # over 100, 300, 10000 and 30000 ms: leaving the two cancelled ones out would give a p50 of 200 ms
    assert s["ttft_ms"]["p50"] == pytest.approx((300 + 10_000) / 2)
    assert s["ttft_ms"]["p99"] == pytest.approx(10_000 + 0.97 * 20_000)
    assert class_summary(served, window_s=1.0)["ttft_ms"]["p50"] == pytest.approx(200.0)
