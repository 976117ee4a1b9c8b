"""The host pool for swapped-out KV (worker/host_pool.py), on CPU: budget, exact copies, measured rates."""

import pytest
import torch

from worker.host_pool import HostKVPool, HostPoolFull

torch.set_num_threads(1)

LAYERS, BLOCKS, BS, HEADS, DIM = 3, 16, 4, 2, 8
BLOCK_BYTES = LAYERS * 2 * BS * HEADS * DIM * 4


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def pools(seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    make = lambda: [torch.randn(BLOCKS, BS, HEADS, DIM, generator=g).to(device) for _ in range(LAYERS)]
    return make(), make()


def host(blocks, device="cpu"):
    return HostKVPool(LAYERS, BS, HEADS, DIM, torch.float32, blocks * BLOCK_BYTES + 7, device)


def test_budget_in_whole_blocks():
    p = host(5)
    assert p.block_bytes == BLOCK_BYTES and p.capacity_blocks == 5 and p.capacity_bytes == 5 * BLOCK_BYTES
    assert p.free_bytes == p.capacity_bytes and p.used_bytes == 0
    assert p.has_room(5) and not p.has_room(6)


@pytest.mark.parametrize("device", DEVICES)
def test_swap_out_and_in_is_bit_exact_into_other_blocks(device):
    """On CUDA: pinned host memory, copies on a side stream that the compute stream waits for."""
    keys, values = pools(device=device)
    p = host(8, device)
    src = [3, 9, 4]
    want_k = [k[src].clone() for k in keys]
    want_v = [v[src].clone() for v in values]
    p.swap_out("a", keys, values, src)
    assert p.holds("a") and p.num_blocks("a") == 3 and p.used_bytes == 3 * BLOCK_BYTES
    for t in keys + values:  # the device blocks are reused by someone else meanwhile
        t[src] = -1.0
    dst = [0, 1, 2]
    p.swap_in("a", keys, values, dst)
    for layer in range(LAYERS):
        assert torch.equal(keys[layer][dst], want_k[layer])
        assert torch.equal(values[layer][dst], want_v[layer])
    assert not p.holds("a") and p.free_blocks == 8


def test_full_pool_refuses_and_keeps_its_books():
    keys, values = pools()
    p = host(4)
    p.swap_out("a", keys, values, [0, 1, 2])
    with pytest.raises(HostPoolFull):
        p.swap_out("b", keys, values, [3, 4])
    assert not p.holds("b") and p.free_blocks == 1
    with pytest.raises(ValueError, match="already swapped out"):
        p.swap_out("a", keys, values, [5])


def test_swap_in_checks_the_block_count_and_the_request():
    keys, values = pools()
    p = host(4)
    p.swap_out("a", keys, values, [0, 1])
    with pytest.raises(ValueError, match="block_ids"):
        p.swap_in("a", keys, values, [5])
    with pytest.raises(KeyError):
        p.swap_in("nobody", keys, values, [5])
    assert p.holds("a")


def test_fragmented_slab_splits_a_request_over_runs_and_still_round_trips():
    keys, values = pools(1)
    p = host(6)
    p.swap_out("a", keys, values, [0, 1])
    p.swap_out("b", keys, values, [2, 3])
    p.swap_out("c", keys, values, [4, 5])
    p.drop("a")
    p.drop("c")  # free slots: 0-1 and 4-5, no run of 3
    want = [k[[10, 11, 12]].clone() for k in keys]
    p.swap_out("d", keys, values, [10, 11, 12])
    assert len(p._held["d"]) == 2
    p.swap_in("d", keys, values, [13, 14, 15])
    for layer in range(LAYERS):
        assert torch.equal(keys[layer][[13, 14, 15]], want[layer])
    assert p.free_blocks == 4


def test_drop_frees_a_swapped_out_request():
    keys, values = pools()
    p = host(3)
    p.swap_out("a", keys, values, [0, 1, 2])
    assert p.drop("a") == 3 and p.free_blocks == 3 and p.drop("a") == 0


def test_copy_rates_are_measured():
    keys, values = pools()
    p = host(4)
    prior = p.swap_out_bytes_per_s
    p.swap_out("a", keys, values, [0, 1])
    p.swap_in("a", keys, values, [2, 3])
    assert p.out_rate.bytes == 2 * BLOCK_BYTES and p.in_rate.bytes == 2 * BLOCK_BYTES
    assert p.out_rate.seconds > 0 and p.swap_out_bytes_per_s != prior and p.swap_in_bytes_per_s > 0


def test_zero_budget_holds_nothing():
    p = HostKVPool(LAYERS, BS, HEADS, DIM, torch.float32, 0, "cpu")
    assert p.capacity_blocks == 0 and not p.has_room(1)


def test_keys_and_values_of_different_head_sizes_round_trip():
    """DeepSeek-V3's latent pools: keys [.., 1, kv_lora_rank], values [.., 1, qk_rope_head_dim]."""
    g = torch.Generator().manual_seed(5)
    keys = [torch.randn(BLOCKS, BS, 1, 32, generator=g) for _ in range(LAYERS)]
    values = [torch.randn(BLOCKS, BS, 1, 8, generator=g) for _ in range(LAYERS)]
    block_bytes = LAYERS * BS * (32 + 8) * 4
    p = HostKVPool(LAYERS, BS, 1, 32, torch.float32, 4 * block_bytes, "cpu", value_head_dim=8)
    assert p.block_bytes == block_bytes and p.capacity_blocks == 4
    src, dst = [7, 2, 11], [0, 1, 3]
    want_k, want_v = [k[src].clone() for k in keys], [v[src].clone() for v in values]
    p.swap_out("a", keys, values, src)
    p.swap_in("a", keys, values, dst)
    for layer in range(LAYERS):
        assert torch.equal(keys[layer][dst], want_k[layer]) and torch.equal(values[layer][dst], want_v[layer])
