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

    @property
    def label(self) -> str:
        return "LS" if self.is_ls else "BE"


class NoWorker(Exception):
    pass


class RouterCore:
    def __init__(self, workers: list[WorkerClient], queue_mode: str = "class", max_inflight_per_worker: int = 64):
        self.workers = workers
        self.queues: RequestQueues[Job] = RequestQueues(queue_mode)
        self.max_inflight = max_inflight_per_worker

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
            candidates = [w for w in candidates if w.in_flight < self.max_inflight]
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
