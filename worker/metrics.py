"""The worker's Prometheus metrics (per priority class where it matters)."""

from prometheus_client import Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
# Fine enough around a decoder layer's time (a few ms on CPU) to read a p99 off the buckets.
FAST_BUCKETS = (0.00025, 0.0005, 0.001, 0.002, 0.003, 0.004, 0.005, 0.006, 0.008, 0.010, 0.012, 0.015, 0.020,
                0.025, 0.030, 0.040, 0.050, 0.075, 0.1, 0.25, 1.0)

REQUESTS = Counter("qllm_worker_requests_total", "Requests accepted by the worker", ["priority"])
REJECTED = Counter("qllm_worker_rejected_total", "Requests the worker refused", ["priority", "code"])
FINISHED = Counter("qllm_worker_finished_total", "Requests finished", ["priority", "reason"])
TOKENS = Counter("qllm_worker_output_tokens_total", "Generated tokens", ["priority"])
TTFT = Histogram("qllm_worker_ttft_seconds", "Arrival at the worker to first token", ["priority"],
                 buckets=LATENCY_BUCKETS)
E2E = Histogram("qllm_worker_e2e_seconds", "Arrival at the worker to last token", ["priority"],
                buckets=LATENCY_BUCKETS)
STEP = Histogram("qllm_worker_step_seconds", "Model time of one engine step (all layers)", ["kind"],
                 buckets=LATENCY_BUCKETS)
LAYER = Histogram("qllm_worker_layer_seconds", "Time of one decoder layer in a step that contains BE work",
                  buckets=FAST_BUCKETS)
PREEMPTIONS = Counter("qllm_worker_preemptions_total", "Preemptions by kind (layer, recompute; offload = "
                      "the KV went to the host pool or int8, --kv-policy alise)", ["kind"])
PREEMPTION_LATENCY = Histogram("qllm_worker_preemption_latency_seconds",
                               "LS arrival at the worker until the running BE step paused at a layer boundary "
                               "(or ended, when the LS came after its last boundary)", buckets=FAST_BUCKETS)
PREEMPTION_LATENCY_LAYERS = Histogram(
    "qllm_worker_preemption_latency_layers",
    "Preemption latency divided by the mean layer time of the step it paused (1 = one decoder layer)",
    buckets=(0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.25, 1.5, 2.0, 3.0, 5.0))
RUNNING = Gauge("qllm_worker_running_requests", "Requests holding KV and running")
WAITING = Gauge("qllm_worker_waiting_requests", "Requests waiting for admission")
KV_USED = Gauge("qllm_worker_kv_used_tokens", "KV cache tokens allocated")
KV_CAPACITY = Gauge("qllm_worker_kv_capacity_tokens", "KV cache budget in tokens")
KV_PINNED = Gauge("qllm_worker_kv_pinned_tokens", "KV tokens held by agent-program pins between turns")
PINS = Gauge("qllm_worker_pins", "Agent-program KV pins held")
PINS_ENDED = Counter("qllm_worker_pins_ended_total", "Pins that ended, by why (claimed by the next turn, expired, "
                     "unpinned/released by the kvmanager, evicted for ls/pressure/idle, last_turn, replaced)",
                     ["reason"])
PREFIX_REUSED_TOKENS = Counter("qllm_worker_prefix_reused_tokens_total",
                               "Prompt tokens whose KV came from the program's pin instead of a prefill")
# KV memory under pressure (--kv-policy): where KV bytes live, how they moved, what the moves cost.
KV_TIER_BYTES = Gauge("qllm_worker_kv_tier_bytes", "KV bytes per tier: gpu (the block pool), host (swapped out), "
                      "int8 (quantized copies)", ["tier"])
KV_TIER_BYTE_HOURS = Counter("qllm_worker_kv_tier_byte_hours_total", "KV bytes held per tier, integrated over time",
                             ["tier"])
KV_MOVES = Counter("qllm_worker_kv_moves_total", "KV moves by kind (swap_out, swap_in, quantize, dequantize, "
                   "recompute = a preempted request's computed KV dropped)", ["kind"])
KV_COPY_RATE = Gauge("qllm_worker_kv_move_bytes_per_second", "Measured rate of each KV move kind, bytes of "
                     "full-precision KV per second", ["kind"])
