"""Router/GetModelInfo's answer from what the router already knows (pure; no gRPC calls): the workers'
Describe answers taken when their streams opened, the limits validation enforces, and the caller's tenant.
"""

from __future__ import annotations

from typing import Sequence

from qllm import contract
from qllm.contract import Priority
from qllm.security import Tenant
from qllm.v1 import router_pb2
from router.validation import Limits


def model_info(workers: Sequence, limits: Limits, tenant: Tenant, max_be_queue: int) -> router_pb2.ModelInfo:
    """workers: router/worker_client.py WorkerClients (address, healthy, in_flight, info = WorkerInfo or None
    before the first connection)."""
    described = [w for w in workers if w.info is not None]
    first = next((w.info for w in described if w.healthy), described[0].info if described else None)
    info = router_pb2.ModelInfo(limits=router_pb2.RequestLimits(
        max_prompt_bytes=limits.max_prompt_bytes, max_messages=contract.MAX_MESSAGES,
        max_beams=limits.max_beams, max_patience=contract.MAX_PATIENCE,
        max_abs_length_penalty=contract.MAX_ABS_LENGTH_PENALTY,
        max_stop_strings=contract.MAX_STOP_STRINGS, max_stop_string_chars=contract.MAX_STOP_STRING_CHARS,
        max_stop_token_ids=contract.MAX_STOP_TOKEN_IDS, max_top_logprobs=contract.MAX_TOP_LOGPROBS,
        default_priority=limits.default_priority, max_be_queue=max_be_queue,
        tenant_priorities=[p for p in Priority if tenant.may_use(p.label)],
        tenant_requests_per_s=tenant.rate_limit.requests_per_s if tenant.rate_limit else 0.0,
        tenant_burst=tenant.rate_limit.burst if tenant.rate_limit else 0.0))
    if first is not None:
        info.model_name = first.model_name
        info.max_context = first.max_context
        info.vocab_size = first.vocab_size
        info.has_chat_template = first.has_chat_template
        info.eos_token_ids.extend(first.eos_token_ids)
    for w in workers:
        summary = router_pb2.WorkerSummary(address=w.address, healthy=w.healthy, in_flight=w.in_flight)
        if w.info is not None:
            summary.policy = w.info.policy
            summary.device = w.info.device
            summary.num_layers = w.info.num_layers
            summary.max_num_seqs = w.info.max_num_seqs
            summary.kv_capacity_tokens = w.info.kv_capacity_tokens
        info.workers.append(summary)
    return info
