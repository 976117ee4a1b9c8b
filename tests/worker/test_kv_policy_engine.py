"""--kv-policy on the engine with the embedded default (CPU): under KV pressure, swap and recompute give the
greedy tokens of an unpressured run; int8 is used only where the quality bound allows it."""

import random

import pytest
import torch

from worker import kv_tiers
from worker.engine_core import EngineConfig, EngineCore
from worker.model_runner import ModelRunner
from worker.request import Priority, Request, SamplingParams

torch.set_num_threads(1)

BE, LS = Priority.BEST_EFFORT, Priority.LATENCY_SENSITIVE


def forced(**kw):
    """A cost model that makes recompute expensive, so the cheapest allowed move is taken."""
    base = dict(block_bytes=16 * 8192, int8_block_bytes=16 * 2176, prefill_s_per_token=1.0, decode_step_s=0.01,
                swap_out_bytes_per_s=1e9, swap_in_bytes_per_s=1e9, quantize_bytes_per_s=1e9,
                dequantize_bytes_per_s=1e9)
    base.update(kw)
    return kv_tiers.CostModel(**base)


def run(loaded, prompts, blocks, n_out=16, classes=None, cost_model=None, **cfg):
    runner = ModelRunner(loaded, blocks, 16)
    config = EngineConfig(policy="priority-evict", kv_budget_tokens=blocks * 16, block_size=16,
                          max_num_batched_tokens=256, admission_output_fraction=0.0, **cfg)
    core = EngineCore(runner, config, lambda outputs: None)
    if cost_model is not None:
        core.scheduler.kv.set_cost_model(cost_model)
    classes = classes or [BE] * len(prompts)
    reqs = [Request(f"r{i}", p, SamplingParams(max_tokens=n_out, ignore_eos=True), cls, arrival_time=float(i))
            for i, (p, cls) in enumerate(zip(prompts, classes))]
    core.run_to_completion(reqs)
    return [r.output_token_ids for r in reqs], core


@pytest.fixture(scope="module")
def workload(loaded_module):
    rng = random.Random(0)
    prompts = [[rng.randrange(1, 8000) for _ in range(rng.randint(40, 120))] for _ in range(8)]
    reference, _ = run(loaded_module, prompts, blocks=512)
    return prompts, reference


@pytest.fixture(scope="module")
def loaded_module():
    from worker.model_loader import load_model
    return load_model(None)


@pytest.mark.parametrize("name,cfg,moves", [
    ("recompute", {}, {"recompute"}),
    ("swap", dict(kv_policy="alise", kv_int8="off"), {"swap_out", "swap_in"}),
])
def test_lossless_policies_match_an_unpressured_run(loaded_module, workload, name, cfg, moves):
    prompts, reference = workload
    out, core = run(loaded_module, prompts, blocks=24, cost_model=forced() if cfg else None, **cfg)
    assert set(core.scheduler.kv.move_counts) == moves
    assert out == reference
    if core.kv_store is not None:  # everything came back: nothing left on the host
        assert core.kv_store.host.used_bytes == 0 and core.scheduler.kv.host_used_blocks == 0
        assert core.kv_store.host.out_rate.bytes > 0


def test_int8_round_trips_and_mostly_keeps_greedy_tokens(loaded_module, workload):
    prompts, reference = workload
    out, core = run(loaded_module, prompts, blocks=24, cost_model=forced(), kv_policy="alise", kv_int8="be",
                    kv_host_budget_tokens=0)
    counts = core.scheduler.kv.move_counts
    assert counts.get("quantize", 0) >= 1 and counts["quantize"] == counts["dequantize"]
    assert core.kv_store.int8 == {} and core.kv_store.int8_bytes == 0
    # lossy: each request keeps at least its tokens from before its first preemption; most match outright
    assert sum(a == b for a, b in zip(out, reference)) >= len(reference) // 2
    assert all(a[0] == b[0] for a, b in zip(out, reference))


def test_int8_never_touches_ls_under_the_be_bound(loaded_module, workload):
    prompts, reference = workload
    out, core = run(loaded_module, prompts, blocks=24, classes=[LS] * len(prompts), cost_model=forced(),
                    kv_policy="alise", kv_int8="be", kv_host_budget_tokens=0)
    assert "quantize" not in core.scheduler.kv.move_counts and core.scheduler.kv.move_counts.get("recompute", 0) >= 1
    assert out == reference


def test_tier_bytes_and_measured_rates(loaded_module):
    runner = ModelRunner(loaded_module, 32, 16)
    core = EngineCore(runner, EngineConfig(kv_budget_tokens=512, block_size=16, kv_policy="alise"), lambda o: None)
    core.kv_store.calibrate(num_blocks=4)
    core._refresh_cost_model()
    model = core.scheduler.kv.cost_model
    assert model.block_bytes == 16 * 8192  # 8 layers x K,V x 2 heads x 64 x fp32, per token
    assert model.swap_out_bytes_per_s == core.kv_store.host.out_rate.bytes_per_s and core.kv_store.host.out_rate.bytes
    assert core.tier_bytes() == {"gpu": 0, "host": 0, "int8": 0}
