"""Scheduling policies behind one interface, selected by name (`--policy`)."""

from __future__ import annotations

from worker.kv_blocks import BlockAllocator
from worker.scheduler.base import Scheduler, SchedulerConfig, SchedulerOutput, ScheduledRequest
from worker.scheduler.fcfs import FcfsScheduler
from worker.scheduler.priority import PriorityEvictScheduler, PriorityScheduler
from worker.scheduler.qllm import QllmScheduler

POLICIES: dict[str, type[Scheduler]] = {
    FcfsScheduler.name: FcfsScheduler,
    PriorityScheduler.name: PriorityScheduler,
    PriorityEvictScheduler.name: PriorityEvictScheduler,
    QllmScheduler.name: QllmScheduler,
}


def make_scheduler(policy: str, config: SchedulerConfig, allocator: BlockAllocator) -> Scheduler:
    try:
        cls = POLICIES[policy]
    except KeyError:
        raise ValueError(f"unknown policy {policy!r}; known: {', '.join(sorted(POLICIES))}") from None
    return cls(config, allocator)


__all__ = ["POLICIES", "Scheduler", "SchedulerConfig", "SchedulerOutput", "ScheduledRequest", "make_scheduler"]
