"""The router's core: class queues in front of the workers, and release of work as capacity allows.

LS requests go to the least-loaded worker at once. BE requests (and, in `fifo` mode, everything) are
released while a worker has fewer than `max_inflight_per_worker` requests; the rest wait in the router's
queue, where their order is the router's to choose.

When a worker's stream breaks, the requests it held are re-queued and run again from the start on another
worker (recomputed): sampling is seeded per request, so the replay produces the same tokens and the
handler skips those the client already has (RESTART marks where a replay begins). A request that finds no
worker within `requeue_timeout_s`, or is re-queued more than `max_requeues` times, ends with UNAVAILABLE;
none is dropped silently.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import grpc

from qllm.contract import Priority
from qllm.v1 import worker_pb2
from router import metrics
from router.queues import RequestQueues
from router.worker_client import WorkerClient


@dataclass
class Job:
    request_id: str
    is_ls: bool
    submit: worker_pb2.SubmitRequest
    arrival: float = field(default_factory=time.monotonic)
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    worker: WorkerClient | None = None
    worker_address: str = ""  # where it ran, kept after it finishes (affinity, pin reports)
    # Order keys within the BE queue (router/orders.py); None = unknown, served in arrival order.
    length_score: float | None = None      # ltr: the predictor's rank score (larger = longer)
    est_remaining_s: float | None = None   # speculative: estimated execution time
    true_length: int | None = None         # oracle (benchmarks only): the known output length
    requeues: int = 0
    requeued_at: float | None = None       # when it last lost its worker: its own re-queue window starts there
    dispatched_at: float | None = None
    preferred_worker: str = ""             # affinity: the worker holding this program's previous turn


class NoWorker(Exception):
    pass


class Overloaded(Exception):
    """BE admission control: the queue is past its bound, or the predicted wait past the deadline."""


# Put on a job's event queue when it is re-queued: the next events replay the request from its start.
RESTART = object()


class RouterCore:
    def __init__(self, workers: list[WorkerClient], queue_mode: str = "class", max_inflight_per_worker: int = 0,
                 be_order: str = "arrival", max_requeues: int = 2, requeue_timeout_s: float = 30.0,
                 max_be_queue: int = 0, clock=time.monotonic, **order_kwargs):
        self.clock = clock  # re-queue windows
        self.workers = []
        for w in workers:
            self.add_worker(w)
        self.max_requeues = max_requeues
        self.requeue_timeout_s = requeue_timeout_s
        self.jobs: dict[str, Job] = {}  # dispatched and not finished, by request id
        self.max_be_queue = max_be_queue  # 0 = unbounded
        # EWMA of how long a BE request holds a worker slot, for the predicted wait of a queued one.
        self.be_service_s: float | None = None
        self.queues: RequestQueues[Job] = RequestQueues(queue_mode, be_order, **order_kwargs)
        # 0 = the worker's own max_num_seqs: everything released can start at once, and the order of what
        # waits is the router's (its BE order), not the worker's arrival order.
        self.max_inflight = max_inflight_per_worker

    def window(self, worker: WorkerClient) -> int:
        if self.max_inflight:
            return self.max_inflight
        return worker.info.max_num_seqs if worker.info is not None and worker.info.max_num_seqs else 32

    def add_worker(self, worker: WorkerClient) -> None:
        worker.on_lost = self._worker_lost
        worker.on_ready = self._dispatch
        self.workers.append(worker)

    def remove_worker(self, worker: WorkerClient) -> None:
        """Stops using a worker (it left the DNS answer); what it runs now finishes or is re-queued."""
        if worker in self.workers:
            self.workers.remove(worker)

    def healthy_workers(self) -> list[WorkerClient]:
        return [w for w in self.workers if w.healthy]

    def predicted_be_wait_s(self) -> float:
        """Queued BE ahead x mean BE service time / slots: when a new BE request would start, roughly."""
        if self.be_service_s is None:
            return 0.0
        slots = sum(self.window(w) for w in self.healthy_workers()) or 1
        return self.queues.counts()[1] * self.be_service_s / slots

    def submit(self, job: Job, deadline_s: float | None = None) -> None:
        """Queues a job; BE is refused at once (Overloaded) past the queue bound or when its predicted wait
        is longer than the time it has left; LS is always taken while any worker is up."""
        if not self.healthy_workers():
            raise NoWorker("no worker is available")
        if not job.is_ls:
            queued_be = self.queues.counts()[1]
            if self.max_be_queue and queued_be >= self.max_be_queue:
                raise Overloaded(f"priority: the best-effort queue is full ({queued_be} requests); retry later")
            if deadline_s is not None:
                wait = self.predicted_be_wait_s()
                if wait > deadline_s:
                    raise Overloaded(f"priority: predicted best-effort wait {wait:.1f} s exceeds the request's "
                                     f"deadline ({deadline_s:.1f} s left)")
        self.queues.push(job)
        self._dispatch()

    def cancel(self, job: Job) -> None:
        self.jobs.pop(job.request_id, None)
        if self.queues.remove(job.request_id) is not None:
            self._publish()
            return
        if job.worker is not None:
            job.worker.cancel(job.request_id)
            job.worker = None
            self._dispatch()

    def _worker_lost(self, worker: WorkerClient, request_ids: list[str]) -> None:
        for rid in request_ids:
            job = self.jobs.get(rid)
            if job is not None:
                self._requeue(job, f"worker {worker.address} was lost")
        asyncio.get_running_loop().call_later(self.requeue_timeout_s, self._expire_orphans)
        self._dispatch()

    def _requeue(self, job: Job, why: str) -> None:
        job.worker = None
        job.requeues += 1
        job.requeued_at = self.clock()
        metrics.REQUEUED.inc()
        if job.requeues > self.max_requeues:
            self._fail(job, f"{why} and the request was already re-queued {job.requeues - 1} times")
            return
        job.events.put_nowait(RESTART)
        self.queues.push(job)

    def _expire_orphans(self) -> None:
        """Re-queued requests that still found no worker within their own window are failed rather than left
        waiting forever. Each loss schedules this once; a request re-queued by a later loss has a later
        window, so an earlier loss's timer must not cut it short."""
        if self.healthy_workers():
            return
        # A timer may fire a hair before its delay as the loop's clock counts it.
        cutoff = self.clock() - self.requeue_timeout_s + 0.001
        for job in [j for j in list(self.jobs.values()) if j.requeues and j.worker is None
                    and j.requeued_at is not None and j.requeued_at <= cutoff]:
            if self.queues.remove(job.request_id) is not None:
                self._fail(job, "no worker became available for a re-queued request")
        self._publish()

    def _fail(self, job: Job, message: str) -> None:
        self.jobs.pop(job.request_id, None)
        metrics.LOST.inc()
        job.events.put_nowait(worker_pb2.WorkerEvent(request_id=job.request_id, rejected=worker_pb2.Rejection(
            code=grpc.StatusCode.UNAVAILABLE.value[0], message=message)))

    def _pick(self, job: Job) -> WorkerClient | None:
        candidates = self.healthy_workers()
        if not (job.is_ls and self.queues.mode == "class"):
            candidates = [w for w in candidates if w.in_flight < self.window(w)]
        if job.preferred_worker:
            # Affinity: the worker that ran the program's previous turn may hold its KV; if it is gone or
            # full, any other worker takes the turn and recomputes the context.
            for w in candidates:
                if w.address == job.preferred_worker:
                    return w
        return min(candidates, key=lambda w: w.in_flight, default=None)

    def _dispatch(self) -> None:
        while len(self.queues):
            job = self.queues.peek()
            worker = self._pick(job)
            if worker is None:
                break
            self.queues.pop()
            job.worker = worker
            job.worker_address = worker.address
            self.jobs[job.request_id] = job
            job.dispatched_at = time.monotonic()
            worker.submit(job.submit, lambda event, job=job: self._on_event(job, event))
        self._publish()

    def _on_event(self, job: Job, event: worker_pb2.WorkerEvent) -> None:
        if event.WhichOneof("kind") == "rejected" and event.rejected.draining and job.worker is not None:
            # The worker is shutting down: stop sending it work, run this request elsewhere.
            worker = job.worker
            worker.healthy = False
            worker.done(job.request_id)
            self._requeue(job, f"worker {worker.address} is draining")
            asyncio.get_running_loop().call_later(self.requeue_timeout_s, self._expire_orphans)
            self._dispatch()
            return
        job.events.put_nowait(event)
        terminal = event.WhichOneof("kind") == "rejected" or event.tokens.finished
        if terminal:
            self.jobs.pop(job.request_id, None)
            if not job.is_ls and job.dispatched_at is not None:
                held = time.monotonic() - job.dispatched_at
                self.be_service_s = held if self.be_service_s is None else 0.9 * self.be_service_s + 0.1 * held
            if job.worker is not None:
                job.worker.done(job.request_id)
                job.worker = None
                self._dispatch()

    def _publish(self) -> None:
        ls, be = self.queues.counts()
        metrics.QUEUED.labels(Priority.LATENCY_SENSITIVE.label).set(ls)
        metrics.QUEUED.labels(Priority.BEST_EFFORT.label).set(be)


def status_code(code: int) -> grpc.StatusCode:
    for status in grpc.StatusCode:
        if status.value[0] == code:
            return status
    return grpc.StatusCode.UNKNOWN
