"""`fcfs`: iteration-level first-come-first-served with chunked prefill (vLLM's default policy)."""

from worker.scheduler.base import Scheduler


class FcfsScheduler(Scheduler):
    name = "fcfs"
