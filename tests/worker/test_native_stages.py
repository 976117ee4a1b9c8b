"""The native decode stages (worker/native_stages.py, worker/csrc/decode_layer.c) against the transformers
modules they replace: which layers take them, that decode steps really run through them, and that tokens and
log-probabilities match the module path (prompts over several non-contiguous blocks, parked steps)."""

from __future__ import annotations

import random

import pytest
import torch

from worker import native_stages
from worker.engine_core import EngineConfig, EngineCore
from worker.moe import native_supports
from worker.native_stages import NativeStages
from worker.request import Request, SamplingParams


def _requests(seed: int, lengths=(5, 37, 70, 123)) -> list[Request]:
    rng = random.Random(seed)
    return [Request(f"r{i}", [rng.randrange(3, 8000) for _ in range(n)],
                    SamplingParams(max_tokens=12, ignore_eos=True, logprobs=True))
            for i, n in enumerate(lengths)]


def _run(runner, reqs, budget=48):
    """All at once under a small token budget, so later decode steps are decode rows only."""
    core = EngineCore(runner, EngineConfig(max_num_batched_tokens=budget, kv_budget_tokens=256 * 16,
                                           block_size=16))
    outputs = core.run_to_completion(reqs)
    logprobs: dict[str, list[float]] = {}
    for o in outputs:
        logprobs.setdefault(o.request_id, []).extend(lp.logprob for lp in o.logprobs or ())
    return [r.output_token_ids for r in reqs], logprobs


@pytest.fixture
def native_runner(make_runner):
    runner = make_runner()
    if runner.native is None:
        pytest.skip("no C compiler here: the native stages are off")
    return runner


def _count_calls(monkeypatch, runner) -> dict[str, int]:
    calls = {"attention": 0, "moe": 0}
    for kind in calls:
        original = getattr(runner.native, f"run_{kind}")

        def spy(*args, _kind=kind, _original=original):
            ran = _original(*args)
            calls[_kind] += ran
            return ran
        monkeypatch.setattr(runner.native, f"run_{kind}", spy)
    return calls


def test_embedded_default_runs_every_stage_natively(native_runner):
    assert all(native_runner.native.attention) and all(native_runner.native.moe)


def test_native_stages_match_the_modules(native_runner, make_runner, monkeypatch):
    calls = _count_calls(monkeypatch, native_runner)
    tokens, logprobs = _run(native_runner, _requests(seed=3))
    # 12 tokens each: every step after the prefills is all decode rows
    assert calls["attention"] >= 8 * 10 and calls["moe"] >= 8 * 10

    module_runner = make_runner()
    module_runner.native = None
    want_tokens, want_logprobs = _run(module_runner, _requests(seed=3))
    assert tokens == want_tokens
    for rid, values in want_logprobs.items():
        assert logprobs[rid] == pytest.approx(values, abs=1e-4)


def test_native_stages_match_generate(native_runner, reference_tokens):
    req = Request("g", list(range(7, 90)), SamplingParams(max_tokens=20, ignore_eos=True))
    EngineCore(native_runner, EngineConfig()).run_to_completion([req])
    assert req.output_token_ids == reference_tokens(list(range(7, 90)), 20)


def test_parked_native_steps_resume_exactly(native_runner, make_runner, run_with_random_layer_yields):
    reqs = _requests(seed=5)
    core, done = run_with_random_layer_yields(native_runner, reqs, seed=2)
    assert core.num_layer_preemptions > 0 and sum(o.finished for o in done) == len(reqs)
    module_runner = make_runner()
    module_runner.native = None
    want, _ = _run(module_runner, _requests(seed=5))
    assert [r.output_token_ids for r in reqs] == want


def test_large_or_mixed_steps_take_the_modules(native_runner, monkeypatch):
    monkeypatch.setattr(native_stages, "NATIVE_MAX_ROWS", 2)
    seen = []
    original = native_runner.native.prepare

    def spy(state):
        rope = original(state)
        seen.append((bool(state.layout.prefills), state.hidden.shape[1], rope is not None))
        return rope
    monkeypatch.setattr(native_runner.native, "prepare", spy)
    _run(native_runner, _requests(seed=7))
    assert {native for prefills, rows, native in seen if prefills or rows > 2} == {False}
    assert any(prefills for prefills, _, _ in seen) and any(rows > 2 for _, rows, _ in seen)
    assert all(native for prefills, rows, native in seen if not prefills and rows <= 2)


def test_modules_the_kernel_does_not_reproduce_are_refused(native_runner):
    """A norm or router of another kind, or experts with biases, keep the module path for that layer."""
    layer, block = native_runner.layers[0], native_runner.moe_blocks[0]

    class OtherNorm(torch.nn.Module):
        weight = layer.input_layernorm.weight
        variance_epsilon = 1e-6

    original = layer.input_layernorm
    layer.input_layernorm = OtherNorm()
    try:
        stages = NativeStages(native_runner.layers, native_runner.moe_blocks, native_runner.cache, 1.0)
        assert stages.attention[0] is None and stages.attention[1] is not None
    finally:
        layer.input_layernorm = original
    block.experts.has_bias = True
    block.experts.__dict__.pop("_qllm_native", None)
    try:
        assert not native_supports(block.experts)
        stages = NativeStages(native_runner.layers, native_runner.moe_blocks, native_runner.cache, 1.0)
        assert stages.moe[0] is None and stages.moe[1] is not None
    finally:
        block.experts.has_bias = False
        block.experts.__dict__.pop("_qllm_native", None)
