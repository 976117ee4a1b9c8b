"""The router's core: class queues in front of the workers, and release of work as capacity allows.

LS requests go to the least-loaded worker at once. BE requests (and, in `fifo` mode, everything) are
released while a worker has fewer than `max_inflight_per_worker` requests; the rest wait in the router's
queue, where their order is the router's to choose.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import grpc

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

    @property
    def label(self) -> str:
        return "LS" if self.is_ls else "BE"


class NoWorker(Exception):
    pass


class RouterCore:
    def __init__(self, workers: list[WorkerClient], queue_mode: str = "class", max_inflight_per_worker: int = 0,
                 be_order: str = "arrival", **order_kwargs):
        self.workers = workers
        self.queues: RequestQueues[Job] = RequestQueues(queue_mode, be_order, **order_kwargs)
        # 0 = the worker's own max_num_seqs: everything released can start at once, and the order of what
        # waits is the router's (its BE order), not the worker's arrival order.
        self.max_inflight = max_inflight_per_worker

    def window(self, worker: WorkerClient) -> int:
        if self.max_inflight:
            return self.max_inflight
        return worker.info.max_num_seqs if worker.info is not None and worker.info.max_num_seqs else 32

    def healthy_workers(self) -> list[WorkerClient]:
        return [w for w in self.workers if w.healthy]

    def submit(self, job: Job) -> None:
        if not self.healthy_workers():
            raise NoWorker("no worker is available")
        self.queues.push(job)
        self._dispatch()

    def cancel(self, job: Job) -> None:
        if self.queues.remove(job.request_id) is not None:
            self._publish()
            return
        if job.worker is not None:
            job.worker.cancel(job.request_id)
            job.worker = None
            self._dispatch()

    def _pick(self, job: Job) -> WorkerClient | None:
        candidates = self.healthy_workers()
        if not (job.is_ls and self.queues.mode == "class"):
            candidates = [w for w in candidates if w.in_flight < self.window(w)]
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
            worker.submit(job.submit, lambda event, job=job: self._on_event(job, event))
        self._publish()

    def _on_event(self, job: Job, event: worker_pb2.WorkerEvent) -> None:
        job.events.put_nowait(event)
        terminal = event.WhichOneof("kind") == "rejected" or event.tokens.finished
        if terminal and job.worker is not None:
            job.worker.done(job.request_id)
            job.worker = None
            self._dispatch()

    def _publish(self) -> None:
        ls, be = self.queues.counts()
        metrics.QUEUED.labels("LS").set(ls)
        metrics.QUEUED.labels("BE").set(be)


def status_code(code: int) -> grpc.StatusCode:
    for status in grpc.StatusCode:
        if status.value[0] == code:
            return status
    return grpc.StatusCode.UNKNOWN
