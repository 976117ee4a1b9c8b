"""`priority`: iteration-level priority exactly as vLLM V1's `--scheduling-policy priority`, and
`priority-evict`, which also evicts running BE for waiting LS.

`priority` (vLLM V1): the waiting queue is ordered by class (LS first), then the request's order_key (arrival,
or a predicted rank the router sets), then arrival; running requests are served in admission order; when a
running request's next tokens do not fit in the KV cache, the lowest-class, latest-arriving running request
is preempted (recompute); a waiting request is admitted only when slots and blocks are free.

`priority-evict` also preempts running BE at the start of an iteration to make room for waiting LS work, and
serves running requests LS first: an LS request never waits for BE to finish. QLLM builds on it.
"""

from __future__ import annotations

from worker.request import Request
from worker.scheduler.base import Scheduler, SchedulerOutput
from worker.scheduler.request_queue import class_key


class PriorityScheduler(Scheduler):
    name = "priority"
    queue_ordering = "priority"

    def pick_victim(self, candidates: list[Request]) -> Request | None:
        # Lowest class first, then the one that arrived last (it has the least sunk work to lose).
        return max(candidates, key=lambda r: (not r.is_ls, r.arrival_time), default=None)

    def may_preempt(self, victim: Request, for_req: Request) -> bool:
        # An LS request is never preempted for a BE one.
        return not (victim.is_ls and not for_req.is_ls)

    def can_admit(self, req: Request, num_tokens: int) -> bool:
        # LS is admitted as soon as the blocks it needs now are free (vLLM's optimistic admission): the KV
        # its decodes grow into later is taken from BE by preemption, never the other way round.
        if req.is_ls:
            return (len(self.running) < self.config.max_num_seqs
                    and self.allocator.can_allocate(req.request_id, self._kv_tokens(req, num_tokens)))
        return super().can_admit(req, num_tokens)



class PriorityEvictScheduler(PriorityScheduler):
    name = "priority-evict"

    def running_order(self) -> list[Request]:
        return sorted(self.running, key=class_key)

    def make_room(self, output: SchedulerOutput) -> None:
        """Preempts running BE (lowest class, latest arrival first) until waiting LS work can be admitted."""
        waiting_ls = [r for r in self.waiting if r.is_ls]
        budget = self.config.max_num_batched_tokens
        for req in waiting_ls:
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            if n <= 0:
                break
            # Pinned agent KV goes first (never the pin this request is about to take over), then running BE.
            self._evict_pins_while(lambda: not self.can_admit(req, n), "ls", keep=req.program_id)
            while not self.can_admit(req, n):
                victims = [r for r in self.running if not r.is_ls and r.request_id not in self.in_flight]
                victim = self.choose_victim(victims)
                if victim is None:
                    return
                self._preempt(victim, output)
            budget -= n
