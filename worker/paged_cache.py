"""Paged KV memory for the engine, plugged into transformers through its own extension points.

`PagedKVCache` is a transformers `Cache` whose layers write new keys/values into fixed-size blocks of one
preallocated pool per layer (the block ids come from worker/kv_blocks.py), and `paged_attention` is an
attention function registered with transformers' `AttentionInterface`, so the model's own decoder-layer
modules run unchanged over a flattened batch in which every request has its own length.

Multi-head latent attention (DeepSeek-V3) is cached in its compressed form, as vLLM does: per token and layer
the kv_lora_rank latent (after kv_a_layernorm) and the rotated qk_rope_head_dim key part, which is what the
model's own attention hands to `cache.update`. Prefill chunks expand their context through the module's
kv_b_proj (transformers' own expand_kv, then the same attention); decodes attend the latent directly with
kv_b_proj absorbed into the query and the output (worker/paged_decode.py, latent_decode_attention).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.cache_utils import Cache, CacheLayerMixin

from worker.paged_decode import DecodeBatch, decode_attention, latent_decode_attention

ATTN_IMPLEMENTATION = "qllm_paged"


@dataclass
class KVSpan:
    """Where one request's context lives: a contiguous run of blocks (read in place) or a block list."""

    kv_len: int
    first_block: int | None = None       # set when the blocks covering kv_len are one ascending run
    block_ids: torch.Tensor | None = None


@dataclass
class PrefillSegment:
    q_start: int                 # first row of this request in the flattened batch
    q_len: int
    span: KVSpan                 # context after this step (cached + new)
    # Per attention window (0 = full causal): (first key attended, bool mask [q_len, kv_len - first] or None
    # when plain causal). A sliding layer skips the keys no query of the chunk can see.
    masks: dict[int, tuple[int, torch.Tensor | None]]


@dataclass
class BatchLayout:
    """How one step's flattened tokens map onto requests and KV slots; built once before layer 0.

    Decode rows come first and are attended together, one call per layer (worker/paged_decode.py); each
    prefill chunk follows with its own attention call.
    """

    slot_mapping: torch.Tensor           # [T] flat slot (block * block_size + offset) of each new token
    num_decode: int                      # the first num_decode rows are single-token decodes
    decode: DecodeBatch | None           # where those rows' contexts live
    prefills: list[PrefillSegment]
    cache: "PagedKVCache | None" = None  # set by PagedKVCache.set_layout: latent layers are read from it


class PagedLayer(CacheLayerMixin):
    """One decoder layer's pools: keys [num_blocks, block_size, kv_heads, head_dim] and values
    [num_blocks, block_size, kv_heads, value_head_dim] (value_head_dim defaults to head_dim)."""

    is_sliding = False

    def __init__(self, num_blocks: int, block_size: int, kv_heads: int, head_dim: int, dtype, device,
                 value_head_dim: int | None = None):
        super().__init__()
        self.keys = torch.zeros((num_blocks, block_size, kv_heads, head_dim), dtype=dtype, device=device)
        self.values = torch.zeros((num_blocks, block_size, kv_heads, value_head_dim or head_dim), dtype=dtype,
                                  device=device)
        self.device = device
        self.is_initialized = True
        self.layout: BatchLayout | None = None

    def lazy_initialization(self, key_states, value_states) -> None:  # preallocated in __init__
        pass

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        # key_states: [1, kv_heads, T, head_dim] for the flattened batch.
        slots = self.layout.slot_mapping
        flat_k = self.keys.view(-1, *self.keys.shape[2:])
        flat_v = self.values.view(-1, *self.values.shape[2:])
        flat_k.index_copy_(0, slots, key_states[0].transpose(0, 1).to(flat_k.dtype))
        flat_v.index_copy_(0, slots, value_states[0].transpose(0, 1).to(flat_v.dtype))
        return self.keys, self.values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return query_length, 0

    def get_seq_length(self) -> int:
        return 0

    def get_max_length(self) -> int:
        return -1


class LatentPagedLayer(PagedLayer):
    """A multi-head-latent-attention layer's pools: keys hold the compressed latent [.., 1, kv_lora_rank],
    values the rotated shared key part [.., 1, qk_rope_head_dim], exactly what DeepseekV3Attention passes to
    cache.update. update returns this step's own tokens, so the module's expand_kv expands only those (the
    attention reads the whole context from the pools itself: paged_attention)."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        super().update(key_states, value_states)
        return key_states, value_states


def kv_shapes(config) -> tuple[int, int, int, bool]:
    """(kv_heads, key head size, value head size, latent) of one token's cache entry per layer.

    Multi-head latent attention (config.kv_lora_rank) caches the latent: one "head" of kv_lora_rank (keys
    pool) and qk_rope_head_dim (values pool). Others: num_key_value_heads x head_dim for both.
    """
    if getattr(config, "kv_lora_rank", None):
        return 1, int(config.kv_lora_rank), int(config.qk_rope_head_dim), True
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    return kv_heads, head_dim, head_dim, False


class PagedKVCache(Cache):
    def __init__(self, num_layers: int, num_blocks: int, block_size: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device, value_head_dim: int | None = None,
                 latent: bool = False):
        kind = LatentPagedLayer if latent else PagedLayer
        super().__init__(layers=[kind(num_blocks, block_size, kv_heads, head_dim, dtype, device, value_head_dim)
                                 for _ in range(num_layers)])
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.latent = latent

    @classmethod
    def for_config(cls, config, num_layers: int, num_blocks: int, block_size: int, dtype: torch.dtype,
                   device: torch.device) -> "PagedKVCache":
        """The pools a model with this config needs (kv_shapes)."""
        kv_heads, k_dim, v_dim, latent = kv_shapes(config)
        return cls(num_layers, num_blocks, block_size, kv_heads, k_dim, dtype, device, value_head_dim=v_dim,
                   latent=latent)

    def set_layout(self, layout: BatchLayout) -> None:
        layout.cache = self
        for layer in self.layers:
            layer.layout = layout

    @property
    def bytes(self) -> int:
        return sum(l.keys.numel() * l.keys.element_size() + l.values.numel() * l.values.element_size()
                   for l in self.layers)


def _context(pool: torch.Tensor, span: KVSpan) -> torch.Tensor:
    """One request's keys or values as [1, kv_heads, kv_len, head_dim]: a view when contiguous."""
    if span.first_block is not None:
        n_blocks = -(-span.kv_len // pool.shape[1])
        x = pool[span.first_block:span.first_block + n_blocks]
    else:
        x = pool[span.block_ids]
    return x.flatten(0, 1)[:span.kv_len].permute(1, 0, 2).unsqueeze(0)


def prefill_mask(start: int, q_len: int, window: int, device) -> tuple[int, torch.Tensor | None]:
    """Keys a chunk of queries at positions start..start+q_len-1 attends, as transformers' masks define them:
    causal (k <= q) and, with a sliding window W, q - W < k (masking_utils.sliding_window_overlay).

    Returns (first key, bool mask [q_len, kv_len - first]), or (0, None) when it is plain causal from 0.
    """
    kv_len = start + q_len
    first = max(0, start - window + 1) if window > 0 else 0  # older keys are outside every query's window
    if start == 0 and (window <= 0 or q_len <= window):
        return 0, None
    q_pos = torch.arange(start, kv_len)[:, None]
    k_pos = torch.arange(first, kv_len)[None, :]
    keep = k_pos <= q_pos
    if window > 0:
        keep &= k_pos > q_pos - window
    return first, keep.to(device)


def _attention_with_sinks(q, k, v, mask, scale, sinks) -> torch.Tensor:
    """gpt-oss's attention (its eager_attention_forward): per-head sink logits join each softmax's denominator
    and are dropped after it. q: [1, heads, Q, D]; k, v: [1, kv_heads, L, D]; mask [Q, L] bool or None
    (causal with Q == L)."""
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    scores = torch.matmul(q, k.transpose(2, 3)) * scale
    if mask is None:
        mask = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril()
    scores = scores.masked_fill(~mask, float("-inf"))
    logits = torch.cat([scores, sinks.to(scores.dtype).reshape(1, -1, 1, 1).expand(1, -1, q.shape[2], 1)], dim=-1)
    logits = logits - logits.max(dim=-1, keepdim=True).values
    probs = torch.softmax(logits, dim=-1)[..., :-1]
    return torch.matmul(probs.to(v.dtype), v)


def paged_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, qllm_layout=None,
                    qllm_window=0, **kwargs):
    """Attention over the paged pools for a flattened batch: all decodes in one call, then each prefill chunk.

    query: [1, heads, T, D]; key/value: the layer's pools; qllm_window: this layer's sliding window (0: full),
    from the runner's per-layer windows (model_loader.layer_windows). Returns ([1, T, heads, D], None).
    """
    layout: BatchLayout = qllm_layout
    _, heads, total, head_dim = query.shape
    scale = scaling if scaling is not None else head_dim ** -0.5
    if getattr(module, "kv_b_proj", None) is not None:  # multi-head latent attention: key/value are this
        layer = layout.cache.layers[module.layer_idx]     # step's tokens only; the context is in the pools
        if not isinstance(layer, LatentPagedLayer):
            raise TypeError("paged_attention: a multi-head latent attention module needs the latent pools "
                            "(PagedKVCache.for_config)")
        return _latent_attention(module, query, layer, layout, scale), None
    out = query.new_empty(1, total, heads, value.shape[-1])
    sinks = getattr(module, "sinks", None)  # gpt-oss: learned per-head logits in every softmax
    n = layout.num_decode
    if n:
        out[0, :n] = decode_attention(query[0, :, :n].transpose(0, 1), key, value, layout.decode, scale,
                                      window=qllm_window, sinks=sinks)
    for seg in layout.prefills:
        q = query[:, :, seg.q_start:seg.q_start + seg.q_len]
        first, mask = seg.masks[qllm_window]
        k = _context(key, seg.span)[:, :, first:]
        v = _context(value, seg.span)[:, :, first:]
        if sinks is not None:
            o = _attention_with_sinks(q, k, v, mask, scale, sinks)
        else:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                               scale=scaling, enable_gqa=True)
        out[0, seg.q_start:seg.q_start + seg.q_len] = o[0].transpose(0, 1)
    return out, None


def _latent_attention(module, query, layer: LatentPagedLayer, layout: BatchLayout, scale: float) -> torch.Tensor:
    """Multi-head latent attention over the latent pools (DeepseekV3Attention: query [1, heads, T, qk_nope +
    qk_rope]; K of that size, V of v_head_dim per head). Decodes: the absorbed form over the latent. Prefill
    chunks: the context's latent expanded by the module's own expand_kv (kv_b_proj), then causal attention,
    as transformers computes it. Returns [1, T, heads, v_head_dim]."""
    _, heads, total, _ = query.shape
    out = query.new_empty(1, total, heads, module.v_head_dim)
    n = layout.num_decode
    if n:
        out[0, :n] = latent_decode_attention(query[0, :, :n].transpose(0, 1), layer.keys, layer.values,
                                             layout.decode, scale, module.kv_b_proj.weight,
                                             module.qk_nope_head_dim)
    for seg in layout.prefills:
        q = query[:, :, seg.q_start:seg.q_start + seg.q_len]
        first, mask = seg.masks[0]
        k, v = module.expand_kv(_context(layer.keys, seg.span), _context(layer.values, seg.span))
        o = F.scaled_dot_product_attention(q, k[:, :, first:], v[:, :, first:], attn_mask=mask,
                                           is_causal=mask is None, scale=scale)
        out[0, seg.q_start:seg.q_start + seg.q_len] = o[0].transpose(0, 1)
    return out


AttentionInterface.register(ATTN_IMPLEMENTATION, paged_attention)
