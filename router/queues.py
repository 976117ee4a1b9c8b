"""The router's request queues (pure asyncio-free code).

`class` mode keeps one queue per priority class and always releases LS first; within BE the order is
pluggable (arrival now). `fifo` mode is a single arrival-ordered queue for both classes, which is what an
iteration-level FCFS baseline (vLLM's default) sees.
"""

from __future__ import annotations

import collections
from typing import Generic, Protocol, TypeVar


class Queued(Protocol):
    request_id: str
    is_ls: bool


T = TypeVar("T", bound=Queued)


class RequestQueues(Generic[T]):
    def __init__(self, mode: str = "class"):
        if mode not in ("class", "fifo"):
            raise ValueError(f"queue mode must be 'class' or 'fifo', got {mode!r}")
        self.mode = mode
        self._ls: collections.deque[T] = collections.deque()
        self._be: collections.deque[T] = collections.deque()

    def push(self, item: T) -> None:
        (self._ls if item.is_ls and self.mode == "class" else self._be).append(item)

    def peek(self) -> T | None:
        if self._ls:
            return self._ls[0]
        return self._be[0] if self._be else None

    def pop(self) -> T:
        return self._ls.popleft() if self._ls else self._be.popleft()

    def remove(self, request_id: str) -> T | None:
        for q in (self._ls, self._be):
            for item in q:
                if item.request_id == request_id:
                    q.remove(item)
                    return item
        return None

    def counts(self) -> tuple[int, int]:
        """(LS, BE) queued."""
        ls = len(self._ls) + sum(1 for i in self._be if i.is_ls)
        return ls, len(self._ls) + len(self._be) - ls

    def __len__(self) -> int:
        return len(self._ls) + len(self._be)
