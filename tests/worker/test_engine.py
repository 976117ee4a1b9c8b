"""The engine against transformers' generate() on the same model, batching, preemption and cancel."""

import asyncio
import time
import random

import pytest

from worker.engine import AsyncEngine, EngineConfig, RequestRejected
from worker.engine_core import EngineCore
from worker.request import Priority, Request, SamplingParams

LS, BE = Priority.LATENCY_SENSITIVE, Priority.BEST_EFFORT


def prompts(tokenizer, n, seed=0):
    rng = random.Random(seed)
    words = ["the", "model", "serves", "tokens", "fast", "while", "batch", "jobs", "wait", "expert", "layer"]
    return [tokenizer.encode(" ".join(rng.choice(words) for _ in range(rng.randint(2, 120))))
            for _ in range(n)]


def run_offline(runner, reqs, policy="fcfs", budget=64):
    """Through EngineCore.step() on this thread, with the runner's whole cache as the KV budget."""
    core = EngineCore(runner, EngineConfig(policy=policy, max_num_batched_tokens=budget, block_size=runner.block_size,
                                           kv_budget_tokens=runner.cache.num_blocks * runner.block_size))
    core.run_to_completion(reqs)
    return core


def greedy(rid, ids, n, priority=BE, arrival=0.0):
    return Request(rid, ids, SamplingParams(max_tokens=n, ignore_eos=True), priority, arrival_time=arrival)


def test_single_request_matches_transformers_generate(loaded, make_runner, reference_tokens):
    runner = make_runner()
    for i, ids in enumerate(prompts(loaded.tokenizer, 3)):
        r = greedy(f"r{i}", ids, 16)
        run_offline(runner, [r])
        assert r.output_token_ids == reference_tokens(ids, 16)


def test_batched_requests_of_different_lengths_match_alone(loaded, make_runner, reference_tokens):
    runner = make_runner()
    ps = prompts(loaded.tokenizer, 6, seed=1)
    reqs = [greedy(f"r{i}", ids, 12, arrival=float(i)) for i, ids in enumerate(ps)]
    run_offline(runner, reqs, budget=48)  # small budget: prefills are chunked and mixed with decodes
    for r, ids in zip(reqs, ps):
        assert r.output_token_ids == reference_tokens(ids, 12), r.request_id


@pytest.mark.parametrize("policy", ["fcfs", "priority", "qllm"])
def test_kv_pressure_preemption_keeps_tokens(loaded, make_runner, reference_tokens, policy):
    ps = prompts(loaded.tokenizer, 4, seed=2)
    runner = make_runner(num_blocks=16, block_size=16)  # 256 tokens: not enough for all at once
    reqs = [greedy(f"r{i}", ids[:100], 10, LS if i == 3 else BE, float(i)) for i, ids in enumerate(ps)]
    run_offline(runner, reqs, policy=policy, budget=256)
    for r, ids in zip(reqs, ps):
        assert r.output_token_ids == reference_tokens(ids[:100], 10), r.request_id


def test_random_layer_preemption_gives_identical_tokens(loaded, make_runner, reference_tokens,
                                                        run_with_random_layer_yields):
    """The real core loop with a should-yield that fires at random layer boundaries, LS and BE mixed."""
    runner = make_runner()
    ps = prompts(loaded.tokenizer, 8, seed=3)
    reqs = [greedy(f"r{i}", ids, 10, LS if i % 3 == 0 else BE, float(i)) for i, ids in enumerate(ps)]
    core, done = run_with_random_layer_yields(runner, reqs)
    assert sum(o.finished for o in done) == len(reqs)
    assert core.num_layer_preemptions > 10
    for r, ids in zip(reqs, ps):
        assert r.output_token_ids == reference_tokens(ids, 10), r.request_id


def test_sampling_is_seeded(loaded, make_runner):
    runner = make_runner()
    ids = prompts(loaded.tokenizer, 1, seed=4)[0]
    outs = []
    for seed in (1, 1, 2):
        r = Request(f"s{len(outs)}", ids, SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, seed=seed,
                                                         ignore_eos=True))
        run_offline(runner, [r])
        outs.append(r.output_token_ids)
    assert outs[0] == outs[1] and outs[0] != outs[2]


async def test_cancel_frees_kv(loaded, make_runner):
    engine = AsyncEngine(make_runner(), loaded.tokenizer, loaded.eos_token_ids, loaded.max_context,
                         EngineConfig())
    engine.start()
    try:
        alloc = engine.core.allocator
        stream = engine.generate("c", loaded.tokenizer.encode("hello " * 50), SamplingParams(max_tokens=500,
                                                                                           ignore_eos=True))
        await stream.__anext__()
        assert alloc.free_tokens < alloc.capacity_tokens
        await stream.aclose()
        for _ in range(100):
            if alloc.free_tokens == alloc.capacity_tokens:
                break
            await asyncio.sleep(0.02)
        assert alloc.free_tokens == alloc.capacity_tokens
        assert not engine.core.has_unfinished_requests()
    finally:
        engine.stop()


async def test_too_long_is_rejected_with_field(loaded, make_runner):
    engine = AsyncEngine(make_runner(), loaded.tokenizer, loaded.eos_token_ids, loaded.max_context,
                         EngineConfig())
    with pytest.raises(RequestRejected) as exc:
        async for _ in engine.generate("x", [5] * 4000, SamplingParams(max_tokens=200)):
            pass
    assert exc.value.code == "INVALID_ARGUMENT" and exc.value.message.startswith("max_tokens:")


@pytest.mark.parametrize("native", [True, False], ids=["native-kernel", "gathered"])
def test_long_contexts_decoded_in_one_call_match_generate(loaded, make_runner, reference_tokens, monkeypatch,
                                                          native):
    """Long chunk-prefilled contexts decode together, one attention call per layer, through the native CPU
    kernel and through the gathered fallback (what a GPU or a machine without a C compiler runs)."""
    from worker import paged_decode

    if native and not paged_decode.uses_native(loaded.model.lm_head.weight):
        pytest.skip("the native decode kernel is not available on this device")
    monkeypatch.setattr(paged_decode, "uses_native", lambda pool: native)
    runner = make_runner(num_blocks=256, block_size=16)
    runner.native = None  # the decode attention itself, not the native stages (tests/worker/test_native_stages.py)
    ps = [p * 6 for p in prompts(loaded.tokenizer, 2, seed=5)]
    assert all(len(p) > 256 for p in ps)
    reqs = [greedy(f"long{i}", ids, 8, arrival=float(i)) for i, ids in enumerate(ps)]
    decode_rows = []
    begin = runner.begin

    def spy(plan):
        state = begin(plan)
        decode_rows.append(state.layout.num_decode)
        return state

    runner.begin = spy
    run_offline(runner, reqs, budget=128)
    assert max(decode_rows) == 2
    for r, ids in zip(reqs, ps):
        assert r.output_token_ids == reference_tokens(ids, 8), r.request_id


def test_a_failing_step_fails_its_requests_and_the_engine_keeps_serving(loaded, make_runner, reference_tokens):
    runner = make_runner()
    done = []
    core = EngineCore(runner, EngineConfig(), done.extend)
    core.start()
    try:
        real_finish = runner.finish
        runner.finish = lambda state: (_ for _ in ()).throw(RuntimeError("boom"))
        core.submit(greedy("bad", [5, 6, 7], 4))
        for _ in range(200):
            if done:
                break
            time.sleep(0.02)
        assert done and done[0].finished and done[0].finish_reason == "error"
        assert core.allocator.free_tokens == core.allocator.capacity_tokens
        runner.finish = real_finish
        ok = greedy("good", [5, 6, 7], 4)
        core.submit(ok)
        for _ in range(300):
            if any(o.request_id == "good" and o.finished for o in done):
                break
            time.sleep(0.02)
        assert ok.output_token_ids == reference_tokens([5, 6, 7], 4)
    finally:
        core.stop()


def test_ls_arriving_after_a_steps_last_boundary_counts_its_wait(loaded, make_runner, reference_tokens):
    """An LS request that arrives during a BE step's last stage is not a park, but it waited for the step's
    end: the preemption latency histograms count that wait (they once left it out)."""
    from prometheus_client import REGISTRY

    runner = make_runner()
    core = EngineCore(runner, EngineConfig(policy="qllm", block_size=runner.block_size,
                                           kv_budget_tokens=runner.cache.num_blocks * runner.block_size))
    ids = prompts(loaded.tokenizer, 2, seed=11)
    be, ls = greedy("be", ids[0], 6, BE), greedy("ls", ids[1], 3, LS)
    run_layers, sent = runner.run_layers, []

    def run_layers_then_ls_arrives(state, should_park, **kwargs):
        done = run_layers(state, should_park, **kwargs)
        if done and state.plan.has_best_effort and not sent:
            sent.append(True)
            core.submit(ls)
            time.sleep(0.02)  # the rest of the last stage: the LS waits this long (at least) for the step's end
        return done

    runner.run_layers = run_layers_then_ls_arrives

    def count(name):
        return REGISTRY.get_sample_value(name) or 0.0

    before = {n: count(n) for n in ("qllm_worker_preemption_latency_seconds_count",
                                    "qllm_worker_preemption_latency_seconds_sum",
                                    "qllm_worker_preemption_latency_layers_count")}
    core.run_to_completion([be])
    while core.has_unfinished_requests() or core._inbox:
        core.step()
    assert sent and ls.output_token_ids == reference_tokens(ids[1], 3)
    assert be.output_token_ids == reference_tokens(ids[0], 6)
    assert count("qllm_worker_preemption_latency_seconds_count") == before[
        "qllm_worker_preemption_latency_seconds_count"] + 1
    assert count("qllm_worker_preemption_latency_layers_count") == before[
        "qllm_worker_preemption_latency_layers_count"] + 1
    waited = count("qllm_worker_preemption_latency_seconds_sum") - before["qllm_worker_preemption_latency_seconds_sum"]
    assert 0.02 <= waited < 5.0
