"""--kv-policy alise in the scheduler (pure, no torch): victims keep their progress, moves are queued in
order, the host and int8 books balance, and vLLM V1's optimistic admission at admission_output_fraction 0."""

import pytest

from worker.outputs import ModelRunnerOutput
from worker import kv_tiers
from worker.kv_blocks import BlockAllocator
from worker.request import Priority, Request, SamplingParams, Status
from worker.scheduler import SchedulerConfig, make_scheduler
from worker.scheduler.kv_manager import int8_owner_id

LS, BE = Priority.LATENCY_SENSITIVE, Priority.BEST_EFFORT
BS = 4


def make(policy="priority-evict", blocks=8, host_tokens=64, int8="off", prefill_s=1.0, **cfg):
    sched = make_scheduler(policy, SchedulerConfig(kv_policy="alise", kv_int8=int8, kv_host_budget_tokens=host_tokens,
                                                   admission_output_fraction=0.0, max_num_batched_tokens=64, **cfg),
                           BlockAllocator(blocks, BS))
    sched.kv.set_cost_model(kv_tiers.CostModel(block_bytes=1000, int8_block_bytes=260, prefill_s_per_token=prefill_s,
                                          decode_step_s=0.01, swap_out_bytes_per_s=1e9, swap_in_bytes_per_s=1e9,
                                          quantize_bytes_per_s=1e9, dequantize_bytes_per_s=1e9))
    return sched


def req(rid, n_prompt, max_tokens=8, priority=BE, arrival=0.0):
    return Request(rid, list(range(1, n_prompt + 1)), SamplingParams(max_tokens=max_tokens, ignore_eos=True),
                   priority, frozenset({0}), arrival_time=arrival)


def step(sched, ls_only=False):
    out = sched.build_step(ls_only=True) if ls_only else sched.schedule()
    sched.update_from_output(out, ModelRunnerOutput({s.request.request_id: 7 for s in out.scheduled if s.samples}))
    return out


def fill(sched):
    """Two BE requests of 12 prompt tokens (3 blocks each) run one step: 6 of 8 blocks taken."""
    a, b = req("a", 12, arrival=0.0), req("b", 12, arrival=1.0)
    sched.add_request(a)
    sched.add_request(b)
    step(sched)
    return a, b


def test_ls_admission_swaps_a_be_victim_and_it_resumes_with_its_progress():
    sched = make()
    a, b = fill(sched)
    ls = req("ls", 12, priority=LS, arrival=2.0)
    sched.add_request(ls)
    blocks_of = {r: list(sched.allocator.block_table(r)) for r in ("a", "b")}
    out = sched.schedule()
    assert out.preempted and "ls" in out.request_ids
    victim = a if out.preempted == ["a"] else b
    assert victim.status is Status.WAITING and victim.num_computed_tokens == 12  # its KV is kept, not dropped
    moves = sched.kv.take_moves()
    assert [m.kind for m in moves] == ["swap_out"]
    assert moves[0].block_ids == blocks_of[victim.request_id][:3] and moves[0].num_tokens == 12
    assert sched.kv.host_used_blocks == 3 and sched.kv.move_counts == {"swap_out": 1}
    sched.update_from_output(out, ModelRunnerOutput({s.request.request_id: 7 for s in out.scheduled if s.samples}))
    for _ in range(50):  # until the victim runs again: its KV is copied into its new blocks, then it decodes
        out = sched.schedule()
        moves = sched.kv.take_moves()
        resumed = [s for s in out.scheduled if s.request is victim]
        sched.update_from_output(out, ModelRunnerOutput({s.request.request_id: 7 for s in out.scheduled if s.samples}))
        if resumed:
            break
    resumed = resumed[0]
    assert resumed.start == 12 and resumed.num_tokens == 1  # the token sampled before it was swapped out
    assert [m.kind for m in moves] == ["swap_in"] and moves[0].block_ids == resumed.block_table[:3]
    assert sched.kv.host_used_blocks == 0 and victim.request_id not in sched.kv.offloaded


def test_longest_remaining_be_is_the_victim():
    sched = make()
    a, b = req("a", 12, max_tokens=100, arrival=0.0), req("b", 12, max_tokens=4, arrival=1.0)
    sched.add_request(a)
    sched.add_request(b)
    step(sched)
    sched.add_request(req("ls", 12, priority=LS, arrival=2.0))
    assert sched.schedule().preempted == ["a"]  # priority alone would take b, the later arrival


def test_full_host_pool_falls_back_to_recompute():
    sched = make(host_tokens=8)  # 2 blocks: the victim's 3 do not fit
    a, b = fill(sched)
    sched.add_request(req("ls", 12, priority=LS, arrival=2.0))
    out = sched.schedule()
    victim = a if out.preempted == ["a"] else b
    assert victim.num_computed_tokens == 0 and sched.kv.take_moves() == []
    assert sched.kv.move_counts == {"recompute": 1}


def test_int8_frees_blocks_but_charges_its_copy():
    sched = make(host_tokens=0, int8="be")
    a, b = fill(sched)
    sched.add_request(req("ls", 12, priority=LS, arrival=2.0))
    out = sched.schedule()
    victim = a if out.preempted == ["a"] else b
    assert [m.kind for m in sched.kv.take_moves()] == ["quantize"]
    assert len(sched.allocator.block_table(int8_owner_id(victim.request_id))) == 1  # ceil(3 * 260 / 1000)
    assert sched.kv.offloaded[victim.request_id][0] is kv_tiers.Action.INT8


def test_int8_not_for_ls_under_the_be_bound():
    sched = make(host_tokens=0, int8="be")
    ls1 = req("ls1", 12, priority=LS, max_tokens=40)
    ls2 = req("ls2", 16, priority=LS, arrival=1.0)
    sched.add_request(ls1)
    sched.add_request(ls2)
    for _ in range(6):
        step(sched)
    assert "quantize" not in sched.kv.move_counts and sched.kv.move_counts.get("recompute", 0) >= 1


def test_cancel_while_offloaded_drops_the_copy():
    sched = make()
    a, b = fill(sched)
    sched.add_request(req("ls", 12, priority=LS, arrival=2.0))
    out = sched.schedule()
    victim_id = out.preempted[0]
    sched.kv.take_moves()
    sched.finish_requests([victim_id])
    moves = sched.kv.take_moves()
    assert [(m.kind, m.request_id) for m in moves] == [("drop", victim_id)]
    assert sched.kv.host_used_blocks == 0 and not sched.kv.offloaded


def test_recompute_policy_is_unchanged():
    sched = make()
    sched.config.kv_policy = "recompute"
    sched.kv.alise = False
    a, b = fill(sched)
    sched.add_request(req("ls", 12, priority=LS, arrival=2.0))
    out = sched.schedule()
    victim = a if out.preempted == ["a"] else b
    assert out.preempted == ["b"]  # priority's own victim: the latest arrival
    assert victim.num_computed_tokens == 0 and sched.kv.take_moves() == [] and sched.kv.move_counts == {"recompute": 1}


def test_fraction_zero_is_vllm_v1_optimistic_admission():
    # 8 blocks of 4 and 24 tokens a step: V1 admits b as soon as its first chunk fits, without reserving the
    # rest of its prompt (a reservation of 20 + 20 tokens would not fit in 32)
    sched2 = make_scheduler("fcfs", SchedulerConfig(admission_output_fraction=0.0, max_num_batched_tokens=24),
                            BlockAllocator(8, BS))
    sched2.add_request(req("a", 20))
    sched2.add_request(req("b", 20, arrival=1.0))
    out = sched2.schedule()
    assert out.request_ids == ["a", "b"] and [s.num_tokens for s in out.scheduled] == [20, 4]


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="kv_policy"):
        make_scheduler("fcfs", SchedulerConfig(kv_policy="swap"), BlockAllocator(8, BS))
    with pytest.raises(ValueError, match="kv_int8"):
        make_scheduler("fcfs", SchedulerConfig(kv_int8="some"), BlockAllocator(8, BS))
