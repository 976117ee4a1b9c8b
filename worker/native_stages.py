"""Decode steps of a few rows run each decoder layer's two stages in one native call each (CPU, float32 or
bfloat16).

At decode batch sizes a decode step of a small MoE model is hundreds of tiny framework ops per layer (norms, three
projections, per-head norms, rotary, two cache writes, routing, top-k, the experts' bookkeeping), each costing
more to dispatch on a CPU than its arithmetic; vLLM's CPU backend removes that cost with torch.compile of the
whole model. Here the two stages QLLM parks between (attention block, MoE block) are each one call into
worker/csrc/decode_layer.c, so parking points and the KV layout stay exactly as in the module path.

A stage runs natively only where its modules are ones whose math the kernel reproduces (the attention and MoE
blocks of Qwen3-MoE, Qwen2-MoE's attention, Mixtral; checked by class and by parameters, once per layer) and
the step is all decode rows, at most NATIVE_MAX_ROWS of them, on the CPU, with the layer's weights, its KV pools
and the residual stream in one dtype, float32 or bfloat16; everything else (prefill chunks, other families, mixed
or other dtypes, GPUs) runs the transformers modules unchanged. In bfloat16 the kernels compute in float32 and
round where they store (the stream, the pools), so tokens stay close to the modules' but not bit-equal; in
float32 they are the modules' tokens.

A layer's fixed arguments (weight, norm and KV pool addresses, shapes) are read once, when the runner is built: the
loader has placed the weights by then and the pools are allocated once, and nothing moves either afterwards.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import torch

from worker import native
from worker.moe import native_supports as experts_fit
from worker.paged_cache import PagedLayer

# Rows up to which the native stages are measured to beat the modules (docs/benchmarks.md, "Engine speed";
# since the register-tiled projections, still 1.1x at 160 rows).
NATIVE_MAX_ROWS = 256

RMS_NORMS = {"Qwen3MoeRMSNorm", "Qwen2MoeRMSNorm", "MixtralRMSNorm"}
ATTENTIONS = {"Qwen3MoeAttention", "Qwen2MoeAttention", "MixtralAttention"}
MOE_BLOCKS = {"Qwen3MoeSparseMoeBlock": "Qwen3MoeTopKRouter", "MixtralSparseMoeBlock": "MixtralTopKRouter"}

_P, _I, _F = ctypes.c_void_p, ctypes.c_int, ctypes.c_float
_ATTENTION_ARGTYPES = [_P, _I, _I, _I, _P, _F, _P, _P, _P, _P, _P, _P, _P, _P, _F, _P, _P, _P, _P, _P, _P, _P, _I,
                       _I, _I, _I, _I, _F, ctypes.c_int64, _P, _P, _F, _I]
_MOE_ARGTYPES = [_P, _I, _I, _I, _P, _F, _P, _I, _I, _I, _P, _P, _I, _F, _I]
_LINEAR_ARGTYPES = [_P, _P, _I, _I, _I, _I, _P, _I]
DTYPES = (torch.float32, torch.bfloat16)


def linear_kernel():
    """qllm_linear: out [rows, out] float32 = x [rows, in] float32 @ w [out, in]^T, w float32 or bfloat16."""
    return native.kernel("qllm_linear", None, _LINEAR_ARGTYPES, env_switch="QLLM_NATIVE_STAGES")


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor | None:
    """x [rows, in] @ weight^T as float32 through qllm_linear, weights read once for all rows (None: no native
    library). For a few rows, where a BLAS call re-packs the weight every time."""
    fn = linear_kernel()
    if fn is None:
        return None
    x = x.float().contiguous()
    out = x.new_empty(x.shape[0], weight.shape[0])
    fn(x.data_ptr(), weight.data_ptr(), int(weight.dtype == torch.bfloat16), x.shape[0], x.shape[1],
       weight.shape[0], out.data_ptr(), torch.get_num_threads())
    return out


def _ptr(t: torch.Tensor | None) -> int | None:
    return t.data_ptr() if t is not None else None


def _rms_norm_fits(norm, size: int) -> bool:
    weight = getattr(norm, "weight", None)
    return (type(norm).__name__ in RMS_NORMS and isinstance(weight, torch.Tensor) and weight.shape == (size,)
            and hasattr(norm, "variance_epsilon"))


def _fits(dtype: torch.dtype, *tensors: torch.Tensor | None) -> bool:
    """Every tensor given (None: an absent bias or norm) is a contiguous CPU tensor of `dtype`, one the kernels
    read."""
    return dtype in DTYPES and all(t is None or (t.dtype == dtype and t.device.type == "cpu" and t.is_contiguous())
                                   for t in tensors)


@dataclass
class _Attention:
    head_dim: int
    dtype: torch.dtype
    # The call's arguments that never change (weights, norms, the layer's KV pools, shapes), taken once: a
    # decode step makes this call per layer, and reading them through the modules each time cost more than the
    # call's arithmetic for a few rows. Four groups, as the call interleaves them with the step's own pointers.
    weights: tuple
    pools: tuple
    shapes: tuple
    output: tuple


@dataclass
class _Moe:
    dtype: torch.dtype
    args: tuple   # every argument after (hidden, rows), taken once (see _Attention)


class NativeStages:
    """Which layers' stages run natively, and the calls that run them."""

    def __init__(self, layers, moe_blocks, cache, residual_multiplier: float):
        self.attention_fn = native.kernel("qllm_attention_stage", _I, _ATTENTION_ARGTYPES,
                                          env_switch="QLLM_NATIVE_STAGES")
        self.moe_fn = native.kernel("qllm_moe_stage", _I, _MOE_ARGTYPES, env_switch="QLLM_NATIVE_STAGES")
        self.scale = float(residual_multiplier)
        self.attention: list[_Attention | None] = []
        self.moe: list[_Moe | None] = []
        for i, layer in enumerate(layers):
            self.attention.append(self._attention_of(layer, cache.layers[i], self.scale) if self.attention_fn else None)
            self.moe.append(self._moe_of(layer, moe_blocks[i], self.scale) if self.moe_fn else None)

    @property
    def any(self) -> bool:
        return any(self.attention) or any(self.moe)

    @staticmethod
    def _attention_of(layer, pools, scale: float) -> _Attention | None:
        attn = getattr(layer, "self_attn", None)
        if type(attn).__name__ not in ATTENTIONS or type(pools) is not PagedLayer:
            return None
        head_dim, dtype = pools.keys.shape[-1], pools.keys.dtype
        if pools.values.shape[-1] != head_dim or not _fits(dtype, pools.keys, pools.values):
            return None
        hidden = attn.q_proj.in_features
        heads, kv_heads = attn.q_proj.out_features // head_dim, pools.keys.shape[2]
        if (attn.k_proj.out_features != kv_heads * head_dim or attn.o_proj.in_features != heads * head_dim
                or not _rms_norm_fits(layer.input_layernorm, hidden)
                or not _fits(dtype, layer.input_layernorm.weight)):
            return None
        norms = [getattr(attn, n, None) for n in ("q_norm", "k_norm")]
        if any(n is not None and not (_rms_norm_fits(n, head_dim) and _fits(dtype, n.weight)) for n in norms):
            return None
        linears = (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj)
        if not all(_fits(dtype, m.weight, m.bias) for m in linears):
            return None
        q_norm, k_norm = norms
        weights = (hidden, int(dtype == torch.bfloat16), layer.input_layernorm.weight.data_ptr(),
                   float(layer.input_layernorm.variance_epsilon), attn.q_proj.weight.data_ptr(),
                   attn.k_proj.weight.data_ptr(), attn.v_proj.weight.data_ptr(), _ptr(attn.q_proj.bias),
                   _ptr(attn.k_proj.bias), _ptr(attn.v_proj.bias), _ptr(q_norm.weight if q_norm is not None else None),
                   _ptr(k_norm.weight if k_norm is not None else None),
                   float(q_norm.variance_epsilon if q_norm is not None else 0.0))
        return _Attention(head_dim, dtype, weights=weights, pools=(pools.keys.data_ptr(), pools.values.data_ptr()),
                          shapes=(pools.keys.shape[1], heads, kv_heads, head_dim, float(attn.scaling)),
                          output=(attn.o_proj.weight.data_ptr(), _ptr(attn.o_proj.bias), scale))

    @staticmethod
    def _moe_of(layer, block, scale: float) -> _Moe | None:
        router = MOE_BLOCKS.get(type(block).__name__)
        gate = getattr(block, "gate", None)
        if router is None or type(gate).__name__ != router or not experts_fit(block.experts):
            return None
        norm, dtype = layer.post_attention_layernorm, gate.weight.dtype
        if (not _rms_norm_fits(norm, gate.weight.shape[1])
                or not _fits(dtype, norm.weight, gate.weight, block.experts.gate_up_proj)):
            return None
        experts, norm_topk = block.experts, bool(getattr(gate, "norm_topk_prob", True))
        args = (gate.weight.shape[1], int(dtype == torch.bfloat16), norm.weight.data_ptr(),
                float(norm.variance_epsilon), gate.weight.data_ptr(), gate.weight.shape[0], int(gate.top_k),
                int(norm_topk), experts.gate_up_proj.data_ptr(), experts.down_proj.data_ptr(),
                experts.down_proj.shape[2], scale)
        return _Moe(dtype, args)

    def prepare(self, state) -> tuple[torch.Tensor, torch.Tensor] | None:
        """For a step all of decode rows, few enough, on the CPU: its rotary (cos, sin) as float32
        [rows, head_dim] arrays the kernels read (state.hidden made contiguous, as they update it in place);
        else None."""
        layout, hidden = state.layout, state.hidden
        rows = hidden.shape[1]
        cos, sin = state.position_embeddings
        if (layout.prefills or layout.num_decode != rows or not 0 < rows <= NATIVE_MAX_ROWS
                or hidden.dtype not in DTYPES or hidden.device.type != "cpu"):
            return None
        state.hidden = hidden.contiguous()
        return cos[0].float().contiguous(), sin[0].float().contiguous()

    def prepare_decode_rows(self, state) -> tuple[torch.Tensor, torch.Tensor] | None:
        """For a step that mixes decode rows (first) with prefill chunks, on the CPU: the decode rows' rotary
        (cos, sin) as float32 [decode rows, head_dim], so their attention blocks run natively while the
        chunks take the modules (worker/model_runner.py); else None."""
        layout, hidden = state.layout, state.hidden
        rows = layout.num_decode
        if (not layout.prefills or not 0 < rows <= NATIVE_MAX_ROWS or layout.decode is None
                or hidden.dtype not in DTYPES or hidden.device.type != "cpu" or not hidden.is_contiguous()):
            return None
        cos, sin = state.position_embeddings
        return cos[0, :rows].float().contiguous(), sin[0, :rows].float().contiguous()

    def attention_fits(self, index: int, state, rope: tuple[torch.Tensor, torch.Tensor]) -> bool:
        """Whether layer `index`'s attention block runs natively on this step (else: the modules)."""
        spec = self.attention[index]
        return spec is not None and rope[0].shape[-1] == spec.head_dim and state.hidden.dtype == spec.dtype

    def run_attention(self, index: int, state, rope: tuple[torch.Tensor, torch.Tensor], window: int,
                      rows: tuple[int, int] | None = None) -> bool:
        """Runs layer `index`'s attention block on state.hidden in place, on the decode rows [first, end) of
        `rows` (default all); False when it must take the modules (this layer's modules do not fit, or its
        rotary is not over whole heads). Every row's attention is its own (its query, its cache), so a block run
        in row groups computes what it computes in one call."""
        if not self.attention_fits(index, state, rope):
            return False
        spec = self.attention[index]
        decode, hidden = state.layout.decode, state.hidden
        first, end = rows if rows is not None else (0, hidden.shape[1])
        # Row `first` on of each per-row array, by address: slicing tensors per layer cost more than the call.
        cos, sin = rope
        width = decode.block_tables.shape[1]
        status = self.attention_fn(
            hidden.data_ptr() + first * hidden.shape[2] * hidden.element_size(), end - first, *spec.weights,
            cos.data_ptr() + 4 * first * cos.shape[1], sin.data_ptr() + 4 * first * sin.shape[1], *spec.pools,
            state.layout.slot_mapping.data_ptr() + 8 * first, decode.block_tables.data_ptr() + 8 * first * width,
            decode.kv_lens.data_ptr() + 8 * first, width, *spec.shapes, int(window), *spec.output,
            torch.get_num_threads())
        if status != 0:
            raise MemoryError("attention stage: no scratch memory")
        return True

    def lm_head(self, hidden: torch.Tensor, head: torch.nn.Module) -> torch.Tensor | None:
        """The LM head for a few rows [rows, hidden] as float32 logits (None: use the module)."""
        weight = head.weight
        if (getattr(head, "bias", None) is not None or not _fits(weight.dtype, weight)
                or hidden.dtype != weight.dtype or not 0 < hidden.shape[0] <= NATIVE_MAX_ROWS):
            return None
        return linear(hidden, weight)

    def run_moe(self, index: int, state) -> bool:
        """Runs layer `index`'s MoE block on state.hidden in place; False when it must take the modules."""
        spec = self.moe[index]
        if spec is None or state.hidden.dtype != spec.dtype:
            return False
        hidden = state.hidden
        status = self.moe_fn(hidden.data_ptr(), hidden.shape[1], *spec.args, torch.get_num_threads())
        if status != 0:
            raise MemoryError("moe stage: no scratch memory")
        return True
