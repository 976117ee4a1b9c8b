"""Scheduler tests in the style of vLLM's: pure Python, a fake model that returns fixed tokens."""

import pytest

from worker.outputs import ModelRunnerOutput
from worker.kv_blocks import BlockAllocator, OutOfBlocks
from worker.request import FinishReason, Priority, Request, SamplingParams, Status
from worker.scheduler import SchedulerConfig, make_scheduler

LS, BE = Priority.LATENCY_SENSITIVE, Priority.BEST_EFFORT


def make(policy="fcfs", blocks=64, block_size=4, **cfg):
    return make_scheduler(policy, SchedulerConfig(**cfg), BlockAllocator(blocks, block_size))


def req(rid, n_prompt, max_tokens=4, priority=BE, arrival=0.0):
    return Request(rid, list(range(1, n_prompt + 1)), SamplingParams(max_tokens=max_tokens, ignore_eos=True),
                   priority, frozenset({0}), arrival_time=arrival)


def fake_step(sched, ls_only=False, token=7):
    """Schedules one step and feeds back `token` for every request that samples."""
    out = sched.build_step(ls_only=True) if ls_only else sched.schedule()
    sampled = {s.request.request_id: token for s in out.scheduled if s.samples}
    sched.update_from_output(out, ModelRunnerOutput(sampled))
    return out


def run_to_completion(sched, limit=1000):
    steps = 0
    while sched.has_unfinished_requests():
        fake_step(sched)
        steps += 1
        assert steps < limit
    return steps


def test_chunked_prefill_respects_token_budget():
    sched = make(max_num_batched_tokens=8)
    r = req("a", 20)
    sched.add_request(r)
    out = fake_step(sched)
    assert [(s.start, s.num_tokens) for s in out.scheduled] == [(0, 8)]
    assert r.output_token_ids == []
    fake_step(sched)
    out = fake_step(sched)
    assert [(s.start, s.num_tokens) for s in out.scheduled] == [(16, 4)]
    assert r.output_token_ids == [7]
    out = fake_step(sched)
    assert [(s.start, s.num_tokens) for s in out.scheduled] == [(20, 1)]


def test_decodes_and_prefill_share_an_iteration():
    sched = make(max_num_batched_tokens=16)
    sched.add_request(req("a", 4, max_tokens=10))
    fake_step(sched)
    sched.add_request(req("b", 30, arrival=1.0))
    out = fake_step(sched)
    assert [(s.request.request_id, s.num_tokens) for s in out.scheduled] == [("a", 1), ("b", 15)]


def test_finishes_at_max_tokens_and_frees_blocks():
    sched = make()
    r = req("a", 5, max_tokens=3)
    sched.add_request(r)
    run_to_completion(sched)
    assert r.finish_reason is FinishReason.LENGTH and len(r.output_token_ids) == 3
    assert sched.allocator.num_free_blocks == sched.allocator.num_blocks


def test_eos_stops_unless_ignored():
    sched = make()
    r = Request("a", [1, 2, 3], SamplingParams(max_tokens=10), BE, frozenset({7}))
    sched.add_request(r)
    run_to_completion(sched)
    assert r.finish_reason is FinishReason.STOP and r.output_token_ids == [7]


def test_admission_respects_kv_budget():
    # 8 blocks of 4 tokens = 32 tokens; each request needs 24 tokens of prompt.
    sched = make(blocks=8, block_size=4, max_num_batched_tokens=64)
    a, b = req("a", 24, max_tokens=2), req("b", 24, max_tokens=2, arrival=1.0)
    sched.add_request(a)
    sched.add_request(b)
    out = fake_step(sched)
    assert out.request_ids == ["a"] and b.status is Status.WAITING
    run_to_completion(sched)
    assert a.is_finished and b.is_finished


def test_max_num_seqs_caps_running():
    sched = make(max_num_seqs=2)
    for i in range(3):
        sched.add_request(req(f"r{i}", 2, arrival=float(i)))
    out = fake_step(sched)
    assert out.request_ids == ["r0", "r1"]


def test_fcfs_preempts_latest_when_kv_runs_out_and_recomputes():
    # Optimistic admission (vLLM's): nothing reserved for output, so decodes run out of blocks.
    sched = make(blocks=4, block_size=4, max_num_batched_tokens=64, admission_output_fraction=0.0)
    a, b = req("a", 6, max_tokens=6), req("b", 6, max_tokens=6, arrival=1.0)
    sched.add_request(a)
    sched.add_request(b)
    out = fake_step(sched)
    assert out.request_ids == ["a", "b"]
    preempted = []
    while sched.has_unfinished_requests():
        preempted += fake_step(sched).preempted
    assert preempted and preempted[0] == "b"
    assert b.num_preemptions >= 1
    assert a.output_token_ids == [7] * 6 and b.output_token_ids == [7] * 6


def test_admission_reserves_output_so_decodes_never_thrash():
    sched = make(blocks=4, block_size=4, max_num_batched_tokens=64)  # reserves prompt + max_tokens
    a, b = req("a", 6, max_tokens=6), req("b", 6, max_tokens=6, arrival=1.0)
    sched.add_request(a)
    sched.add_request(b)
    assert fake_step(sched).request_ids == ["a"]  # b would not fit beside a's 12 tokens
    preempted = []
    while sched.has_unfinished_requests():
        preempted += fake_step(sched).preempted
    assert not preempted and a.is_finished and b.is_finished


def test_priority_admits_ls_before_earlier_be():
    sched = make("priority", max_num_seqs=1)
    sched.add_request(req("be", 4, arrival=0.0))
    sched.add_request(req("ls", 4, priority=LS, arrival=1.0))
    out = fake_step(sched)
    assert out.request_ids == ["ls"]


def test_priority_evict_preempts_running_be_for_waiting_ls():
    sched = make("priority-evict", max_num_seqs=1)
    be = req("be", 4, max_tokens=8)
    sched.add_request(be)
    fake_step(sched)
    sched.add_request(req("ls", 4, priority=LS, arrival=1.0))
    out = fake_step(sched)
    assert out.preempted == ["be"] and out.request_ids == ["ls"]
    assert be.status is Status.WAITING and be.num_computed_tokens == 0


def test_priority_is_vllm_v1s_and_never_evicts_running_be_for_waiting_ls():
    sched = make("priority", max_num_seqs=1)
    be = req("be", 4, max_tokens=3)
    sched.add_request(be)
    fake_step(sched)
    sched.add_request(req("ls", 4, priority=LS, arrival=1.0))
    assert [fake_step(sched).request_ids for _ in range(3)] == [["be"], ["be"], ["ls"]]
    assert be.num_preemptions == 0


def test_fcfs_does_not_preempt_for_ls():
    sched = make("fcfs", max_num_seqs=1)
    sched.add_request(req("be", 4, max_tokens=8))
    fake_step(sched)
    sched.add_request(req("ls", 4, priority=LS, arrival=1.0))
    out = fake_step(sched)
    assert out.request_ids == ["be"] and not out.preempted


def test_ls_never_preempted_for_be():
    sched = make("priority", blocks=4, block_size=4, max_num_batched_tokens=64)
    ls = req("ls", 6, max_tokens=6, priority=LS)
    sched.add_request(ls)
    fake_step(sched)
    sched.add_request(req("be", 6, max_tokens=6, arrival=1.0))
    run_to_completion(sched)
    assert ls.num_preemptions == 0


def test_ls_arrival_parks_the_step_and_ls_runs_alone_before_it_resumes():
    sched = make("qllm", ls_tpot_target_s=0)   # no decode pacing: LS decodes then ride full iterations
    assert sched.yields_at_layer_boundaries
    sched.add_request(req("be", 8, max_tokens=8))
    be_step = sched.schedule()
    assert not sched.should_park(be_step)
    sched.add_request(req("ls", 4, priority=LS, arrival=1.0))
    sched.add_request(req("be2", 4, arrival=2.0))
    assert sched.should_park(be_step)       # asked at a layer boundary: LS arrived since the step began
    sched.park(be_step)
    ls_step = sched.schedule()              # LS only: nothing in flight, no BE
    assert ls_step.request_ids == ["ls"] and not ls_step.resumed
    sched.update_from_output(ls_step, ModelRunnerOutput({"ls": 7}))
    resumed = sched.schedule()              # the parked step, as it was
    assert resumed.resumed and resumed.step_id == be_step.step_id and resumed.request_ids == ["be"]
    sched.update_from_output(resumed, ModelRunnerOutput({"be": 7}))
    assert sched.requests["be"].num_computed_tokens == 8
    assert sched.schedule().request_ids == ["ls", "be", "be2"]


def test_an_ls_step_is_not_parked_for_a_later_ls_which_gets_the_next_step():
    sched = make("qllm", ls_tpot_target_s=0)
    sched.add_request(req("be", 8, max_tokens=8))
    be_step = sched.schedule()
    sched.add_request(req("ls", 4, priority=LS, arrival=1.0))
    assert sched.should_park(be_step)
    sched.park(be_step)
    ls_step = sched.schedule()
    sched.add_request(req("ls2", 4, priority=LS, arrival=2.0))
    assert not sched.should_park(ls_step)   # one class: the later LS waits for this step
    sched.update_from_output(ls_step, ModelRunnerOutput({"ls": 7}))
    nxt = sched.schedule()                  # before the parked BE step resumes
    assert nxt.ls_only and "ls2" in nxt.request_ids and not nxt.resumed


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def paced(**cfg):
    sched = make("qllm", ls_tpot_target_s=0.05, **cfg)
    sched.clock = FakeClock()
    sched.small_decode_step_s = 0.01
    return sched


def test_ls_decodes_run_in_steps_of_their_own_at_their_pace():
    sched = paced()
    sched.add_request(req("be", 8, max_tokens=20))
    fake_step(sched)
    sched.add_request(req("ls", 4, max_tokens=20, priority=LS, arrival=1.0))
    assert fake_step(sched).request_ids == ["ls"]          # its prefill: an LS-only step
    be_step = sched.schedule()                             # the LS token is not due: BE runs without it
    assert be_step.request_ids == ["be"] and not sched.should_park(be_step)
    sched.clock.now += 0.045                               # target 50 ms less the 10 ms LS step
    assert sched.should_park(be_step)
    sched.park(be_step)
    ls_step = sched.schedule()
    assert ls_step.ls_only and ls_step.request_ids == ["ls"]
    sched.update_from_output(ls_step, ModelRunnerOutput({"ls": 7}))
    resumed = sched.schedule()
    assert resumed.resumed and resumed.request_ids == ["be"]
    sched.update_from_output(resumed, ModelRunnerOutput({"be": 7}))
    sched.clock.now += 0.045
    assert sched.schedule().request_ids == ["ls"]           # due between steps: LS goes first


def test_be_chunks_shrink_while_ls_streams_decode():
    sched = paced(blocks=256, max_num_batched_tokens=512, ls_active_max_batched_tokens=128)
    sched.add_request(req("ls", 4, max_tokens=20, priority=LS))
    fake_step(sched)
    sched.add_request(req("be", 300, max_tokens=4, arrival=1.0))
    out = sched.schedule()
    assert [(s.request.request_id, s.num_tokens) for s in out.scheduled] == [("be", 128)]


@pytest.mark.parametrize("ls_active_budget", [None, 0, -5])
def test_be_chunks_beside_ls_streams_take_the_full_budget_by_default(ls_active_budget):
    cfg = {} if ls_active_budget is None else {"ls_active_max_batched_tokens": ls_active_budget}
    sched = paced(blocks=256, max_num_batched_tokens=512, **cfg)
    sched.add_request(req("ls", 4, max_tokens=20, priority=LS))
    fake_step(sched)
    sched.add_request(req("be", 600, max_tokens=4, arrival=1.0))
    out = sched.schedule()
    assert [(s.request.request_id, s.num_tokens) for s in out.scheduled] == [("be", 512)]


def test_the_default_tpot_target_comes_from_one_row_steps_on_an_idle_worker():
    sched = make("qllm", blocks=256)
    sched.clock = FakeClock()

    def timed_step(seconds, tokens):
        out = sched.schedule()
        sched.clock.now += seconds
        sched.update_from_output(out, ModelRunnerOutput(tokens))
        return out

    sched.add_request(req("ls", 4, max_tokens=20, priority=LS))
    timed_step(0.03, {"ls": 7})                               # its prefill
    for _ in range(3):
        assert timed_step(0.005, {"ls": 7}).request_ids == ["ls"]
    assert sched.ls_tpot_target_s == pytest.approx(0.0075)    # 1.5 x the idle one-row step
    sched.add_request(req("be", 8, max_tokens=20, arrival=1.0))
    for _ in range(6):                                        # BE beside the stream: one-row LS steps run slower
        out = timed_step(0.009, {"ls": 7, "be": 7})
        assert out.request_ids in (["ls"], ["be"])
    assert sched.single_decode_step_s > 0.007
    assert sched.ls_tpot_target_s == pytest.approx(0.0075)    # still from the idle floor's


def test_ls_alone_is_never_held_back_by_pacing():
    sched = paced()
    sched.add_request(req("ls", 4, max_tokens=3, priority=LS))
    assert [fake_step(sched).request_ids for _ in range(3)] == [["ls"]] * 3


def test_without_layer_parking_nothing_is_parked():
    sched = make("qllm", layer_parking=False)
    sched.add_request(req("be", 8, max_tokens=8))
    be_step = sched.schedule()
    sched.add_request(req("ls", 4, priority=LS, arrival=1.0))
    assert not sched.should_park(be_step)


def test_abort_waiting_and_running_frees_blocks():
    sched = make()
    a, b = req("a", 8), req("b", 8, arrival=1.0)
    sched.add_request(a)
    fake_step(sched)
    sched.add_request(b)
    assert [o.request_id for o in sched.finish_requests(["a"])] == ["a"] and a.finish_reason is FinishReason.CANCELLED
    assert [o.finish_reason for o in sched.finish_requests(["b"])] == ["cancelled"]
    assert sched.allocator.num_free_blocks == sched.allocator.num_blocks and not sched.has_unfinished_requests()


def test_abort_in_flight_waits_for_step_end():
    sched = make()
    a = req("a", 8)
    sched.add_request(a)
    out = sched.schedule()
    assert sched.finish_requests(["a"]) == [] and not a.is_finished
    sched.update_from_output(out, ModelRunnerOutput({"a": 7}))
    assert a.finish_reason is FinishReason.CANCELLED
    assert sched.allocator.num_free_blocks == sched.allocator.num_blocks


def test_unknown_policy_is_rejected():
    with pytest.raises(ValueError, match="unknown policy"):
        make("nope")


def test_qllm_keeps_kv_reserve_for_ls():
    # 64 blocks x 4 = 256 tokens; the reserve is capped at capacity / 8 = 32 tokens.
    sched = make("qllm", blocks=64, block_size=4, max_num_batched_tokens=512, ls_reserved_kv_tokens=1024,
                 admission_output_fraction=0.0)
    sched.add_request(req("be1", 100, max_tokens=50))
    sched.add_request(req("be2", 130, max_tokens=50, arrival=1.0))  # would leave 24 < 32 tokens free
    out = fake_step(sched)
    assert out.request_ids == ["be1"]
    sched.add_request(req("ls", 100, priority=LS, arrival=2.0))  # LS may use the reserve
    out = fake_step(sched)
    assert "ls" in out.request_ids and "be2" not in out.request_ids and not out.preempted
    fcfs = make("fcfs", blocks=64, block_size=4, max_num_batched_tokens=512, admission_output_fraction=0.0)
    fcfs.add_request(req("be1", 100, max_tokens=50))
    fcfs.add_request(req("be2", 130, max_tokens=50, arrival=1.0))
    assert fake_step(fcfs).request_ids == ["be1", "be2"]


def test_qllm_reserves_running_slots_for_ls():
    sched = make("qllm", max_num_seqs=4, ls_reserved_slots=2)
    for i in range(4):
        sched.add_request(req(f"be{i}", 2, arrival=float(i)))
    assert fake_step(sched).request_ids == ["be0", "be1"]
    sched.add_request(req("ls", 2, priority=LS, arrival=9.0))
    out = fake_step(sched)
    assert "ls" in out.request_ids and not out.preempted


def test_qllm_idle_worker_admits_be_despite_reserve():
    sched = make("qllm", blocks=8, block_size=4, ls_reserved_kv_tokens=1024, ls_reserved_slots=100)
    sched.add_request(req("be", 20))
    assert fake_step(sched).request_ids == ["be"]


def test_allocator_gives_expected_size_one_contiguous_run():
    alloc = BlockAllocator(16, 4)
    alloc.allocate("a", 4)
    alloc.allocate("gap", 4)
    alloc.free("a")                                   # block 0 free, 1 used: a hole of one
    table = alloc.allocate("b", 4, expected_tokens=20)
    assert table == [2, 3, 4, 5, 6]                    # skips the hole for one run of 5
    assert alloc.allocate("b", 20) == table            # growth inside the run allocates nothing
    with pytest.raises(OutOfBlocks):
        alloc.allocate("c", 44)                        # 11 blocks wanted, 9 free


def test_allocator_falls_back_to_scattered_blocks():
    alloc = BlockAllocator(6, 4)
    for rid in "abcdef":
        alloc.allocate(rid, 4)
    for rid in "ace":
        alloc.free(rid)
    table = alloc.allocate("x", 12, expected_tokens=24)
    assert sorted(table) == [0, 2, 4] and alloc.num_free_blocks == 0
    alloc.free("x")
    assert alloc.num_free_blocks == 3


def test_priority_admits_ls_on_free_blocks_despite_promised_growth():
    # be reserves 6 + 20 tokens = 7 blocks at admission but, with no run free, holds only what it uses.
    sched = make("priority", blocks=8, block_size=4, max_num_batched_tokens=64)
    be = req("be", 6, max_tokens=20)
    sched.add_request(be)
    fake_step(sched)
    sched.add_request(req("ls", 4, priority=LS, arrival=1.0))
    out = fake_step(sched)
    assert "ls" in out.request_ids and not out.preempted
