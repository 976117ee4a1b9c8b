"""Paged KV memory for the engine, plugged into transformers through its own extension points.

`PagedKVCache` is a transformers `Cache` whose layers write new keys/values into fixed-size blocks of one
preallocated pool per layer (the block ids come from worker/kv_blocks.py), and `paged_attention` is an
attention function registered with transformers' `AttentionInterface`, so the model's own decoder-layer
modules run unchanged over a flattened batch in which every request has its own length.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.cache_utils import Cache, CacheLayerMixin

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
    mask: torch.Tensor | None    # [q_len, kv_len] bool; None when the chunk starts at position 0 (causal)


@dataclass
class BatchLayout:
    """How one step's flattened tokens map onto requests and KV slots; built once before layer 0.

    Decode rows come first. Those whose context is contiguous and long are attended one by one, in place;
    the rest are gathered into one padded batch (cheaper for many short contexts).
    """

    slot_mapping: torch.Tensor           # [T] flat slot (block * block_size + offset) of each new token
    num_decode: int                      # the first num_decode rows are single-token decodes
    decode_in_place: list[tuple[int, KVSpan]]  # (row, span) of decodes read in place
    decode_gather_rows: torch.Tensor | None    # rows of the gathered decodes
    decode_block_tables: torch.Tensor | None   # [rows, max_blocks], padded with block 0
    decode_mask: torch.Tensor | None     # [rows, 1, 1, max_blocks * block_size] bool
    prefills: list[PrefillSegment]


class PagedLayer(CacheLayerMixin):
    """One decoder layer's pool: keys and values of shape [num_blocks, block_size, kv_heads, head_dim]."""

    is_sliding = False

    def __init__(self, num_blocks: int, block_size: int, kv_heads: int, head_dim: int, dtype, device):
        super().__init__()
        shape = (num_blocks, block_size, kv_heads, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
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


class PagedKVCache(Cache):
    def __init__(self, num_layers: int, num_blocks: int, block_size: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device):
        super().__init__(layers=[PagedLayer(num_blocks, block_size, kv_heads, head_dim, dtype, device)
                                 for _ in range(num_layers)])
        self.num_blocks = num_blocks
        self.block_size = block_size

    def set_layout(self, layout: BatchLayout) -> None:
        for layer in self.layers:
            layer.layout = layout

    @property
    def bytes(self) -> int:
        return sum(l.keys.numel() * l.keys.element_size() * 2 for l in self.layers)


def _context(pool: torch.Tensor, span: KVSpan) -> torch.Tensor:
    """One request's keys or values as [1, kv_heads, kv_len, head_dim]: a view when contiguous."""
    if span.first_block is not None:
        n_blocks = -(-span.kv_len // pool.shape[1])
        x = pool[span.first_block:span.first_block + n_blocks]
    else:
        x = pool[span.block_ids]
    return x.flatten(0, 1)[:span.kv_len].permute(1, 0, 2).unsqueeze(0)


def paged_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, qllm_layout=None,
                    **kwargs):
    """Attention over the paged pools for a flattened batch: decodes batched, prefill chunks one by one.

    query: [1, heads, T, D]; key/value: the layer's pools. Returns ([1, T, heads, D], None).
    """
    layout: BatchLayout = qllm_layout
    _, heads, total, head_dim = query.shape
    out = query.new_empty(1, total, heads, head_dim)
    # Decodes read in place one by one, gathered decodes as one batch, then each prefill chunk.
    for row, span in layout.decode_in_place:
        q = query[:, :, row:row + 1]
        o = F.scaled_dot_product_attention(q, _context(key, span), _context(value, span), scale=scaling,
                                           enable_gqa=True)
        out[0, row] = o[0, :, 0]
    if layout.decode_gather_rows is not None:
        rows, bt = layout.decode_gather_rows, layout.decode_block_tables
        k = key[bt].flatten(1, 2).transpose(1, 2)      # [n, kv_heads, L, D]
        v = value[bt].flatten(1, 2).transpose(1, 2)
        q = query[0][:, rows].unsqueeze(2).transpose(0, 1)  # [n, heads, 1, D]
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=layout.decode_mask, scale=scaling, enable_gqa=True)
        out[0, rows] = o[:, :, 0]
    for seg in layout.prefills:
        q = query[:, :, seg.q_start:seg.q_start + seg.q_len]
        k = _context(key, seg.span)
        v = _context(value, seg.span)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=seg.mask, is_causal=seg.mask is None,
                                           scale=scaling, enable_gqa=True)
        out[0, seg.q_start:seg.q_start + seg.q_len] = o[0].transpose(0, 1)
    return out, None


AttentionInterface.register(ATTN_IMPLEMENTATION, paged_attention)
