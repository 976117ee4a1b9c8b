"""int8 KV quantization (worker/kv_quant.py): round trips through the pools within the symmetric bound."""

import pytest
import torch

from worker.kv_quant import (KVQuantizer, QMAX, dequantize, fp_bytes, gather_tokens, int8_block_bytes, quantize,
                             scatter_tokens)

torch.set_num_threads(1)

LAYERS, BLOCKS, BS, HEADS, DIM = 3, 12, 4, 2, 8


def pools(seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    make = lambda: [torch.randn(BLOCKS, BS, HEADS, DIM, generator=g).to(dtype) for _ in range(LAYERS)]
    return make(), make()


@pytest.mark.parametrize("granularity", ["token", "channel"])
def test_round_trip_error_is_within_half_a_scale(granularity):
    x = torch.randn(LAYERS, 37, HEADS, DIM, generator=torch.Generator().manual_seed(1)) * 3
    x[0, 5, 1, 2] = 40.0  # an outlier only widens its own group's scale
    q = quantize(x, granularity)
    assert q.data.dtype is torch.int8 and q.data.abs().max() <= QMAX
    err = (dequantize(q) - x).abs()
    assert torch.all(err <= q.scales / 2 + 1e-6)
    dim = -1 if granularity == "token" else 1
    assert torch.allclose(q.scales, x.abs().amax(dim=dim, keepdim=True) / QMAX)


def test_per_token_scale_isolates_an_outlier_token():
    x = torch.randn(1, 8, 1, DIM, generator=torch.Generator().manual_seed(2))
    x[0, 3] *= 1000
    tok = (dequantize(quantize(x, "token")) - x).abs()[0, [0, 1, 2, 4, 5, 6, 7]].max()
    chan = (dequantize(quantize(x, "channel")) - x).abs()[0, [0, 1, 2, 4, 5, 6, 7]].max()
    assert tok < chan / 10


def test_zero_tensor_round_trips_exactly():
    q = quantize(torch.zeros(1, 4, HEADS, DIM), "token")
    assert torch.equal(dequantize(q), torch.zeros(1, 4, HEADS, DIM))


def test_unknown_granularity_is_refused():
    with pytest.raises(ValueError, match="granularity"):
        quantize(torch.zeros(1, 1, 1, 1), "tensor")
    with pytest.raises(ValueError, match="key_granularity"):
        KVQuantizer(key_granularity="block")


def test_gather_scatter_moves_exactly_the_request_tokens():
    keys, _ = pools()
    src_blocks, dst_blocks, n = [7, 2, 9], [0, 1, 3], 10  # 10 tokens: the third block only partly
    x = gather_tokens(keys, src_blocks, n)
    assert x.shape == (LAYERS, n, HEADS, DIM)
    assert torch.equal(x[1, 5], keys[1][2, 1])
    before = [p.clone() for p in keys]
    scatter_tokens(x, keys, dst_blocks)
    for layer in range(LAYERS):
        assert torch.equal(keys[layer][0], before[layer][7])
        assert torch.equal(keys[layer][3, :2], before[layer][9, :2])
        assert torch.equal(keys[layer][3, 2:], before[layer][3, 2:])  # past the request's tokens: untouched
        assert torch.equal(keys[layer][5], before[layer][5])


def test_scatter_refuses_too_few_blocks():
    keys, _ = pools()
    with pytest.raises(ValueError, match="block_ids"):
        scatter_tokens(torch.zeros(LAYERS, 9, HEADS, DIM), keys, [0, 1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantizer_round_trip_through_pools(dtype):
    keys, values = pools(3, dtype)
    quant = KVQuantizer()
    src, n = [4, 5, 6], 11
    ref_k, ref_v = gather_tokens(keys, src, n).float(), gather_tokens(values, src, n).float()
    q = quant.quantize_blocks(keys, values, src, n)
    for p in keys + values:  # the blocks are free now: someone else overwrites them
        p[4:7] = 0
    quant.dequantize_into(q, keys, values, [10, 11, 0])
    got_k, got_v = gather_tokens(keys, [10, 11, 0], n).float(), gather_tokens(values, [10, 11, 0], n).float()
    # within half a scale of the original (plus the pool dtype's own rounding)
    tol = 1e-6 if dtype is torch.float32 else 1e-2
    assert torch.all((got_k - ref_k).abs() <= q.keys.scales / 2 + tol * ref_k.abs() + 1e-6)
    assert torch.all((got_v - ref_v).abs() <= q.values.scales / 2 + tol * ref_v.abs() + 1e-6)
    # relative error of the whole request is small
    assert (got_k - ref_k).norm() / ref_k.norm() < 0.02
    assert quant.quantize_rate.bytes == fp_bytes(keys, values, 3) and quant.dequantize_rate.bytes_per_s > 0


def test_compact_copy_is_about_a_quarter_of_fp32():
    keys, values = pools()
    q = KVQuantizer("token", "token").quantize_blocks(keys, values, list(range(BLOCKS)), BLOCKS * BS)
    assert q.nbytes == int8_block_bytes(LAYERS, BS, HEADS, DIM) * BLOCKS
    assert q.nbytes < fp_bytes(keys, values, BLOCKS) / 2


def test_keys_and_values_of_different_head_sizes():
    """DeepSeek-V3's latent pools: keys [.., 1, kv_lora_rank], values [.., 1, qk_rope_head_dim]."""
    g = torch.Generator().manual_seed(6)
    keys = [torch.randn(BLOCKS, BS, 1, 32, generator=g) for _ in range(LAYERS)]
    values = [torch.randn(BLOCKS, BS, 1, 8, generator=g) for _ in range(LAYERS)]
    quant = KVQuantizer("token", "token")
    q = quant.quantize_blocks(keys, values, list(range(BLOCKS)), BLOCKS * BS)
    assert q.nbytes == int8_block_bytes(LAYERS, BS, 1, 32, value_head_dim=8) * BLOCKS
    ref_k, ref_v = gather_tokens(keys, [1, 2], 6), gather_tokens(values, [1, 2], 6)
    q = KVQuantizer().quantize_blocks(keys, values, [1, 2], 6)
    quant.dequantize_into(q, keys, values, [9, 10])
    got_k, got_v = gather_tokens(keys, [9, 10], 6), gather_tokens(values, [9, 10], 6)
    assert got_k.shape == (LAYERS, 6, 1, 32) and got_v.shape == (LAYERS, 6, 1, 8)
    assert torch.all((got_k - ref_k).abs() <= q.keys.scales / 2 + 1e-6)
    assert torch.all((got_v - ref_v).abs() <= q.values.scales / 2 + 1e-6)
