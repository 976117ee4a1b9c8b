"""The router's queues and release of work (pure; fake workers, no gRPC)."""

from dataclasses import dataclass

import pytest

from qllm.v1 import worker_pb2
from router.core import Job, RouterCore
from router.queues import RequestQueues


@dataclass
class Item:
    request_id: str
    is_ls: bool
    arrival: float
    length_score: float | None = None


def drain(q):
    out = []
    while len(q):
        out.append(q.pop().request_id)
    return out


def test_class_mode_releases_ls_first_then_be_in_arrival_order():
    q = RequestQueues("class")
    for i, ls in enumerate([False, True, False, True]):
        q.push(Item(f"r{i}", ls, float(i)))
    assert q.counts() == (2, 2)
    assert drain(q) == ["r1", "r3", "r0", "r2"]


def test_fifo_mode_is_one_arrival_ordered_queue():
    q = RequestQueues("fifo")
    for i, ls in enumerate([False, True, False, True]):
        q.push(Item(f"r{i}", ls, float(i)))
    assert q.counts() == (2, 2)
    assert drain(q) == ["r0", "r1", "r2", "r3"]


def test_ltr_orders_be_shortest_predicted_first_and_unscored_last():
    q = RequestQueues("class", be_order="ltr", starvation_threshold=0)
    q.push(Item("long", False, 0.0, length_score=5.0))
    q.push(Item("unscored", False, 1.0, length_score=None))
    q.push(Item("short", False, 2.0, length_score=1.0))
    q.push(Item("ls", True, 3.0))
    assert drain(q) == ["ls", "short", "long", "unscored"]


def test_remove_from_either_class():
    q = RequestQueues("class", be_order="ltr")
    q.push(Item("a", True, 0.0))
    q.push(Item("b", False, 1.0, length_score=1.0))
    assert q.remove("b").request_id == "b" and q.remove("a").request_id == "a" and len(q) == 0
    assert q.remove("zzz") is None


def test_unknown_mode_or_order_rejected():
    with pytest.raises(ValueError):
        RequestQueues("lifo")
    with pytest.raises(ValueError):
        RequestQueues("class", be_order="random")


def job(rid, ls=False):
    return Job(rid, ls, worker_pb2.SubmitRequest(request_id=rid))


async def test_be_released_within_the_worker_window_and_ls_at_once(fake_worker):
    w = fake_worker("w0", max_num_seqs=2)
    core = RouterCore([w])
    for rid in ("b0", "b1", "b2"):
        core.submit(job(rid))
    assert w.sent == ["b0", "b1"]              # window = the worker's max_num_seqs
    core.submit(job("ls", ls=True))
    assert w.sent[-1] == "ls"                  # LS skips the window
    w.finish("b0")
    w.finish("ls")
    assert w.sent[-1] == "b2"


async def test_fifo_mode_holds_ls_behind_queued_be(fake_worker):
    w = fake_worker("w0", max_num_seqs=1)
    core = RouterCore([w], queue_mode="fifo")
    core.submit(job("b0"))
    core.submit(job("b1"))
    core.submit(job("ls", ls=True))
    assert w.sent == ["b0"]
    w.finish("b0")
    assert w.sent == ["b0", "b1"]


async def test_least_loaded_healthy_worker_and_cancel_of_queued(fake_worker):
    a, b, down = fake_worker("a", 4), fake_worker("b", 4), fake_worker("down", 4, healthy=False)
    core = RouterCore([a, b, down])
    for rid in ("r0", "r1", "r2"):
        core.submit(job(rid))
    assert sorted(a.sent + b.sent) == ["r0", "r1", "r2"] and not down.sent
    assert abs(len(a.sent) - len(b.sent)) == 1
    full = RouterCore([fake_worker("c", 1)])
    j0, j1 = job("x0"), job("x1")
    full.submit(j0)
    full.submit(j1)
    full.cancel(j1)
    assert len(full.queues) == 0
