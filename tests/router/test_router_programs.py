"""Agent programs in the router: program-level FCFS keys, tool gaps, affinity to the previous worker."""

from qllm.v1 import worker_pb2
from router.core import Job, RouterCore
from router.programs import ProgramTracker


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_turns_keep_the_programs_first_arrival_and_measure_tool_gaps():
    clock = Clock()
    tracker = ProgramTracker(clock=clock)
    first = tracker.turn_arrived("p", arrival=1.0)
    assert (first.turn_index, first.order_arrival, first.prev_tool_duration_s) == (0, 1.0, 0.0)
    tracker.turn_dispatched("p", "w1:50061")
    clock.t = 3.0
    tracker.turn_finished("p", last_turn=False)
    second = tracker.turn_arrived("p", arrival=4.5)
    assert second.turn_index == 1 and second.order_arrival == 1.0
    assert second.prev_tool_duration_s == 1.5 and second.preferred_worker == "w1:50061"
    tracker.turn_finished("p", last_turn=True)
    assert len(tracker) == 0


def test_tracker_forgets_least_recently_active_programs_beyond_its_bound():
    tracker = ProgramTracker(max_programs=2)
    for p in ("a", "b", "c"):
        tracker.turn_arrived(p, arrival=0.0)
    assert len(tracker) == 2 and tracker.turn_arrived("a", arrival=1.0).turn_index == 0  # "a" was forgotten


def test_affinity_prefers_the_previous_worker_and_falls_back_when_it_is_gone(fake_worker):
    a, b = fake_worker("a"), fake_worker("b")
    core = RouterCore([a, b])
    core.submit(Job("x", False, worker_pb2.SubmitRequest(request_id="x")))  # a is now busier than b
    turn = Job("t1", False, worker_pb2.SubmitRequest(request_id="t1"), preferred_worker=a.address)
    busy = a if a.sent else b
    turn.preferred_worker = busy.address
    core.submit(turn)
    assert busy.sent[-1] == "t1"                  # affinity beats least-loaded
    busy.healthy = False
    other = b if busy is a else a
    core.submit(Job("t2", False, worker_pb2.SubmitRequest(request_id="t2"), preferred_worker=busy.address))
    assert other.sent[-1] == "t2"                 # the pinned worker is gone: elsewhere, recomputed
