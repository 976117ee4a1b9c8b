"""The native experts kernel (worker/csrc/moe_experts.c through worker/moe.py) against plain torch math, on
shapes that exercise its register tiles' edges: row counts that are not multiples of the tile, widths that
are not multiples of a vector, one row, many rows per expert, unused experts, and bfloat16 weights."""

from __future__ import annotations

import pytest
import torch

from worker import moe

pytestmark = pytest.mark.skipif(moe.native_kernel() is None, reason="no native kernel here (no C compiler)")


def reference(x, ids, weights, gate_up, down):
    out = torch.zeros_like(x)
    inter = down.shape[2]
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            gu = gate_up[e].float() @ x[t]
            act = torch.nn.functional.silu(gu[:inter]) * gu[inter:]
            out[t] += weights[t, j] * (down[e].float() @ act)
    return out


def native(x, ids, weights, gate_up, down):
    out = torch.empty_like(x)
    status = moe.native_kernel()(
        x.data_ptr(), ids.data_ptr(), weights.data_ptr(), gate_up.data_ptr(), down.data_ptr(),
        int(gate_up.dtype == torch.bfloat16), out.data_ptr(), x.shape[0], ids.shape[1], x.shape[1],
        down.shape[2], gate_up.shape[0], 1)
    assert status == 0
    return out


@pytest.mark.parametrize("rows", [1, 2, 3, 5, 7, 13, 40, 100])
@pytest.mark.parametrize("hidden,inter", [(32, 48), (36, 20), (13, 9), (40, 24)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_experts_kernel_matches_torch(rows, hidden, inter, dtype):
    g = torch.Generator().manual_seed(rows * 1000 + hidden)
    experts, top_k = 6, 2
    gate_up = (torch.randn(experts, 2 * inter, hidden, generator=g) * 0.2).to(dtype)
    down = (torch.randn(experts, hidden, inter, generator=g) * 0.2).to(dtype)
    x = torch.randn(rows, hidden, generator=g)
    # experts 0..3 only, so some experts see no rows and the busy ones see many
    ids = torch.stack([torch.randperm(4, generator=g)[:top_k] for _ in range(rows)]).to(torch.int64)
    weights = torch.rand(rows, top_k, generator=g)
    got = native(x, ids, weights, gate_up, down)
    want = reference(x, ids, weights, gate_up, down)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_ids_outside_the_experts_are_skipped():
    g = torch.Generator().manual_seed(7)
    gate_up, down = torch.randn(3, 16, 8, generator=g), torch.randn(3, 8, 8, generator=g)
    x = torch.randn(5, 8, generator=g)
    ids = torch.tensor([[0, -1], [1, 3], [2, 2], [-1, -1], [0, 1]], dtype=torch.int64)
    weights = torch.rand(5, 2, generator=g)
    got = native(x, ids, weights, gate_up, down)
    kept = ids.clamp(0, 2)
    kept_weights = torch.where((ids >= 0) & (ids < 3), weights, torch.zeros_like(weights))
    torch.testing.assert_close(got, reference(x, kept, kept_weights, gate_up, down), rtol=1e-4, atol=1e-4)
    assert torch.equal(got[3], torch.zeros(8))


class _Experts(torch.nn.Module):
    def __init__(self, gate_up, down):
        super().__init__()
        self.gate_up_proj, self.down_proj = gate_up, down


@pytest.mark.parametrize("count", [1, 3, 8])
def test_experts_in_parts_sum_to_the_one_call_bit_for_bit(count):
    """The engine may park a step between ranges of experts; the ranges add up to what one call gives."""
    g = torch.Generator().manual_seed(1)
    experts, rows, hidden, inter, top_k = 8, 37, 32, 48, 2
    x = torch.randn(rows, hidden, generator=g)
    gate_up = torch.randn(experts, 2 * inter, hidden, generator=g) / 8
    down = torch.randn(experts, hidden, inter, generator=g) / 8
    ids = torch.stack([torch.randperm(experts, generator=g)[:top_k] for _ in range(rows)])
    weights = torch.rand(rows, top_k, generator=g)
    parts = moe.ExpertsInParts(_Experts(gate_up, down), x, ids, weights)
    calls = 0
    while not parts.done:
        parts.run(count)
        calls += 1
    assert calls == -(-experts // count)
    assert torch.equal(parts.result(), native(x, ids, weights, gate_up, down))


@pytest.mark.parametrize("rows", [16, 48, 80])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_busy_experts_and_saturated_gates(rows, dtype):
    """Every row picks experts 0 and 1, so each sees `rows` rows (the transposed path, with a last register of
    rows where `rows` is not a multiple of two registers); gates far into SiLU's flat tails (|g| up to ~100)
    check its vector exp's range."""
    g = torch.Generator().manual_seed(rows)
    experts, hidden, inter, top_k = 3, 40, 36, 2
    gate_up = (torch.randn(experts, 2 * inter, hidden, generator=g) * 0.2).to(dtype)
    down = (torch.randn(experts, hidden, inter, generator=g) * 0.2).to(dtype)
    x = torch.randn(rows, hidden, generator=g) * torch.logspace(-2, 1.5, rows)[:, None]
    ids = torch.tensor([[0, 1]] * rows, dtype=torch.int64)
    weights = torch.rand(rows, top_k, generator=g)
    got = native(x, ids, weights, gate_up, down)
    want = reference(x, ids, weights, gate_up, down)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
