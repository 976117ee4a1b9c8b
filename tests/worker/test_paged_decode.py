"""The decode attention kernel (worker/paged_decode.py) against plain attention over each row's context."""

import math

import pytest
import torch

from worker import native, paged_decode
from worker.paged_decode import DecodeBatch, decode_attention


def reference(q, k_pool, v_pool, tables, lens, scale, window=0, sinks=None):
    """Row by row: softmax(q k^T) v over the row's context, in float64."""
    out = []
    heads, kv_heads = q.shape[1], k_pool.shape[2]
    for r in range(q.shape[0]):
        n = int(lens[r])
        k = k_pool[tables[r]].flatten(0, 1)[:n].double()  # [n, kv_heads, D]
        v = v_pool[tables[r]].flatten(0, 1)[:n].double()
        first = max(0, n - window) if window else 0
        k, v = k[first:], v[first:]
        k = k.repeat_interleave(heads // kv_heads, dim=1)
        v = v.repeat_interleave(heads // kv_heads, dim=1)
        scores = torch.einsum("hd,nhd->hn", q[r].double(), k) * scale
        if sinks is not None:
            scores = torch.cat([scores, sinks.double()[:, None]], dim=1)
        probs = torch.softmax(scores, dim=1)[:, :k.shape[0]]
        out.append(torch.einsum("hn,nhd->hd", probs, v))
    return torch.stack(out)


def case(dtype, heads=4, kv_heads=2, head_dim=64, block_size=16, lens=(1, 17, 300, 1000), seed=0, v_head_dim=None):
    g = torch.Generator().manual_seed(seed)
    widths = [-(-n // block_size) for n in lens]
    num_blocks = sum(widths) + 3
    k_pool = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=g).to(dtype)
    v_pool = torch.randn(num_blocks, block_size, kv_heads, v_head_dim or head_dim, generator=g).to(dtype)
    order = torch.randperm(num_blocks, generator=g).tolist()  # scattered, not contiguous runs
    tables, at = [], 0
    for w in widths:
        tables.append(order[at:at + w] + [0] * (max(widths) - w))
        at += w
    q = torch.randn(len(lens), heads, head_dim, generator=g).to(dtype)
    return q, k_pool, v_pool, DecodeBatch(torch.tensor(tables), torch.tensor(lens))


@pytest.mark.parametrize("path", ["native", "gathered"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window,with_sinks", [(0, False), (64, False), (0, True), (100, True)])
@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (4, 4), (8, 1)])
def test_decode_attention_matches_reference(monkeypatch, path, dtype, window, with_sinks, heads, kv_heads):
    if path == "native" and paged_decode.native_kernel() is None:
        pytest.skip("no C compiler here")
    monkeypatch.setattr(paged_decode, "uses_native", lambda pool: path == "native")
    q, k_pool, v_pool, batch = case(dtype, heads=heads, kv_heads=kv_heads)
    sinks = torch.randn(heads) if with_sinks else None
    scale = 1 / math.sqrt(q.shape[-1])
    got = decode_attention(q, k_pool, v_pool, batch, scale, window=window, sinks=sinks)
    want = reference(q.float(), k_pool, v_pool, batch.block_tables, batch.kv_lens, scale, window, sinks)
    assert got.dtype == dtype and got.shape == q.shape
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert torch.allclose(got.double(), want, atol=tol, rtol=tol), (got.double() - want).abs().max()


@pytest.mark.parametrize("path", ["native", "gathered"])
@pytest.mark.parametrize("head_dim,v_head_dim", [(24, 12), (40, 64), (48, 80)])
def test_keys_and_values_of_different_head_sizes(monkeypatch, path, head_dim, v_head_dim):
    if path == "native" and paged_decode.native_kernel() is None:
        pytest.skip("no C compiler here")
    monkeypatch.setattr(paged_decode, "uses_native", lambda pool: path == "native")
    q, k_pool, v_pool, batch = case(torch.float32, heads=4, kv_heads=2, head_dim=head_dim, v_head_dim=v_head_dim)
    scale = 0.3
    got = decode_attention(q, k_pool, v_pool, batch, scale, window=100)
    want = reference(q, k_pool, v_pool, batch.block_tables, batch.kv_lens, scale, 100)
    assert got.shape == (q.shape[0], 4, v_head_dim)
    assert torch.allclose(got.double(), want, atol=1e-5, rtol=1e-5), (got.double() - want).abs().max()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_latent_decode_is_expanded_attention(dtype):
    """DeepSeek-V3's decode over the cached latent (kv_b_proj absorbed) equals attention over the keys and
    values transformers expands from it: k = [W_UK c, k_rot], v = W_UV c per head, scores scaled by `scale`."""
    heads, nope, rope, v_dim, rank = 4, 16, 8, 12, 32
    q, latent, k_rot, batch = case(dtype, heads=heads, kv_heads=1, head_dim=rank, v_head_dim=rope, seed=3)
    g = torch.Generator().manual_seed(4)
    q = torch.randn(q.shape[0], heads, nope + rope, generator=g).to(dtype)
    weight = (torch.randn(heads * (nope + v_dim), rank, generator=g) / rank ** 0.5).to(dtype)
    scale = 0.17
    got = paged_decode.latent_decode_attention(q, latent, k_rot, batch, scale, weight, nope)
    w = weight.double().view(heads, nope + v_dim, rank)
    expanded = torch.einsum("hjc,nbc->nbhj", w, latent[..., 0, :].double())       # [blocks, bs, heads, nope+v]
    keys = torch.cat([expanded[..., :nope], k_rot.double().expand(-1, -1, heads, -1)], dim=-1)
    want = reference(q.double(), keys, expanded[..., nope:], batch.block_tables, batch.kv_lens, scale)
    assert got.dtype == dtype and got.shape == (q.shape[0], heads, v_dim)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert torch.allclose(got.double(), want, atol=tol, rtol=tol), (got.double() - want).abs().max()


def test_kernel_is_built_once_per_machine_and_reused(tmp_path, monkeypatch):
    if paged_decode.native_kernel() is None:
        pytest.skip("no C compiler here")
    monkeypatch.setenv("QLLM_CACHE_DIR", str(tmp_path))
    first = native._compile()
    built = list((tmp_path / "kernels").glob("qllm_kernels-*.so"))
    assert first is not None and len(built) == 1
    mtime = built[0].stat().st_mtime_ns
    assert native._compile() is not None
    assert built[0].stat().st_mtime_ns == mtime  # loaded from the cache, not rebuilt


def test_no_compiler_falls_back_to_the_gathered_path(tmp_path, monkeypatch):
    monkeypatch.setenv("QLLM_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    assert native._compile() is None
