"""int8 quantization of one request's KV blocks (ALISE's quantize tier): symmetric, per-token or per-channel.

`quantize_blocks` gathers a request's KV from every layer's pool (pools as in worker/paged_cache.py:
[num_blocks, block_size, kv_heads, head_dim]; keys and values may have different head sizes, e.g.
DeepSeek-V3's latent and rotary parts) into one compact int8 copy of exactly its tokens, with float32 scales;
the pool blocks can then be freed. `dequantize_into` writes it back into whatever blocks the request
gets when it runs again.

Scales are symmetric (zero point 0, q = round(x / s) clamped to [-127, 127], s = max|x| / 127 over the
scale's group), so the error of every element is at most s / 2:
- per token ("token"): one scale per (layer, token, kv head) over head_dim. Bounded by each token's own
  largest element; the cheapest to keep for long contexts.
- per channel ("channel"): one scale per (layer, kv head, channel) over the request's tokens. Keys have a
  few large channels (rotary pairs), so per-channel keys lose less (as KIVI: keys per channel, values per
  token, which is the default here).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from worker.kv_tiers import RateMeter

QMAX = 127
GRANULARITIES = ("token", "channel")


@dataclass
class QuantizedTensor:
    data: torch.Tensor     # int8 [layers, tokens, kv_heads, head_dim]
    scales: torch.Tensor   # float32, [layers, tokens, kv_heads, 1] (token) or [layers, 1, kv_heads, head_dim]

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size() + self.scales.numel() * self.scales.element_size()


@dataclass
class QuantizedKV:
    """The compact int8 copy of one request's keys and values over all layers."""

    keys: QuantizedTensor
    values: QuantizedTensor
    num_tokens: int

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes


def quantize(x: torch.Tensor, granularity: str) -> QuantizedTensor:
    """x: [layers, tokens, kv_heads, head_dim], any float dtype."""
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity: expected one of {GRANULARITIES}, got {granularity!r}")
    x = x.float()
    dim = -1 if granularity == "token" else 1
    amax = x.abs().amax(dim=dim, keepdim=True)
    scales = torch.where(amax > 0, amax / QMAX, torch.ones_like(amax))
    data = torch.clamp(torch.round(x / scales), -QMAX, QMAX).to(torch.int8)
    return QuantizedTensor(data, scales)


def dequantize(q: QuantizedTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (q.data.float() * q.scales).to(dtype)


def _slots(block_ids: list[int], block_size: int, num_tokens: int, device) -> torch.Tensor:
    blocks = torch.tensor(block_ids, dtype=torch.long, device=device)
    offsets = torch.arange(block_size, device=device)
    return (blocks[:, None] * block_size + offsets[None, :]).flatten()[:num_tokens]


def gather_tokens(pools: list[torch.Tensor], block_ids: list[int], num_tokens: int) -> torch.Tensor:
    """One request's rows of every layer's pool: [layers, num_tokens, kv_heads, head_dim] (a copy)."""
    block_size = pools[0].shape[1]
    if len(block_ids) * block_size < num_tokens:
        raise ValueError(f"num_tokens: {num_tokens} tokens do not fit in {len(block_ids)} blocks")
    slots = _slots(block_ids, block_size, num_tokens, pools[0].device)
    return torch.stack([p.view(-1, *p.shape[2:]).index_select(0, slots) for p in pools])


def scatter_tokens(x: torch.Tensor, pools: list[torch.Tensor], block_ids: list[int]) -> None:
    """Writes [layers, num_tokens, kv_heads, head_dim] into every layer's pool at the request's blocks."""
    block_size = pools[0].shape[1]
    num_tokens = x.shape[1]
    if len(block_ids) * block_size < num_tokens:
        raise ValueError(f"block_ids: {len(block_ids)} blocks cannot hold {num_tokens} tokens")
    slots = _slots(block_ids, block_size, num_tokens, pools[0].device)
    for layer, p in enumerate(pools):
        p.view(-1, *p.shape[2:]).index_copy_(0, slots, x[layer].to(p.dtype))


class KVQuantizer:
    """Quantizes requests' KV out of the pools and back, and measures its own rates (bytes of fp KV / s)."""

    def __init__(self, key_granularity: str = "channel", value_granularity: str = "token"):
        for name, g in (("key_granularity", key_granularity), ("value_granularity", value_granularity)):
            if g not in GRANULARITIES:
                raise ValueError(f"{name}: expected one of {GRANULARITIES}, got {g!r}")
        self.key_granularity = key_granularity
        self.value_granularity = value_granularity
        self.quantize_rate = RateMeter(1e9)
        self.dequantize_rate = RateMeter(1e9)

    def quantize_blocks(self, key_pools: list[torch.Tensor], value_pools: list[torch.Tensor],
                        block_ids: list[int], num_tokens: int) -> QuantizedKV:
        started = time.perf_counter()
        k = gather_tokens(key_pools, block_ids, num_tokens)
        v = gather_tokens(value_pools, block_ids, num_tokens)
        out = QuantizedKV(quantize(k, self.key_granularity), quantize(v, self.value_granularity), num_tokens)
        self.quantize_rate.observe(fp_bytes(key_pools, value_pools, len(block_ids)), time.perf_counter() - started)
        return out

    def dequantize_into(self, q: QuantizedKV, key_pools: list[torch.Tensor], value_pools: list[torch.Tensor],
                        block_ids: list[int]) -> None:
        started = time.perf_counter()
        scatter_tokens(dequantize(q.keys, key_pools[0].dtype), key_pools, block_ids)
        scatter_tokens(dequantize(q.values, value_pools[0].dtype), value_pools, block_ids)
        self.dequantize_rate.observe(fp_bytes(key_pools, value_pools, len(block_ids)),
                                     time.perf_counter() - started)


def fp_bytes(key_pools: list[torch.Tensor], value_pools: list[torch.Tensor], num_blocks: int) -> int:
    """Bytes of num_blocks blocks across all layers, keys and values, in the pools' dtype."""
    per_block = sum(p[0].numel() * p.element_size() for p in key_pools + value_pools)
    return per_block * num_blocks


def int8_block_bytes(num_layers: int, block_size: int, kv_heads: int, head_dim: int,
                     value_head_dim: int | None = None) -> int:
    """Compact bytes of one full block quantized per token: the cost model's estimate. (Per-channel scales
    are shared by all of a request's tokens, so they cost more for a short request and less for a long one;
    what a request is charged is its copy's actual `nbytes`.) value_head_dim defaults to head_dim."""
    data = block_size * kv_heads * (head_dim + (value_head_dim or head_dim))
    scales = 2 * block_size * kv_heads * 4
    return num_layers * (data + scales)
