"""`qllm`: priority scheduling plus preemption at decoder-layer boundaries (QLLM).

Between iterations it behaves as `priority`. Inside an iteration, the engine asks at every decoder-layer
boundary whether LS work has arrived; if so the running step is parked after layer k (hidden states,
positions, layout and the KV written so far stay as they are), LS-only steps run (the new LS prefill first;
a later LS arrival parks that one too, so preemption nests), and the parked step resumes at layer k+1 with
no recomputation. `SchedulerConfig.max_be_deferral_steps` bounds how many LS-only steps run before a
parked BE step resumes; after it the LS decodes join the next full iteration alongside BE.

BE admission also leaves `ls_reserved_kv_tokens` of KV and `ls_reserved_slots` running slots free, so an
LS request normally starts without preempting BE at all: iteration-level preemption drops a BE request's
KV and recomputes it later, which is exactly the BE throughput QLLM sets out to keep.
"""

from worker.request import Request
from worker.scheduler.priority import PriorityScheduler


class QllmScheduler(PriorityScheduler):
    name = "qllm"
    yields_at_layer_boundaries = True

    def can_admit(self, req: Request, num_tokens: int) -> bool:
        if not super().can_admit(req, num_tokens):
            return False
        if req.is_ls or not self.running:  # an idle worker always takes work: the reserve never deadlocks
            return True
        cfg = self.config
        if len(self.running) >= max(1, cfg.max_num_seqs - cfg.ls_reserved_slots):
            return False
        # A reserve larger than an eighth of the cache would cost BE more than it saves.
        reserve = min(cfg.ls_reserved_kv_tokens, self.allocator.capacity_tokens // 8)
        left = self.headroom_blocks() - self.admission_blocks(req, num_tokens)
        return left * self.allocator.block_size >= reserve
