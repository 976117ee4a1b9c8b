"""Parking inside a decoder layer's blocks (worker/model_runner.py): between groups of decode rows in the native
attention block, before a step's prefill chunks and between their parts, and between ranges of experts in the
MoE block. A step parked at every such point and resumed computes exactly what it computes in one go."""

from worker import model_runner
from worker.engine_core import EngineConfig, EngineCore
from worker.model_runner import ATTENTION_ROW_GROUP
from worker.request import Request, SamplingParams


def _core(make_runner, park_always: bool, inner: bool = True):
    runner = make_runner(num_blocks=512)
    core = EngineCore(runner, EngineConfig(policy="qllm", max_num_batched_tokens=64, max_num_seqs=32,
                                           kv_budget_tokens=512 * runner.block_size, ls_reserved_slots=0,
                                           inner_parking=inner))
    core.scheduler.should_park = lambda plan: park_always
    parks = []
    run_layers = runner.run_layers

    def recording(state, should_yield=None, **kwargs):
        done = run_layers(state, should_yield, **kwargs)
        if not done:
            parks.append((state.next_stage, state.next_row, state.moe_parts is not None,
                          state.layout.num_decode, bool(state.layout.prefills), state.next_part))
        return done
    runner.run_layers = recording
    return core, parks


def _requests():
    # more decode rows than a row group, then a long prompt whose chunks mix with their decodes
    decodes = [Request(f"d{i}", [(17 * i + 5 * j) % 8000 + 1 for j in range(20 + i)],
                       SamplingParams(max_tokens=8, ignore_eos=True)) for i in range(2 * ATTENTION_ROW_GROUP + 3)]
    late = Request("late", [(3 * j) % 8000 + 1 for j in range(150)], SamplingParams(max_tokens=4, ignore_eos=True))
    return decodes, late


def _run(core):
    decodes, late = _requests()
    for r in decodes:
        core.add_request(r)
    for _ in range(3):  # prefills done, a decode step or two
        core.step()
    core.add_request(late)
    while core.has_unfinished_requests():
        core.step()
    return {r.request_id: r.output_token_ids for r in decodes + [late]}


def test_a_step_parked_at_every_inner_point_computes_what_it_computes_in_one_go(make_runner):
    straight, _ = _core(make_runner, park_always=False)
    parked, parks = _core(make_runner, park_always=True)
    assert _run(parked) == _run(straight)
    mixed = [p for p in parks if p[3] and p[4]]
    assert any(0 < row < n for _, row, _, n, *_ in mixed)               # between decode row groups
    assert any(row == n for _, row, _, n, *_ in mixed)                   # before the prefill chunks' attention
    assert any(stage % 2 == 1 and moe for stage, _, moe, *_ in mixed)    # between ranges of experts


def test_a_step_parks_between_the_parts_of_its_prefill_chunks(make_runner, monkeypatch):
    monkeypatch.setattr(model_runner, "PREFILL_ROW_GROUP", 16)  # the late prompt's chunks span several parts
    straight, _ = _core(make_runner, park_always=False)
    parked, parks = _core(make_runner, park_always=True)
    assert _run(parked) == _run(straight)
    assert any(stage % 2 == 0 and part > 0 for stage, _, _, _, _, part in parks)


def test_without_inner_parking_a_step_parks_between_blocks_only(make_runner):
    straight, _ = _core(make_runner, park_always=False)
    parked, parks = _core(make_runner, park_always=True, inner=False)
    assert _run(parked) == _run(straight)
    assert parks and all(row == 0 and part == 0 and not moe for _, row, moe, _, _, part in parks)
