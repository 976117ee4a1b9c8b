"""Decode attention for all decode rows of a step in one call per layer, reading the paged KV in place.

A decode row attends one query token to its whole context. One framework attention call per row per layer
(the old path) cost more in call overhead and copies than in arithmetic, and gathering every row's blocks into
a padded batch copies the whole KV each layer. So, as vLLM's and SGLang's CPU backends do, the CPU path is a
small native kernel (worker/csrc/paged_decode.c) that walks each row's block table and reads keys and values
once, in place. It is compiled on first use with the machine's C compiler (worker/native.py). Where there is
no compiler, or on a GPU, the rows' blocks are gathered into one padded batch and attended with one masked
matmul-softmax-matmul, which is what a GPU does well. Keys and values may have different head sizes.

Multi-head latent attention (DeepSeek-V3) caches a compressed latent instead of per-head K/V
(worker/paged_cache.py); its decode rows go through `latent_decode_attention`, a torch path in the absorbed
form, on every device.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import torch

from worker import native


@dataclass
class DecodeBatch:
    """The decode rows of one step: where each row's context lives. Built once per step, before layer 0."""

    block_tables: torch.Tensor       # [rows, max_blocks] int64 on the CPU, padded with block 0
    kv_lens: torch.Tensor            # [rows] int64 on the CPU: context length including this step's token
    device_block_tables: torch.Tensor | None = None  # the same on the model's device (gather path only)
    device_kv_lens: torch.Tensor | None = None


_P, _I = ctypes.c_void_p, ctypes.c_int
_ARGTYPES = [_P, _P, _P, _I, _P, _P, _P, _I, _I, _I, _I, _I, _I, _I, ctypes.c_float, ctypes.c_int64, _P, _I]


def native_kernel():
    """The compiled decode kernel (worker/csrc/paged_decode.c), or None when it cannot be built here."""
    return native.kernel("qllm_paged_decode", ctypes.c_int, _ARGTYPES, env_switch="QLLM_NATIVE_DECODE")


def uses_native(pool: torch.Tensor) -> bool:
    return pool.device.type == "cpu" and pool.dtype in (torch.float32, torch.bfloat16) and native_kernel() is not None


def decode_attention(query: torch.Tensor, key_pool: torch.Tensor, value_pool: torch.Tensor, batch: DecodeBatch,
                     scale: float, window: int = 0, sinks: torch.Tensor | None = None) -> torch.Tensor:
    """query: [rows, heads, head_dim]; key_pool: [num_blocks, block_size, kv_heads, head_dim]; value_pool:
    [num_blocks, block_size, kv_heads, v_head_dim] (v_head_dim may differ from head_dim).

    Returns [rows, heads, v_head_dim] in the query's dtype. window > 0: only the last `window` positions of each
    context are attended; sinks: [heads] logits that join each softmax's denominator.
    """
    if uses_native(key_pool):
        return _native(query, key_pool, value_pool, batch, scale, window, sinks)
    return _gathered(query, key_pool, value_pool, batch, scale, window, sinks)


def _native(query, key_pool, value_pool, batch, scale, window, sinks) -> torch.Tensor:
    rows, heads, head_dim = query.shape
    v_head_dim = value_pool.shape[-1]
    q = query.to(torch.float32).contiguous()
    out = q.new_empty(rows, heads, v_head_dim)
    s = sinks.to(torch.float32).contiguous() if sinks is not None else None
    tables, lens = batch.block_tables, batch.kv_lens
    status = native_kernel()(
        q.data_ptr(), key_pool.data_ptr(), value_pool.data_ptr(), int(key_pool.dtype == torch.bfloat16),
        tables.data_ptr(), lens.data_ptr(), out.data_ptr(), rows, heads, key_pool.shape[2], head_dim, v_head_dim,
        key_pool.shape[1], tables.shape[1], float(scale), int(window), s.data_ptr() if s is not None else None,
        torch.get_num_threads())
    if status != 0:
        raise MemoryError("decode attention: no scratch memory for the scores")
    return out.to(query.dtype)


def _gathered(query, key_pool, value_pool, batch, scale, window, sinks) -> torch.Tensor:
    dev = key_pool.device
    if batch.device_block_tables is None:
        batch.device_block_tables = batch.block_tables.to(dev)
        batch.device_kv_lens = batch.kv_lens.to(dev)
    tables, lens = batch.device_block_tables, batch.device_kv_lens
    rows, heads, head_dim = query.shape
    kv_heads = key_pool.shape[2]
    k = key_pool[tables].flatten(1, 2)                 # [rows, L, kv_heads, D]
    v = value_pool[tables].flatten(1, 2)
    group = heads // kv_heads
    q = query.view(rows, kv_heads, group, head_dim).float()
    scores = torch.einsum("rhgd,rlhd->rhgl", q, k.float()) * scale
    pos = torch.arange(k.shape[1], device=dev)
    keep = pos[None, :] < lens[:, None]
    if window > 0:
        keep &= pos[None, :] >= (lens - window)[:, None]
    scores = scores.masked_fill(~keep[:, None, None, :], float("-inf"))
    if sinks is not None:
        sink = sinks.float().view(1, kv_heads, group, 1).expand(rows, -1, -1, 1)
        probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]
    else:
        probs = torch.softmax(scores, dim=-1)
    out = torch.einsum("rhgl,rlhd->rhgd", probs, v.float())
    return out.reshape(rows, heads, v.shape[-1]).to(query.dtype)


def latent_decode_attention(query: torch.Tensor, latent_pool: torch.Tensor, rope_pool: torch.Tensor,
                            batch: DecodeBatch, scale: float, kv_b_weight: torch.Tensor,
                            nope_dim: int) -> torch.Tensor:
    """Multi-head latent attention (DeepSeek-V3) for the decode rows, over the cached latent, in the absorbed
    form (as vLLM's MLA decode): kv_b_proj's key half is folded into the query and its value half applied to
    the attended latent, so no context token is ever expanded to per-head K/V.

    query: [rows, heads, nope_dim + rope_dim] (the nope part, then the rotated part); latent_pool [num_blocks,
    block_size, 1, kv_lora_rank]; rope_pool [num_blocks, block_size, 1, rope_dim] (rotated keys);
    kv_b_weight: kv_b_proj.weight, [heads * (nope_dim + v_head_dim), kv_lora_rank]. For each head h and context
    token t with latent c_t: score = scale * ((W_UK[h]^T q_nope[h]) . c_t + q_rot[h] . k_rot_t), which is
    q . k_t for transformers' expanded key k_t = [W_UK[h] c_t, k_rot_t]; out[h] = W_UV[h] (sum_t p_t c_t),
    which is sum_t p_t v_t for its expanded value v_t = W_UV[h] c_t. Computed in float32 (a torch path on every
    device). Returns [rows, heads, v_head_dim] in the query's dtype.
    """
    dev = latent_pool.device
    if batch.device_block_tables is None:
        batch.device_block_tables = batch.block_tables.to(dev)
        batch.device_kv_lens = batch.kv_lens.to(dev)
    tables, lens = batch.device_block_tables, batch.device_kv_lens
    rows, heads, _ = query.shape
    rank = latent_pool.shape[-1]
    w = kv_b_weight.float().view(heads, -1, rank)
    w_uk, w_uv = w[:, :nope_dim], w[:, nope_dim:]                # [heads, nope, rank], [heads, v, rank]
    c = latent_pool[tables].flatten(1, 2)[:, :, 0].float()       # [rows, L, rank]
    k_rot = rope_pool[tables].flatten(1, 2)[:, :, 0].float()     # [rows, L, rope]
    q = query.float()
    q_latent = torch.einsum("rhn,hnc->rhc", q[..., :nope_dim], w_uk)
    scores = (torch.einsum("rhc,rlc->rhl", q_latent, c) + torch.einsum("rhp,rlp->rhl", q[..., nope_dim:], k_rot))
    scores = scores * scale
    keep = torch.arange(c.shape[1], device=dev)[None, :] < lens[:, None]
    probs = torch.softmax(scores.masked_fill(~keep[:, None, :], float("-inf")), dim=-1)
    out_latent = torch.einsum("rhl,rlc->rhc", probs, c)
    return torch.einsum("rhc,hvc->rhv", out_latent, w_uv).to(query.dtype)
