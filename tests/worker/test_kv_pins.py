"""Agent-program KV pins on the worker, without torch: the pin store and how the scheduler uses it."""

import math

from worker.outputs import ModelRunnerOutput
from worker.kv_blocks import BlockAllocator
from worker.kv_pins import PinStore, owner_id
from worker.request import FinishReason, Priority, Request, SamplingParams
from worker.scheduler import SchedulerConfig, make_scheduler

LS, BE = Priority.LATENCY_SENSITIVE, Priority.BEST_EFFORT


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def make(policy="fcfs", blocks=64, block_size=4, **cfg):
    return make_scheduler(policy, SchedulerConfig(**cfg), BlockAllocator(blocks, block_size))


def turn(rid, prompt, max_tokens=3, program="p", last=False, priority=BE, arrival=0.0):
    return Request(rid, list(prompt), SamplingParams(max_tokens=max_tokens, ignore_eos=True), priority,
                   frozenset({0}), arrival_time=arrival, program_id=program, last_turn=last)


def run(sched, limit=500, token=7):
    steps = []
    while sched.has_unfinished_requests():
        out = sched.schedule()
        steps.append(out)
        sched.update_from_output(out, ModelRunnerOutput({s.request.request_id: token for s in out.scheduled if s.samples}))
        assert len(steps) < limit
    return steps


# --- the store ---------------------------------------------------------------------------------------------
def store(blocks=16, block_size=4, provisional_s=1.0):
    alloc = BlockAllocator(blocks, block_size)
    clock = Clock()
    return alloc, PinStore(alloc, provisional_s, clock=clock), clock


def test_retain_moves_the_computed_blocks_and_frees_the_rest():
    alloc, pins, _ = store()
    alloc.allocate("r1", 20)                       # 5 blocks
    pins.retain("p", "r1", list(range(9)))         # KV of 9 tokens = 3 blocks
    assert alloc.block_table("r1") == []
    assert len(alloc.block_table(owner_id("p"))) == 3
    assert alloc.num_free_blocks == 13
    assert pins.pinned_tokens == 9 and len(pins) == 1


def test_claim_takes_the_longest_common_prefix_and_frees_the_tail():
    alloc, pins, _ = store()
    alloc.allocate("r1", 12)
    blocks = list(alloc.block_table("r1"))
    pins.retain("p", "r1", [1, 2, 3, 4, 5, 6, 7, 8, 9, 10])
    n = pins.claim("p", "r2", [1, 2, 3, 4, 5, 99, 100])
    assert n == 5
    assert alloc.block_table("r2") == blocks[:2]   # the blocks keep their KV: nothing is copied
    assert "p" not in pins and pins.pinned_tokens == 0
    assert alloc.num_free_blocks == 14
    pins.confirm("r2")
    assert pins.reused_tokens == 5 and pins.ended["claimed"] == 1


def test_claim_leaves_the_last_prompt_token_to_compute():
    alloc, pins, _ = store()
    alloc.allocate("r1", 8)
    pins.retain("p", "r1", [1, 2, 3, 4, 5, 6])
    assert pins.claim("p", "r2", [1, 2, 3, 4]) == 3  # the whole prompt matches: its last token still runs


def test_no_match_leaves_the_pin_alone():
    alloc, pins, _ = store()
    alloc.allocate("r1", 8)
    pins.retain("p", "r1", [1, 2, 3])
    assert pins.claim("p", "r2", [9, 9, 9]) == 0
    assert "p" in pins and alloc.block_table("r2") == []


def test_unclaim_restores_the_pin_with_its_expiry_and_score():
    alloc, pins, clock = store()
    alloc.allocate("r1", 12)
    pins.retain("p", "r1", list(range(1, 11)))
    pins.set("p", 30.0, 0.9)
    clock.now += 5
    assert pins.claim("p", "r2", list(range(1, 8)) + [50]) == 7
    pins.unclaim("r2")
    pin = pins.get("p")
    assert pin.tokens == 7 and pin.keep_score == 0.9 and pin.expires_at == 130.0
    assert alloc.block_table("r2") == [] and len(alloc.block_table(owner_id("p"))) == 2


def test_provisional_then_ttl_then_expiry():
    alloc, pins, clock = store(provisional_s=1.0)
    alloc.allocate("r1", 8)
    pins.retain("p", "r1", [1, 2, 3])
    assert pins.get("p").provisional
    clock.now += 0.5
    pins.set("p", 2.0, 0.7)
    clock.now += 1.0                               # past the provisional second, within the TTL
    assert pins.expire() == 0 and "p" in pins
    clock.now += 1.01
    assert pins.expire() == 1 and "p" not in pins
    assert alloc.num_free_blocks == 16 and pins.ended["expired"] == 1


def test_ttl_zero_frees_and_unknown_program_is_not_held():
    alloc, pins, _ = store()
    alloc.allocate("r1", 8)
    pins.retain("p", "r1", [1, 2, 3])
    assert pins.set("p", 0.0, 1.0) is None and "p" not in pins
    assert pins.set("nobody", 5.0, 1.0) is None
    assert alloc.num_free_blocks == 16


def test_infinite_ttl_never_expires():
    alloc, pins, clock = store()
    alloc.allocate("r1", 8)
    pins.retain("p", "r1", [1, 2, 3])
    pins.set("p", math.inf, 1.0)
    clock.now += 1e9
    assert pins.expire() == 0 and "p" in pins


def test_eviction_order_is_keep_score_then_expiry():
    alloc, pins, _ = store(blocks=32)
    for pid, ttl, score in [("a", 10, 0.9), ("b", 5, 0.2), ("c", 1, 0.2), ("d", 10, 0.5)]:
        alloc.allocate(pid + "-req", 4)
        pins.retain(pid, pid + "-req", [1, 2, 3])
        pins.set(pid, ttl, score)
    order = []
    while pins.evict_one("pressure"):
        order.append(next(pid for pid in "abcd" if pid not in pins and pid not in order))
    assert order == ["c", "b", "d", "a"]


def test_evict_one_spares_the_program_about_to_use_its_pin():
    alloc, pins, _ = store()
    alloc.allocate("r", 4)
    pins.retain("p", "r", [1, 2])
    assert not pins.evict_one("ls", keep="p") and "p" in pins


# --- the scheduler --------------------------------------------------------------------------------------------
def test_a_non_final_turn_pins_its_kv_and_the_next_turn_computes_only_the_suffix():
    sched = make(max_num_batched_tokens=64)
    t1 = turn("t1", range(1, 21), max_tokens=3)
    sched.add_request(t1)
    run(sched)
    assert t1.finish_reason is FinishReason.LENGTH
    pin = sched.pins.get("p")
    assert pin.tokens == 22                        # 20 prompt + 2 of the 3 outputs have KV
    prompt2 = t1.all_token_ids + [50, 51, 52, 53]
    t2 = turn("t2", prompt2, max_tokens=2)
    sched.add_request(t2)
    steps = run(sched)
    first = steps[0].scheduled[0]
    assert (first.start, first.num_tokens) == (22, 5)  # 27-token prompt, 22 from the pin
    assert t2.num_cached_tokens == 22
    assert "p" in sched.pins                       # t2 was not the last turn either


def test_the_last_turn_frees_everything():
    sched = make(max_num_batched_tokens=64)
    t1 = turn("t1", range(1, 21))
    sched.add_request(t1)
    run(sched)
    t2 = turn("t2", t1.all_token_ids + [9, 9], last=True)
    sched.add_request(t2)
    run(sched)
    assert len(sched.pins) == 0 and sched.allocator.num_free_blocks == sched.allocator.num_blocks


def test_cancelled_turns_and_plain_requests_pin_nothing():
    sched = make()
    plain = Request("x", [1, 2, 3], SamplingParams(max_tokens=2, ignore_eos=True))
    sched.add_request(plain)
    t = turn("t", [1, 2, 3, 4], max_tokens=50)
    sched.add_request(t)
    out = sched.schedule()
    sched.update_from_output(out, ModelRunnerOutput({s.request.request_id: 7 for s in out.scheduled if s.samples}))
    sched.finish_requests(["t"])
    run(sched)
    assert len(sched.pins) == 0 and sched.allocator.num_free_blocks == sched.allocator.num_blocks


def test_pins_do_not_block_ls_admission():
    # 8 blocks of 4: a pin holds 6, the LS request needs 5 blocks in all.
    sched = make("qllm", blocks=8, block_size=4, ls_reserved_kv_tokens=0, ls_reserved_slots=0)
    t1 = turn("t1", range(1, 22), max_tokens=3)   # 23 KV tokens pinned = 6 blocks
    sched.add_request(t1)
    run(sched)
    assert sched.pins.pinned_tokens == 23
    ls = Request("ls", list(range(100, 116)), SamplingParams(max_tokens=4, ignore_eos=True), LS, frozenset({0}))
    sched.add_request(ls)
    out = sched.schedule()
    assert out.request_ids == ["ls"]
    assert "p" not in sched.pins and sched.pins.ended["ls"] == 1


def test_pins_hold_back_be_admission_while_other_work_runs_but_never_idle_the_worker():
    sched = make("fcfs", blocks=8, block_size=4, admission_output_fraction=1.0)
    t1 = turn("t1", range(1, 18), max_tokens=3, program="p")  # 19 KV tokens = 5 blocks pinned
    sched.add_request(t1)
    run(sched)
    # Nothing runs: a BE request that does not fit takes the pin's memory rather than wait.
    be = Request("be", list(range(1, 13)), SamplingParams(max_tokens=4, ignore_eos=True), BE, frozenset({0}))
    sched.add_request(be)
    out = sched.schedule()
    assert out.request_ids == ["be"] and "p" not in sched.pins
    assert sched.pins.ended["idle"] == 1


def test_be_waits_for_a_pin_while_work_runs():
    sched = make("fcfs", blocks=10, block_size=4)
    t1 = turn("t1", range(1, 14), max_tokens=3, program="p")  # 15 KV tokens = 4 blocks pinned
    sched.add_request(t1)
    run(sched)
    running = Request("run", [1, 2, 3, 4], SamplingParams(max_tokens=8, ignore_eos=True), BE, frozenset({0}))
    sched.add_request(running)                     # 12 tokens = 3 blocks
    sched.update_from_output(sched.schedule(), ModelRunnerOutput())
    be = Request("be", list(range(1, 12)), SamplingParams(max_tokens=4, ignore_eos=True), BE, frozenset({0}))
    sched.add_request(be)                          # needs 4 blocks; 3 are free
    out = sched.schedule()
    assert "be" not in out.request_ids and "p" in sched.pins


def test_a_turn_that_cannot_start_gives_its_prefix_back_to_the_pin():
    sched = make("fcfs", blocks=10, block_size=4, max_num_seqs=1)
    t1 = turn("t1", range(1, 10), max_tokens=3, program="p")
    sched.add_request(t1)
    run(sched)
    tokens = sched.pins.pinned_tokens
    blocker = Request("b", [1, 2], SamplingParams(max_tokens=20, ignore_eos=True), BE, frozenset({0}))
    sched.add_request(blocker)
    sched.update_from_output(sched.schedule(), ModelRunnerOutput())
    t2 = turn("t2", t1.all_token_ids + [5, 5], program="p", arrival=1.0)
    sched.add_request(t2)
    out = sched.schedule()                         # max_num_seqs = 1: t2 cannot start
    assert "t2" not in out.request_ids
    assert sched.pins.pinned_tokens == tokens and t2.num_computed_tokens == 0
    assert sched.allocator.block_table("t2") == []


def test_running_requests_grow_into_pinned_memory_before_anyone_is_preempted():
    sched = make("fcfs", blocks=8, block_size=4, admission_output_fraction=0.0)
    t1 = turn("t1", range(1, 14), max_tokens=3, program="p")   # 4 blocks pinned
    sched.add_request(t1)
    run(sched)
    r = Request("r", [1, 2, 3, 4], SamplingParams(max_tokens=20, ignore_eos=True), BE, frozenset({0}))
    sched.add_request(r)
    run(sched)
    assert r.num_preemptions == 0 and r.finish_reason is FinishReason.LENGTH
    assert sched.pins.ended.get("pressure", 0) == 1


def test_fail_all_frees_pins():
    sched = make()
    t1 = turn("t1", range(1, 10))
    sched.add_request(t1)
    run(sched)
    sched.fail_all()
    assert len(sched.pins) == 0 and sched.allocator.num_free_blocks == sched.allocator.num_blocks
