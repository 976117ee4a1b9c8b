"""The engine's MoE experts implementation, registered in transformers' experts interface as "qllm".

A decode step routes a few rows to a few experts: the work is reading those experts' weights once, and
transformers' grouped path (sort, histogram, two grouped GEMMs, an inverse permutation: ~27 framework ops per
layer) costs far more than that on a CPU. A short prefill (an LS prompt) routes a few dozen rows to each
expert, where BLAS calls on such thin matrices stay well below the core's FMA rate. So on the CPU, for steps
of up to NATIVE_MAX_ROWS rows, the experts run in one native call (worker/csrc/moe_experts.c: register tiles
of weight rows by token rows, each hit expert's weights streamed once); larger steps (chunks above the default
budget) take the grouped GEMMs, except in bfloat16 on a CPU without native bfloat16 (AVX2), where those GEMMs are
emulated and the native kernel, which widens each weight to float32 as it loads it, is faster at any size. Other
devices and layouts the kernel does not cover (biases, transposed or interleaved weights, other
activations, expert parallelism) take transformers' grouped_mm path unchanged.
"""

from __future__ import annotations

import ctypes

import torch
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS, grouped_mm_experts_forward

from worker import native
from worker.model_loader import cpu_has_native_bf16

EXPERTS_IMPLEMENTATION = "qllm"
# Rows (tokens) up to which the native kernel takes a step on a CPU. Above a few hundred rows (where depends on
# the CPU) the grouped GEMMs' cache blocking is faster, but this covers a step of the default 512-token budget
# with its decode rows, whose MoE block a yielding policy can then park inside (the grouped GEMMs are one
# call). Chosen with scripts/bench_moe_experts.py (docs/benchmarks.md).
NATIVE_MAX_ROWS = 640

_P, _I = ctypes.c_void_p, ctypes.c_int
_ARGTYPES = [_P, _P, _P, _P, _P, _I, _P, _I, _I, _I, _I, _I, _I]
_RANGE_ARGTYPES = [_P, _P, _P, _P, _P, _I, _P, _I, _I, _I, _I, _I, _I, _I]


def native_kernel():
    return native.kernel("qllm_moe_experts", ctypes.c_int, _ARGTYPES, env_switch="QLLM_NATIVE_MOE")


def native_range_kernel():
    return native.kernel("qllm_moe_experts_range", ctypes.c_int, _RANGE_ARGTYPES, env_switch="QLLM_NATIVE_MOE")


def native_max_rows(dtype: torch.dtype) -> int | None:
    """The most rows a step may have for the native kernel to take it (None: any number)."""
    return None if dtype == torch.bfloat16 and not cpu_has_native_bf16() else NATIVE_MAX_ROWS


def native_supports(experts: torch.nn.Module) -> bool:
    """Whether this experts module has the layout the kernel computes: concatenated [gate; up] rows, no bias,
    SiLU gating, no post-expert norm, all experts local, contiguous float32/bfloat16 weights on the CPU.
    Decided once per module."""
    known = experts.__dict__.get("_qllm_native")
    if known is None:
        known = experts._qllm_native = _layout_fits(experts)
    return known


def _layout_fits(experts: torch.nn.Module) -> bool:
    weight, down = getattr(experts, "gate_up_proj", None), getattr(experts, "down_proj", None)
    return (isinstance(weight, torch.Tensor) and isinstance(down, torch.Tensor)
            and weight.device.type == "cpu" and weight.dtype in (torch.float32, torch.bfloat16)
            and down.dtype == weight.dtype and weight.is_contiguous() and down.is_contiguous()
            and getattr(experts, "has_gate", False) and getattr(experts, "is_concatenated", False)
            and not getattr(experts, "is_transposed", True) and not getattr(experts, "has_bias", True)
            and not getattr(experts, "has_post_expert_norm", True)
            and not getattr(experts, "_is_expert_parallel", True)
            and type(experts)._apply_gate.__name__ == "_default_apply_gate"
            and getattr(getattr(experts, "config", None), "hidden_act", None) == "silu")


def takes_native(experts: torch.nn.Module, tokens: int) -> bool:
    """Whether the native kernel computes these experts for `tokens` rows (else transformers' grouped GEMMs)."""
    if not native_supports(experts) or native_range_kernel() is None:
        return False
    limit = native_max_rows(experts.gate_up_proj.dtype)
    return limit is None or tokens <= limit


class ExpertsInParts:
    """The native kernel over one step's rows, a range of experts per call: experts_forward runs them all at
    once, the engine may park a step between ranges (QLLM's expert-level preemption point). The ranges add into
    one output in expert order, so the result does not depend on where the step parked, bit for bit."""

    def __init__(self, experts: torch.nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                 top_k_weights: torch.Tensor):
        self.experts = experts
        self.dtype = hidden_states.dtype
        self.x = hidden_states.to(torch.float32).contiguous()
        self.ids = top_k_index.to(torch.int64).contiguous()
        self.weights = top_k_weights.to(torch.float32).contiguous()
        self.out = torch.zeros_like(self.x)
        self.num_experts = experts.gate_up_proj.shape[0]
        self.next_expert = 0

    @property
    def done(self) -> bool:
        return self.next_expert >= self.num_experts

    def run(self, count: int) -> None:
        """The next `count` experts."""
        end = min(self.num_experts, self.next_expert + count)
        gate_up, down = self.experts.gate_up_proj, self.experts.down_proj
        status = native_range_kernel()(
            self.x.data_ptr(), self.ids.data_ptr(), self.weights.data_ptr(), gate_up.data_ptr(), down.data_ptr(),
            int(gate_up.dtype == torch.bfloat16), self.out.data_ptr(), self.x.shape[0], self.ids.shape[1],
            self.x.shape[1], down.shape[2], self.next_expert, end, torch.get_num_threads())
        if status != 0:
            raise MemoryError("moe experts: no scratch memory")
        self.next_expert = end

    def result(self) -> torch.Tensor:
        return self.out.to(self.dtype)


def experts_forward(self: torch.nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                    top_k_weights: torch.Tensor) -> torch.Tensor:
    """hidden_states [tokens, hidden]; top_k_index / top_k_weights [tokens, top_k]; returns [tokens, hidden]."""
    if not takes_native(self, hidden_states.shape[0]):
        return grouped_mm_experts_forward(self, hidden_states, top_k_index, top_k_weights)
    parts = ExpertsInParts(self, hidden_states, top_k_index, top_k_weights)
    parts.run(parts.num_experts)
    return parts.result()


ALL_EXPERTS_FUNCTIONS.register(EXPERTS_IMPLEMENTATION, experts_forward)
