"""The native decode stages (worker/native_stages.py, worker/csrc/decode_layer.c) against the transformers
modules they replace: which layers take them, that decode steps really run through them, and that tokens and
log-probabilities match the module path (prompts over several non-contiguous blocks, parked steps); in bfloat16,
that each stage stays within bf16 rounding of the module's."""

from __future__ import annotations

import random

import pytest
import torch

from worker import native_stages
from worker.engine_core import EngineConfig, EngineCore
from worker.model_loader import load_model
from worker.model_runner import ATTENTION_ROW_GROUP, ModelRunner
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


def test_decode_rows_run_in_groups_match_the_modules(native_runner, make_runner, monkeypatch):
    """A policy that may park runs a native attention block a group of rows at a time: each call starts at its
    group's first row (its rows, rotary, slots and block tables by address), and the tokens are the modules'."""
    n = 2 * ATTENTION_ROW_GROUP + 3

    def requests():  # short prompts, long answers: all n decode together for most of the run
        rng = random.Random(11)
        return [Request(f"r{i}", [rng.randrange(3, 8000) for _ in range(5 + 3 * i)],
                        SamplingParams(max_tokens=40, ignore_eos=True)) for i in range(n)]
    starts = []
    original = native_runner.native.run_attention

    def spy(index, state, rope, window, rows=None):
        starts.append(rows[0] if rows is not None else 0)
        return original(index, state, rope, window, rows)
    monkeypatch.setattr(native_runner.native, "run_attention", spy)
    config = EngineConfig(policy="qllm", max_num_batched_tokens=64, max_num_seqs=n, kv_budget_tokens=256 * 16,
                          block_size=16, ls_reserved_slots=0, ls_reserved_kv_tokens=0)
    reqs = requests()
    EngineCore(native_runner, config).run_to_completion(reqs)
    assert ATTENTION_ROW_GROUP in starts and 2 * ATTENTION_ROW_GROUP in starts

    module_runner = make_runner()
    module_runner.native = None
    want = requests()
    EngineCore(module_runner, EngineConfig(max_num_batched_tokens=64, max_num_seqs=n, kv_budget_tokens=256 * 16,
                                           block_size=16)).run_to_completion(want)
    assert [r.output_token_ids for r in reqs] == [r.output_token_ids for r in want]


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


@pytest.fixture
def bf16_runner():
    runner = ModelRunner(load_model(None, dtype="bfloat16"), 256, 16)
    if runner.native is None:
        pytest.skip("no C compiler here: the native stages are off")
    return runner


def test_bfloat16_stages_track_the_modules(bf16_runner):
    """In bfloat16 the stages compute in float32 and round where they store, so they are not the modules' bits:
    each native stage call is checked against the module stage on the same input (teacher-forced), by the
    relative error of what the stage adds to the residual stream. bf16 rounds at 2^-8 relative; a routing tie
    the two break differently (router logits equal in bfloat16) moves one row to another expert, so a few calls
    may be far off, not most."""
    runner = bf16_runner
    assert all(runner.native.attention) and all(runner.native.moe)
    errors: dict[str, list[float]] = {"attention": [], "moe": []}
    for kind in errors:
        native_fn, module_fn = getattr(runner.native, f"run_{kind}"), getattr(runner, f"_{kind}_block")

        def compare(index, state, *rest, _kind=kind, _native=native_fn, _module=module_fn):
            # an attention call may run some decode rows only (a mixed step's, or a group of them)
            first, end = rest[2] if len(rest) > 2 and rest[2] is not None else (0, state.hidden.shape[1])
            before = state.hidden.clone()
            _module(index, runner.layers[index], state, 1.0)
            want = (state.hidden - before)[:, first:end].float()
            state.hidden = before.clone()
            ran = _native(index, state, *rest)
            assert ran and state.hidden.dtype == torch.bfloat16
            got = (state.hidden - before)[:, first:end].float()
            errors[_kind].append(((got - want).norm() / want.norm()).item())
            return ran
        setattr(runner.native, f"run_{kind}", compare)
    tokens, _ = _run(runner, _requests(seed=3))
    assert all(len(t) == 12 for t in tokens)
    for kind, values in errors.items():
        values.sort()
        assert len(values) >= 8 * 10, kind
        assert values[len(values) // 2] < 0.02, (kind, values)
        assert values[int(0.9 * len(values))] < 0.03, (kind, values)


def test_bfloat16_lm_head_is_float32_logits_of_the_bf16_weight(bf16_runner):
    head = bf16_runner.model.lm_head
    hidden = torch.randn(3, head.weight.shape[1]).to(torch.bfloat16)
    logits = bf16_runner.native.lm_head(hidden, head)
    assert logits.dtype == torch.float32
    want = hidden.float() @ head.weight.float().T
    assert torch.allclose(logits, want, rtol=1e-4, atol=1e-4)
