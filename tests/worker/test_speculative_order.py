"""Waiting BE work with a predicted length runs least-expected-work-left first, re-estimated as tokens come
(pure scheduler, no torch)."""

from worker.kv_blocks import BlockAllocator
from worker.request import Priority, Request, SamplingParams
from worker.scheduler import SchedulerConfig, make_scheduler


def req(rid, predicted, max_tokens=200, arrival=0.0, generated=0):
    r = Request(rid, [1, 2, 3, 4], SamplingParams(max_tokens=max_tokens, ignore_eos=True), Priority.BEST_EFFORT,
                arrival_time=arrival, predicted_output_tokens=predicted)
    r.output_token_ids = [7] * generated
    return r


def test_expected_remaining_tokens():
    assert req("a", 0, max_tokens=50).expected_remaining_tokens == 50           # no prediction: the budget
    assert req("b", 30, max_tokens=50).expected_remaining_tokens == 30
    assert req("c", 30, max_tokens=50, generated=12).expected_remaining_tokens == 18
    assert req("d", 30, max_tokens=50, generated=40).expected_remaining_tokens == 1  # ran past it: almost done
    assert req("e", 90, max_tokens=50, generated=10).expected_remaining_tokens == 40  # capped by the budget


def test_least_expected_work_left_is_admitted_first():
    sched = make_scheduler("priority", SchedulerConfig(max_num_seqs=1), BlockAllocator(64, 16))
    long_first = req("long", 400, max_tokens=500, arrival=0.0)
    short_later = req("short", 20, max_tokens=500, arrival=1.0)
    nearly_done = req("preempted", 300, max_tokens=500, arrival=2.0, generated=295)  # 5 left
    for r in (long_first, short_later, nearly_done):
        sched.add_request(r)
    assert sched.schedule().request_ids == ["preempted"]


def test_without_predictions_arrival_order_stands():
    sched = make_scheduler("priority", SchedulerConfig(max_num_seqs=1), BlockAllocator(64, 16))
    for rid, arrival in (("b", 1.0), ("a", 0.0)):
        sched.add_request(req(rid, 0, arrival=arrival))
    assert sched.schedule().request_ids == ["a"]
