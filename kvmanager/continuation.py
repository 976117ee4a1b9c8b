"""P(an agent program has another turn after its non-final turn k), learned online (pure).

`last_turn` on a request marks a program's end when the client knows it; many agents only find out after
the turn (the model answers instead of calling a tool), and programs get cancelled or abandoned. So the
kvmanager learns, per turn index k (indices past `max_turn` share one bucket), how often a non-final turn k
was followed by a report of turn k+1 (continued) rather than by the program going idle or being released
(did not). Each bucket is a beta-binomial estimate shrunk toward the pooled rate of all buckets, itself
shrunk toward `prior_continue`; counts are halved past `max_count` so the estimate follows drift.
"""

from __future__ import annotations


class ContinuationModel:
    def __init__(self, max_turn: int = 16, prior_continue: float = 0.9, prior_weight: float = 10.0,
                 turn_weight: float = 5.0, max_count: float = 10_000.0):
        if not 0 < prior_continue <= 1 or prior_weight <= 0 or turn_weight <= 0 or max_turn < 0:
            raise ValueError("bad continuation prior")
        self.max_turn = max_turn
        self.prior_continue = prior_continue
        self.prior_weight = prior_weight
        self.turn_weight = turn_weight
        self.max_count = max_count
        self._continued = [0.0] * (max_turn + 1)
        self._seen = [0.0] * (max_turn + 1)

    def _bucket(self, turn_index: int) -> int:
        return min(max(0, int(turn_index)), self.max_turn)

    def observe(self, turn_index: int, continued: bool) -> None:
        b = self._bucket(turn_index)
        self._seen[b] += 1
        self._continued[b] += 1 if continued else 0
        if self._seen[b] > self.max_count:
            self._seen[b] /= 2
            self._continued[b] /= 2

    def pooled(self) -> float:
        c, n = sum(self._continued), sum(self._seen)
        return (c + self.prior_continue * self.prior_weight) / (n + self.prior_weight)

    def p_continue(self, turn_index: int) -> float:
        b = self._bucket(turn_index)
        return (self._continued[b] + self.pooled() * self.turn_weight) / (self._seen[b] + self.turn_weight)

    def observations(self, turn_index: int) -> float:
        return self._seen[self._bucket(turn_index)]
