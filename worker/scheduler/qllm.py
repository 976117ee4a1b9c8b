"""`qllm`: priority scheduling plus preemption at decoder-layer boundaries (QLLM).

Between iterations it behaves as `priority`. Inside an iteration, the engine asks at every decoder-layer
boundary whether LS work has arrived; if so the running step is parked after layer k (hidden states,
positions, layout and the KV written so far stay as they are), LS-only steps run (the new LS prefill first;
a later LS arrival parks that one too, so preemption nests), and the parked step resumes at layer k+1 with
no recomputation. `SchedulerConfig.max_be_deferral_steps` bounds how many LS-only steps run before a
parked BE step resumes; after it the LS decodes join the next full iteration alongside BE.
"""

from worker.scheduler.priority import PriorityScheduler


class QllmScheduler(PriorityScheduler):
    name = "qllm"
    yields_at_layer_boundaries = True
