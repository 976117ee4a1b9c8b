"""The router's request queues (pure: no asyncio, no grpc).

`class` mode keeps one queue per priority class and always releases LS first (LS in arrival order); within
BE the order is pluggable (router/orders.py: `arrival`, `ltr`, `speculative`, `oracle`, each with vllm-ltr's
starvation prevention). `fifo` mode is a single arrival-ordered queue for both classes, which is what an
iteration-level FCFS baseline (vLLM's default) sees.
"""

from __future__ import annotations

import collections
from typing import Generic, Protocol, TypeVar

from router.orders import ArrivalOrder, Order, make_order


class Queued(Protocol):
    request_id: str
    is_ls: bool


T = TypeVar("T", bound=Queued)


class RequestQueues(Generic[T]):
    def __init__(self, mode: str = "class", be_order: str = "arrival", **order_kwargs):
        if mode not in ("class", "fifo"):
            raise ValueError(f"queue mode must be 'class' or 'fifo', got {mode!r}")
        self.mode = mode
        self._ls: collections.deque[T] = collections.deque()
        self._be: Order = ArrivalOrder(**order_kwargs) if mode == "fifo" else make_order(be_order, **order_kwargs)

    @property
    def be_order(self) -> str:
        return self._be.name

    def push(self, item: T) -> None:
        if item.is_ls and self.mode == "class":
            self._ls.append(item)
        else:
            self._be.push(item)

    def peek(self) -> T | None:
        if self._ls:
            return self._ls[0]
        return self._be.peek()

    def pop(self) -> T:
        return self._ls.popleft() if self._ls else self._be.pop()

    def remove(self, request_id: str) -> T | None:
        for item in self._ls:
            if item.request_id == request_id:
                self._ls.remove(item)
                return item
        return self._be.remove(request_id)

    def counts(self) -> tuple[int, int]:
        """(LS, BE) queued."""
        ls_in_be = sum(1 for i in self._be.items() if i.is_ls) if self.mode == "fifo" else 0
        ls = len(self._ls) + ls_in_be
        return ls, len(self._be) - ls_in_be

    def __len__(self) -> int:
        return len(self._ls) + len(self._be)
