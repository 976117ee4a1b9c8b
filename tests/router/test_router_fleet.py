"""Losing a worker re-queues its requests; discovery adds and removes workers; BE admission control."""

import asyncio
from dataclasses import dataclass, field

import grpc
import pytest

from qllm.v1 import worker_pb2
from router.core import RESTART, Job, Overloaded, RouterCore
from router.discovery import WorkerDiscovery, split_target


@dataclass(eq=False)
class FakeWorker:
    address: str
    max_num_seqs: int = 4
    healthy: bool = True
    sent: list = field(default_factory=list)
    handlers: dict = field(default_factory=dict)
    started: bool = False
    closed: bool = False
    on_lost: object = None
    on_ready: object = None

    @property
    def info(self):
        return worker_pb2.WorkerInfo(max_num_seqs=self.max_num_seqs)

    @property
    def in_flight(self):
        return len(self.handlers)

    def submit(self, submit, handler):
        self.sent.append(submit.request_id)
        self.handlers[submit.request_id] = handler

    def done(self, rid):
        self.handlers.pop(rid, None)

    def cancel(self, rid):
        self.handlers.pop(rid, None)

    def token(self, rid, finished=False):
        self.handlers[rid](worker_pb2.WorkerEvent(request_id=rid, tokens=worker_pb2.TokenDelta(
            token_ids=[7], finished=finished)))

    def die(self):
        self.healthy = False
        handlers, self.handlers = self.handlers, {}
        self.on_lost(self, list(handlers))

    def come_back(self):
        self.healthy = True
        self.on_ready()

    def start(self):
        self.started = True

    async def close(self):
        self.closed = True


def job(rid, ls=False):
    return Job(rid, ls, worker_pb2.SubmitRequest(request_id=rid))


def drain(j):
    out = []
    while not j.events.empty():
        out.append(j.events.get_nowait())
    return out


async def test_lost_worker_requests_are_requeued_on_another():
    a, b = FakeWorker("a", max_num_seqs=1), FakeWorker("b", max_num_seqs=1)
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


async def test_requeue_limit_and_no_worker_end_with_unavailable():
    a = FakeWorker("a")
    core = RouterCore([a], max_requeues=0, requeue_timeout_s=0.05)
    j = job("r0")
    core.submit(j)
    a.die()
    event = drain(j)[-1]
    assert event.rejected.code == grpc.StatusCode.UNAVAILABLE.value[0]

    b = FakeWorker("b")
    core = RouterCore([b], max_requeues=3, requeue_timeout_s=0.05)
    j = job("r1")
    core.submit(j)
    b.die()                                      # nobody left to take it
    await asyncio.sleep(0.1)
    assert drain(j)[-1].rejected.code == grpc.StatusCode.UNAVAILABLE.value[0]
    assert len(core.queues) == 0


async def test_worker_that_comes_back_gets_queued_work():
    a = FakeWorker("a", max_num_seqs=1)
    core = RouterCore([a], requeue_timeout_s=5)
    core.submit(job("r0"))
    a.die()
    assert len(core.queues) == 1
    a.come_back()
    assert a.sent == ["r0", "r0"] and len(core.queues) == 0


async def test_be_admission_control_bound_and_deadline():
    a = FakeWorker("a", max_num_seqs=1)
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


async def test_discovery_adds_and_retires_workers():
    made = []

    def make(address):
        w = FakeWorker(address)
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
