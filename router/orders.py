"""Within-class request orders for the router's queues (pure: no torch, no grpc, no clock).

One interface, four orders:
- `arrival`: first come, first served.
- `ltr` (vllm-ltr): lowest predicted length score first (the predictor's RankLengths score; larger =
  longer), i.e. shortest predicted job first.
- `speculative` (ALISE): least estimated remaining execution time first.
- `oracle`: true output length first (benchmarks only: an upper bound for `ltr`).

Items are any objects with a `request_id` attribute. The sort key is read from an attribute
(`length_score`, `est_remaining_s`, `true_length`) or from `key=` given to the order; an item without one
(None) sorts after all items with one, in arrival order. Arrival order is the item's `arrival` attribute
when it has one (so a preempted request pushed back keeps its place), else the push order. Ties go to the
earlier arrival.

Starvation prevention (vllm-ltr): a waiting request is *passed over* when a request that arrived after it
is popped before it. After `starvation_threshold` such rounds it is promoted: promoted requests are
served before all others, oldest promotion first. It stays promoted while it waits and for
`promotion_rounds` pops after it is served, so a request that is preempted and pushed back within that
window is served first again. `starvation_threshold=0` turns prevention off. With prevention on, a
request waits for at most `starvation_threshold` later arrivals plus the promoted requests ahead of it.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Generic, Protocol, TypeVar


class HasRequestId(Protocol):
    request_id: str


T = TypeVar("T", bound=HasRequestId)

DEFAULT_STARVATION_THRESHOLD = 32
DEFAULT_PROMOTION_ROUNDS = 8


@dataclass
class _Entry(Generic[T]):
    item: T
    arrival: tuple[float, int]
    key: float
    passed_over: int = 0
    promoted: bool = False


class Order(Generic[T]):
    """A priority queue of requests with starvation prevention. Subclasses define `key_of(item)`."""

    name = ""
    #: item attribute holding the sort key (None = no key: pure arrival order)
    attribute: str | None = None

    def __init__(self, *, starvation_threshold: int = DEFAULT_STARVATION_THRESHOLD,
                 promotion_rounds: int = DEFAULT_PROMOTION_ROUNDS, key: Callable[[T], float | None] | None = None):
        if starvation_threshold < 0 or promotion_rounds < 0:
            raise ValueError("starvation_threshold and promotion_rounds must be >= 0")
        self.starvation_threshold = starvation_threshold
        self.promotion_rounds = promotion_rounds
        self._key_fn = key
        self._entries: dict[str, _Entry[T]] = {}
        self._heap: list[tuple[float, tuple[float, int], str]] = []  # (key, arrival, request_id)
        self._promoted: deque[tuple[str, int]] = deque()  # (request_id, push seq)
        self._promoted_until: dict[str, int] = {}  # served while promoted: promoted again if back by then
        self._counter = itertools.count()
        self._round = 0
        self.promotions = 0  # how many times a request was promoted (for metrics)

    # --- keys ---------------------------------------------------------------------------------------------
    def key_of(self, item: T) -> float | None:
        if self._key_fn is not None:
            return self._key_fn(item)
        if self.attribute is None:
            return 0.0
        return getattr(item, self.attribute, None)

    def _sort_key(self, item: T) -> float:
        k = self.key_of(item)
        if k is None or (isinstance(k, float) and math.isnan(k)):
            return math.inf
        return float(k)

    # --- interface -----------------------------------------------------------------------------------------
    def push(self, item: T) -> None:
        rid = item.request_id
        if rid in self._entries:
            raise ValueError(f"request {rid!r} is already queued")
        arrival = getattr(item, "arrival", None)
        seq = next(self._counter)
        entry = _Entry(item, (float(arrival) if arrival is not None else float(seq), seq), self._sort_key(item))
        self._entries[rid] = entry
        until = self._promoted_until.pop(rid, None)
        if until is not None and until >= self._round:
            self._promote(entry)
        heapq.heappush(self._heap, (entry.key, entry.arrival, rid))

    def pop(self) -> T:
        """Removes and returns the next request; one scheduling round. IndexError when empty."""
        entry = self._next(remove=True)
        self._round += 1
        if entry.promoted:
            self._promoted_until[entry.item.request_id] = self._round + self.promotion_rounds
            self._trim_promoted_until()
        if self.starvation_threshold:
            for other in self._entries.values():
                if other.arrival < entry.arrival:
                    other.passed_over += 1
                    if not other.promoted and other.passed_over >= self.starvation_threshold:
                        self._promote(other)
        return entry.item

    def peek(self) -> T | None:
        return self._next(remove=False).item if self._entries else None

    def remove(self, request_id: str) -> T | None:
        """Takes a request out (cancelled, or dispatched elsewhere); None when it is not queued."""
        entry = self._entries.pop(request_id, None)
        if len(self._heap) > 4 * len(self._entries) + 64:  # removed requests' heap slots go lazily; bound them
            self._compact()
        return entry.item if entry else None

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._entries

    def items(self) -> list[T]:
        """Waiting requests in the order they would be popped now (no round is counted)."""
        promoted = [e for e in self._entries.values() if e.promoted]
        promoted_order = {rid: i for i, (rid, seq) in enumerate(self._promoted)
                          if rid in self._entries and self._entries[rid].arrival[1] == seq}
        promoted.sort(key=lambda e: promoted_order.get(e.item.request_id, 0))
        rest = sorted((e for e in self._entries.values() if not e.promoted), key=lambda e: (e.key, e.arrival))
        return [e.item for e in promoted + rest]

    def is_promoted(self, request_id: str) -> bool:
        entry = self._entries.get(request_id)
        return bool(entry and entry.promoted)

    # --- internals -----------------------------------------------------------------------------------------
    def _promote(self, entry: _Entry[T]) -> None:
        entry.promoted = True
        self.promotions += 1
        self._promoted.append((entry.item.request_id, entry.arrival[1]))

    def _next(self, remove: bool) -> _Entry[T]:
        while self._promoted:
            rid, seq = self._promoted[0]
            entry = self._entries.get(rid)
            if entry is None or entry.arrival[1] != seq or not entry.promoted:
                self._promoted.popleft()
                continue
            if remove:
                self._promoted.popleft()
                del self._entries[rid]
            return entry
        while self._heap:
            _, arrival, rid = self._heap[0]
            entry = self._entries.get(rid)
            # Stale: removed, promoted, or a later push of the same id (its own slot has its own arrival).
            if entry is None or entry.promoted or entry.arrival != arrival:
                heapq.heappop(self._heap)
                continue
            if remove:
                heapq.heappop(self._heap)
                del self._entries[rid]
            return entry
        raise IndexError(f"pop from an empty {self.name or 'order'} queue")

    def _compact(self) -> None:
        self._heap = [(e.key, e.arrival, rid) for rid, e in self._entries.items() if not e.promoted]
        heapq.heapify(self._heap)

    def _trim_promoted_until(self) -> None:
        if len(self._promoted_until) > 1024:
            self._promoted_until = {k: v for k, v in self._promoted_until.items() if v >= self._round}


class ArrivalOrder(Order[T]):
    name = "arrival"
    attribute = None


class LtrOrder(Order[T]):
    """Lowest length score (shortest predicted output) first."""

    name = "ltr"
    attribute = "length_score"


class SpeculativeOrder(Order[T]):
    """Least estimated remaining execution time first (ALISE)."""

    name = "speculative"
    attribute = "est_remaining_s"


class OracleOrder(Order[T]):
    """True output length first (benchmarks only)."""

    name = "oracle"
    attribute = "true_length"


ORDERS: dict[str, type[Order]] = {o.name: o for o in (ArrivalOrder, LtrOrder, SpeculativeOrder, OracleOrder)}


def make_order(name: str, **kwargs: Any) -> Order:
    try:
        return ORDERS[name](**kwargs)
    except KeyError:
        raise ValueError(f"unknown order {name!r}; choose from {', '.join(ORDERS)}") from None
