"""Losing a worker re-queues its requests; discovery adds and removes workers; BE admission control."""

import asyncio

import grpc
import pytest

from qllm.v1 import worker_pb2
from router.core import RESTART, Job, Overloaded, RouterCore
from router.discovery import WorkerDiscovery, split_target


def job(rid, ls=False):
    return Job(rid, ls, worker_pb2.SubmitRequest(request_id=rid))


def drain(j):
    out = []
    while not j.events.empty():
        out.append(j.events.get_nowait())
    return out


async def test_lost_worker_requests_are_requeued_on_another(fake_worker):
    a, b = fake_worker("a", max_num_seqs=1), fake_worker("b", max_num_seqs=1)
    core = RouterCore([a, b])
    j0, j1 = job("r0"), job("r1")
    core.submit(j0)
    core.submit(j1)
    on_a = a.sent[0]
    lost = j0 if on_a == "r0" else j1
    a.token(on_a)
    b.token(b.sent[0], finished=True)           # b frees its slot
    a.die()
    assert b.sent[-1] == on_a                    # re-run from the start on b
    events = drain(lost)
    assert events[-1] is RESTART and lost.requeues == 1
    b.token(on_a, finished=True)
    assert not core.jobs


async def test_requeue_limit_and_no_worker_end_with_unavailable(fake_worker):
    a = fake_worker("a")
    core = RouterCore([a], max_requeues=0, requeue_timeout_s=0.05)
    j = job("r0")
    core.submit(j)
    a.die()
    event = drain(j)[-1]
    assert event.rejected.code == grpc.StatusCode.UNAVAILABLE.value[0]

    b = fake_worker("b")
    core = RouterCore([b], max_requeues=3, requeue_timeout_s=0.05)
    j = job("r1")
    core.submit(j)
    b.die()                                      # nobody left to take it
    await asyncio.sleep(0.1)
    assert drain(j)[-1].rejected.code == grpc.StatusCode.UNAVAILABLE.value[0]
    assert len(core.queues) == 0


async def test_a_second_worker_loss_gets_its_own_requeue_window(fake_worker):
    """Issue 16: worker lost, restarted, lost again 14.8 s later; the first loss's expiry (30 s after it)
    failed the twice re-queued request after 15.2 s. Each loss now gives the full window."""
    now = [100.0]
    a = fake_worker("a")
    core = RouterCore([a], max_requeues=3, requeue_timeout_s=30.0, clock=lambda: now[0])
    j = job("r0")
    core.submit(j)
    a.die()                                      # loss 1 at t=100: its expiry runs at t=130
    now[0] = 105.0
    a.come_back()                                # restarted; the request runs again
    assert a.sent == ["r0", "r0"]
    now[0] = 114.8
    a.die()                                      # loss 2 at t=114.8: the request's window ends at t=144.8
    now[0] = 130.0
    core._expire_orphans()                       # loss 1's timer
    assert not any(e is not RESTART and e.WhichOneof("kind") == "rejected" for e in drain(j))
    assert len(core.queues) == 1
    now[0] = 140.0
    a.come_back()                                # back within the second window: the request completes
    a.finish("r0")
    assert drain(j)[-1].tokens.finished and not core.jobs

    b = fake_worker("b")                         # and past its own window it does end with UNAVAILABLE
    core = RouterCore([b], max_requeues=3, requeue_timeout_s=30.0, clock=lambda: now[0])
    j = job("r1")
    core.submit(j)
    b.die()
    now[0] += 30.0
    core._expire_orphans()
    assert drain(j)[-1].rejected.code == grpc.StatusCode.UNAVAILABLE.value[0]


async def test_worker_that_comes_back_gets_queued_work(fake_worker):
    a = fake_worker("a", max_num_seqs=1)
    core = RouterCore([a], requeue_timeout_s=5)
    core.submit(job("r0"))
    a.die()
    assert len(core.queues) == 1
    a.come_back()
    assert a.sent == ["r0", "r0"] and len(core.queues) == 0


async def test_be_admission_control_bound_and_deadline(fake_worker):
    a = fake_worker("a", max_num_seqs=1)
    core = RouterCore([a], max_be_queue=2)
    core.submit(job("run"))
    core.submit(job("q1"))
    core.submit(job("q2"))
    with pytest.raises(Overloaded, match="queue is full"):
        core.submit(job("q3"))
    core.submit(job("ls", ls=True))              # LS is still admitted
    core.be_service_s = 10.0                     # each BE holds the slot ~10 s; 2 queued ahead -> ~20 s wait
    core.max_be_queue = 0
    with pytest.raises(Overloaded, match="deadline"):
        core.submit(job("late"), deadline_s=5.0)
    core.submit(job("patient"), deadline_s=60.0)


async def test_discovery_adds_and_retires_workers(fake_worker):
    made = []

    def make(address):
        w = fake_worker(address)
        made.append(w)
        return w

    core = RouterCore([])
    answers = [{"10.0.0.1:50061", "10.0.0.2:50061"}, {"10.0.0.2:50061", "10.0.0.3:50061"}]
    discovery = WorkerDiscovery(core, ["dns:///qllm-worker-headless:50061"], make, interval_s=3600)

    async def resolve():
        return answers.pop(0)

    discovery.resolve = resolve
    await discovery.start()
    assert sorted(w.address for w in core.workers) == ["10.0.0.1:50061", "10.0.0.2:50061"]
    assert all(w.started for w in made)
    await discovery.refresh()
    assert sorted(w.address for w in core.workers) == ["10.0.0.2:50061", "10.0.0.3:50061"]
    await asyncio.sleep(0.01)
    assert made[0].closed
    await discovery.stop()


def test_split_target():
    assert split_target("host:50061") == ("host", 50061)
    assert split_target("[::1]:50061") == ("::1", 50061)
    with pytest.raises(ValueError, match="--workers"):
        split_target("nohost")


async def test_draining_worker_rejection_requeues_elsewhere(fake_worker):
    a, b = fake_worker("a", max_num_seqs=1), fake_worker("b", max_num_seqs=1)
    core = RouterCore([a, b])
    j = job("r0")
    core.submit(j)
    first = a if a.sent else b
    other = b if first is a else a
    first.handlers["r0"](worker_pb2.WorkerEvent(request_id="r0", rejected=worker_pb2.Rejection(
        code=grpc.StatusCode.UNAVAILABLE.value[0], message="worker draining: not taking new requests",
        draining=True)))
    assert not first.healthy and other.sent == ["r0"]
    assert drain(j) == [RESTART]
