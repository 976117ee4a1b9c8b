"""Waiting requests in the order a policy admits them, as vLLM V1's request_queue.py: one queue type per
policy behind a factory. Pure Python.

A request's key is taken when it enters the queue (it does not change while it waits: only running requests
generate tokens), so the queue is a heap, not a list re-sorted every step.
"""

from __future__ import annotations

import heapq
import itertools
from typing import Callable, Iterator

from worker.request import Request


def arrival_key(req: Request):
    return (req.arrival_time,)


def class_key(req: Request):
    """LS before BE; within a class the router's order key (its predicted rank), then, where the predictor
    estimated the length, the least expected work left (it shrinks as a preempted request's tokens came),
    then arrival."""
    left = req.expected_remaining_tokens if req.predicted_output_tokens else 0
    return (0 if req.is_ls else 1, req.order_key, left, req.arrival_time)


class RequestQueue:
    """Waiting requests ordered by `key`, ties in insertion order."""

    def __init__(self, key: Callable[[Request], tuple]):
        self._key = key
        self._heap: list[tuple[tuple, int, Request]] = []
        self._ids: set[str] = set()
        self._counter = itertools.count()

    def add(self, req: Request) -> None:
        heapq.heappush(self._heap, (self._key(req), next(self._counter), req))
        self._ids.add(req.request_id)

    def remove(self, req: Request) -> None:
        self._ids.discard(req.request_id)
        self._heap = [e for e in self._heap if e[2] is not req]
        heapq.heapify(self._heap)

    def __contains__(self, req: Request) -> bool:
        return req.request_id in self._ids

    def __iter__(self) -> Iterator[Request]:
        """In admission order (a snapshot: the caller may remove while iterating)."""
        return iter([e[2] for e in sorted(self._heap, key=lambda e: (e[0], e[1]))])

    def __len__(self) -> int:
        return len(self._heap)

    def __bool__(self) -> bool:
        return bool(self._heap)


class FCFSRequestQueue(RequestQueue):
    """By arrival (a preempted request goes back in front of later arrivals)."""

    def __init__(self):
        super().__init__(arrival_key)


class PriorityRequestQueue(RequestQueue):
    """By class, then the router's order key, then expected work left, then arrival."""

    def __init__(self):
        super().__init__(class_key)


QUEUES: dict[str, type[RequestQueue]] = {"fcfs": FCFSRequestQueue, "priority": PriorityRequestQueue}


def create_request_queue(ordering: str) -> RequestQueue:
    try:
        return QUEUES[ordering]()
    except KeyError:
        raise ValueError(f"unknown queue ordering {ordering!r}; known: {', '.join(sorted(QUEUES))}") from None
