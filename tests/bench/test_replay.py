"""Replay against a fake Router with scripted latencies: the harness must measure what the server did."""

import time

import pytest

from bench.client import GrpcSender, replay, replay_sequential
from bench.stats import summarize
from bench.workload import BE, LS, RequestSpec

LS_TTFT, LS_TPOT, BE_TTFT, BE_TPOT = 0.08, 0.01, 0.15, 0.02
TOL = 0.03  # seconds: scheduling jitter on a shared 2-core machine


def _spec(i, cls, at, n=6, prompt="hello"):
    return RequestSpec(i, cls, at, prompt, 3, n, 0, 0)


async def test_measures_scripted_latencies(fake_router):
    address, script = fake_router
    specs = [_spec(0, LS, 0.0), _spec(1, BE, 0.02, n=5), _spec(2, LS, 0.05, n=8), _spec(3, BE, 0.1, n=4)]
    sender = GrpcSender(address)
    try:
        t = time.perf_counter()
        recs = await replay(sender, specs, duration_s=0.2, drain_cap_s=5.0, progress=False)
        assert time.perf_counter() - t < 2.0
    finally:
        await sender.close()
    for spec, r in zip(specs, recs):
        ttft, tpot = (LS_TTFT, LS_TPOT) if spec.cls == LS else (BE_TTFT, BE_TPOT)
        assert r.completed and not r.error and r.finish_reason == "length"
        assert r.output_tokens == spec.max_tokens and r.server_prompt_tokens == 7
        assert r.sent_s == pytest.approx(spec.arrival_s, abs=TOL)
        assert ttft - 0.002 <= r.ttft_s <= ttft + TOL
        assert r.tpot_s == pytest.approx(tpot, abs=0.004)
        assert r.e2e_s == pytest.approx(ttft + (spec.max_tokens - 1) * tpot, abs=TOL)
    # what the server saw: classes as priorities, ignore_eos, greedy, max_tokens
    by_id = {req.request_id: req for req in script.seen}
    assert len(by_id) == 4
    assert by_id["bench-0"].priority == 1 and by_id["bench-1"].priority == 2
    assert all(req.ignore_eos and req.temperature == 0.0 for req in script.seen)
    assert by_id["bench-2"].max_tokens == 8

    s = summarize(recs, {LS: {"ttft_ms": 1000 * (LS_TTFT + TOL)}})
    assert s["classes"][LS]["ttft_ms"]["p50"] == pytest.approx(1000 * LS_TTFT, abs=1000 * TOL)
    assert s["classes"][LS]["slo_attainment"] == 1.0
    assert s["classes"][BE]["tpot_ms"]["mean"] == pytest.approx(1000 * BE_TPOT, abs=4)


async def test_several_tokens_per_message(fake_router):
    address, script = fake_router
    script.tokens_per_message = 3
    sender = GrpcSender(address)
    try:
        (r,) = await replay(sender, [_spec(0, LS, 0.0, n=7)], duration_s=0.1, drain_cap_s=5, progress=False)
    finally:
        await sender.close()
    assert r.output_tokens == 7
    # 7 tokens scripted at 10 ms apart, delivered in messages of 3: last token still at ttft + 6 * tpot
    assert r.tpot_s == pytest.approx(LS_TPOT, abs=0.004)


async def test_drain_cap_cancels_and_counts(fake_router):
    address, script = fake_router
    specs = [_spec(0, LS, 0.0, n=3), _spec(1, BE, 0.0, n=500)]  # the BE one needs 10 s
    sender = GrpcSender(address)
    try:
        t = time.perf_counter()
        recs = await replay(sender, specs, duration_s=0.1, drain_cap_s=0.4, progress=False)
        elapsed = time.perf_counter() - t
    finally:
        await sender.close()
    assert elapsed < 1.5
    ls, be = recs
    assert ls.completed
    assert be.cancelled and not be.completed and be.finish_reason == "cancelled-by-bench"
    assert 0 < be.output_tokens < 500 and be.ttft_s is not None and be.e2e_s is None
    s = summarize(recs, {BE: {"ttft_ms": 10_000}})
    assert s["classes"][BE]["count"] == 1 and s["classes"][BE]["cancelled"] == 1
    assert s["classes"][BE]["slo_attainment"] == 0.0
    # the server learned of the cancellation
    for _ in range(50):
        if script.cancelled:
            break
        await __import__("asyncio").sleep(0.02)
    assert script.cancelled == ["bench-1"]


async def test_errors_are_recorded_not_raised(fake_router):
    address, _ = fake_router
    sender = GrpcSender(address)
    try:
        recs = await replay(sender, [_spec(0, LS, 0.0, prompt="FAIL please"), _spec(1, LS, 0.0)],
                            duration_s=0.1, drain_cap_s=5, progress=False)
    finally:
        await sender.close()
    assert recs[0].error.startswith("INVALID_ARGUMENT") and not recs[0].completed
    assert recs[1].completed
    assert summarize(recs)["classes"][LS]["errors"] == 1


async def test_unreachable_server_is_an_error():
    sender = GrpcSender("127.0.0.1:1", timeout_s=2.0)
    try:
        (r,) = await replay(sender, [_spec(0, LS, 0.0)], duration_s=0.1, drain_cap_s=3, progress=False)
    finally:
        await sender.close()
    assert r.error and not r.completed


async def test_sequential_is_one_at_a_time(fake_router):
    address, _ = fake_router
    sender = GrpcSender(address)
    specs = [_spec(i, LS, 0.0, n=3) for i in range(4)]
    try:
        recs = await replay_sequential(sender, specs, gap_s=0.01, progress=False)
        limited = await replay_sequential(sender, specs, duration_s=0.15, gap_s=0.0, progress=False)
    finally:
        await sender.close()
    assert len(recs) == 4 and all(r.completed for r in recs)
    for a, b in zip(recs, recs[1:]):
        assert b.sent_s >= a.finished_s
    assert all(r.ttft_s == pytest.approx(LS_TTFT, abs=TOL) for r in recs)
    assert 1 <= len(limited) < 4


async def test_a_request_starved_past_the_drain_cap_counts_in_ttft_at_its_cancel_time(fake_router):
    from qllm.v1 import common_pb2

    address, script = fake_router
    script.ttft_s[common_pb2.PRIORITY_LATENCY_SENSITIVE] = 30.0  # never gets a token before the cap
    sender = GrpcSender(address)
    try:
        (r,) = await replay(sender, [_spec(0, LS, 0.0)], duration_s=0.1, drain_cap_s=0.3, progress=False)
    finally:
        await sender.close()
    assert r.cancelled and r.ttft_s is None
    assert r.ttft_or_cancel_s == pytest.approx(0.4, abs=TOL)  # sent at 0, given up at duration + drain cap
    s = summarize([r])["classes"][LS]
    assert s["without_first_token"] == 1 and s["ttft_ms"]["p50"] == pytest.approx(400, abs=1000 * TOL)
