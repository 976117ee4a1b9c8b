"""The router's Prometheus metrics, per priority class."""

from prometheus_client import Counter, Gauge, Histogram

BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)

REQUESTS = Counter("qllm_router_requests_total", "Generate calls accepted", ["priority"])
REJECTED = Counter("qllm_router_rejected_total", "Generate calls refused", ["code"])
FINISHED = Counter("qllm_router_finished_total", "Generate calls finished", ["priority", "reason"])
TOKENS = Counter("qllm_router_output_tokens_total", "Tokens streamed to clients", ["priority"])
TTFT = Histogram("qllm_router_ttft_seconds", "Request arrival to first token sent", ["priority"], buckets=BUCKETS)
E2E = Histogram("qllm_router_e2e_seconds", "Request arrival to last token sent", ["priority"], buckets=BUCKETS)
QUEUED = Gauge("qllm_router_queued_requests", "Requests waiting in the router's queues", ["priority"])
REQUEUED = Counter("qllm_router_requeued_total", "Requests re-queued after their worker was lost")
LOST = Counter("qllm_router_unavailable_total",
               "Requests ended with UNAVAILABLE after losing their worker (re-queue limit or no worker)")
DEPENDENCY_DOWN = Gauge("qllm_router_dependency_down", "1 while a dependency (predictor, kvmanager) is unreachable",
                        ["dependency"])
