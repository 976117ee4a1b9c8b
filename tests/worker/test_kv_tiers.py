"""ALISE victim order and action choice (worker/kv_tiers.py): pure, no torch."""

import pytest

from worker.kv_tiers import (Action, Candidate, CostModel, QualityBound, VictimClass, choose_action,
                             estimate_wait_s, order_victims, plan_evictions)

MB = 1 << 20


def model(**kw):
    base = dict(block_bytes=128 * 1024, int8_block_bytes=36 * 1024, prefill_s_per_token=1e-4,
                decode_step_s=0.01, swap_out_bytes_per_s=1000 * MB, swap_in_bytes_per_s=1000 * MB,
                quantize_bytes_per_s=500 * MB, dequantize_bytes_per_s=500 * MB)
    base.update(kw)
    return CostModel(**base)


def cand(rid, cls=VictimClass.BE, blocks=10, tokens=160, remaining=100, **kw):
    return Candidate(rid, cls, blocks, tokens, remaining, **kw)


def test_cost_formulas():
    m = model()
    assert m.swap_s(8) == pytest.approx(2 * 8 * 128 * 1024 / (1000 * MB))
    assert m.int8_s(8) == pytest.approx(2 * 8 * 128 * 1024 / (500 * MB))
    assert m.recompute_s(1000) == pytest.approx(0.1)
    assert m.int8_retained_blocks(10) == 3   # 10 * 36 / 128 = 2.8 -> 3
    assert m.remaining_s(cand("a", remaining=50)) == pytest.approx(0.5)


def test_cost_model_rejects_nonsense_rates():
    with pytest.raises(ValueError, match="swap_in_bytes_per_s"):
        model(swap_in_bytes_per_s=0)
    with pytest.raises(ValueError):
        model(block_bytes=0)


def test_order_pins_then_be_then_ls_and_longest_remaining_first():
    m = model()
    cands = [cand("ls", VictimClass.LS, remaining=500),
             cand("be-short", remaining=10),
             cand("pin-keep", VictimClass.PINNED, remaining=0, keep_score=0.9),
             cand("be-long", remaining=400),
             cand("pin-drop", VictimClass.PINNED, remaining=0, keep_score=0.1)]
    assert [c.request_id for c in order_victims(cands, m)] == ["pin-drop", "pin-keep", "be-long", "be-short", "ls"]


def test_order_ties_broken_by_router_order_key_then_later_arrival():
    m = model()
    cands = [cand("a", remaining=10, order_key=1.0, arrival_time=1.0),
             cand("b", remaining=10, order_key=3.0, arrival_time=0.0),
             cand("c", remaining=10, order_key=1.0, arrival_time=2.0)]
    assert [c.request_id for c in order_victims(cands, m)] == ["b", "c", "a"]


def test_swap_when_copies_are_cheaper_than_recompute():
    d = choose_action(cand("a", blocks=10, tokens=160), model(), host_free_bytes=100 * MB,
                      quality=QualityBound.OFF)
    assert d.action is Action.SWAP and d.freed_blocks == 10
    assert set(d.costs) == {Action.SWAP, Action.RECOMPUTE}


def test_recompute_when_host_pool_is_full():
    d = choose_action(cand("a"), model(), host_free_bytes=10 * 128 * 1024 - 1, quality=QualityBound.OFF)
    assert d.action is Action.RECOMPUTE and Action.SWAP not in d.costs


def test_recompute_when_the_prefill_is_cheaper_than_a_slow_copy():
    # 16 tokens per block, 1 us a token to prefill vs 10 MB/s copies: recomputing wins
    m = model(prefill_s_per_token=1e-6, swap_out_bytes_per_s=10 * MB, swap_in_bytes_per_s=10 * MB)
    assert choose_action(cand("a"), m, 100 * MB, QualityBound.OFF).action is Action.RECOMPUTE


def test_int8_when_allowed_and_cheapest_per_freed_block():
    m = model(swap_out_bytes_per_s=50 * MB, swap_in_bytes_per_s=50 * MB)
    d = choose_action(cand("a"), m, 100 * MB, QualityBound.BE)
    assert d.action is Action.INT8
    assert d.freed_blocks == 10 - 3


def test_int8_never_for_ls_under_be_bound_and_never_when_off():
    m = model(swap_out_bytes_per_s=50 * MB, swap_in_bytes_per_s=50 * MB, prefill_s_per_token=1.0)
    assert choose_action(cand("ls", VictimClass.LS), m, 100 * MB, QualityBound.BE).action is Action.SWAP
    assert choose_action(cand("be"), m, 100 * MB, QualityBound.OFF).action is Action.SWAP
    assert choose_action(cand("ls", VictimClass.LS), m, 100 * MB, QualityBound.ALL).action is Action.INT8
    assert QualityBound.BE.allows(VictimClass.PINNED)


def test_int8_compared_per_freed_block():
    # int8 total cost slightly below swap, but it frees 7 of 10 blocks: swap is cheaper per freed block
    m = model(quantize_bytes_per_s=1100 * MB, dequantize_bytes_per_s=1100 * MB)
    d = choose_action(cand("a"), m, 100 * MB, QualityBound.BE)
    assert d.costs[Action.INT8] < d.costs[Action.SWAP]
    assert d.action is Action.SWAP


def test_int8_not_offered_when_it_would_free_nothing():
    m = model(int8_block_bytes=128 * 1024)
    d = choose_action(cand("a", blocks=1), m, 0, QualityBound.ALL)
    assert Action.INT8 not in d.costs and d.action is Action.RECOMPUTE


def test_ties_prefer_lossless():
    m = model(swap_out_bytes_per_s=1000 * MB, swap_in_bytes_per_s=1000 * MB, int8_block_bytes=1,
              quantize_bytes_per_s=1000 * MB, dequantize_bytes_per_s=1000 * MB)
    # a 1-byte int8 block still retains one block of 10, so swap wins; with equal cost and frees, SWAP first
    assert choose_action(cand("a"), m, 100 * MB, QualityBound.ALL).action is Action.SWAP


def test_plan_frees_enough_in_victim_order_and_respects_host_budget():
    m = model()
    cands = [cand("short", remaining=10), cand("long", remaining=900), cand("mid", remaining=300)]
    host = 15 * 128 * 1024  # room for one 10-block victim
    plan = plan_evictions(cands, 15, m, host, QualityBound.OFF)
    assert [d.request_id for d in plan] == ["long", "mid"]
    assert [d.action for d in plan] == [Action.SWAP, Action.RECOMPUTE]
    assert sum(d.freed_blocks for d in plan) >= 15


def test_plan_nothing_needed():
    assert plan_evictions([cand("a")], 0, model(), 100 * MB) == []


def test_plan_frees_what_there_is_when_not_enough():
    plan = plan_evictions([cand("a"), cand("b")], 100, model(), 100 * MB, QualityBound.OFF)
    assert sorted(d.request_id for d in plan) == ["a", "b"]


def test_plan_keeps_a_victim_that_would_be_back_before_its_kv_moved():
    # slow copies and a victim due to run again almost at once: the other candidate goes first
    m = model(swap_out_bytes_per_s=1 * MB, swap_in_bytes_per_s=1 * MB, prefill_s_per_token=1.0)
    soon = cand("soon", remaining=900, wait_s=0.001)
    later = cand("later", remaining=10, wait_s=60.0)
    plan = plan_evictions([soon, later], 10, m, 100 * MB, QualityBound.OFF)
    assert [d.request_id for d in plan] == ["later"]
    # ...but it is still evicted when nothing else frees enough
    plan = plan_evictions([soon, later], 20, m, 100 * MB, QualityBound.OFF)
    assert [d.request_id for d in plan] == ["later", "soon"]


def test_wait_is_when_the_first_staying_request_finishes():
    m = model(decode_step_s=0.01)
    staying = [cand("x", remaining=50), cand("y", remaining=20)]
    assert estimate_wait_s(cand("v"), staying, m) == pytest.approx(0.2)
    assert estimate_wait_s(cand("v"), [], m) == pytest.approx(0.01)
    assert estimate_wait_s(cand("p", VictimClass.PINNED, wait_s=3.0), staying, m) == 3.0
