"""bfloat16 Linear layers computed in float32 on a CPU without bf16 arithmetic (worker/emulated_bf16.py), and the
experts' row limit there (worker/moe.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from worker import emulated_bf16, moe
from worker.emulated_bf16 import WidenedBf16Linear


@pytest.fixture
def emulated(monkeypatch):
    monkeypatch.setattr(emulated_bf16, "cpu_has_native_bf16", lambda: False)
    monkeypatch.setattr(moe, "cpu_has_native_bf16", lambda: False)


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(37, 29), torch.nn.ReLU(), torch.nn.Linear(29, 11, bias=False),
                               torch.nn.LayerNorm(11))


@pytest.mark.parametrize("rows", [1, 3, emulated_bf16.NATIVE_MAX_ROWS, emulated_bf16.NATIVE_MAX_ROWS + 1, 70])
def test_widened_linear_is_the_float32_product_rounded(emulated, rows):
    """Both paths (native for a few rows, a widened GEMM for more) give the float32 product of the bf16
    operands, rounded once to bf16; shapes with leading batch dims are kept."""
    model = _model().to(torch.bfloat16)
    assert emulated_bf16.install(model) == 2
    linear = model[0]
    assert type(linear) is WidenedBf16Linear and linear.weight.dtype == torch.bfloat16
    x = torch.randn(1, rows, 37).to(torch.bfloat16)
    got = linear(x)
    want = (F.linear(x.float(), linear.weight.float()) + linear.bias.float()).to(torch.bfloat16)
    assert got.shape == (1, rows, 29) and got.dtype == torch.bfloat16
    # the native path sums in another order: at most one bf16 step apart
    assert torch.allclose(got.float(), want.float(), rtol=2 ** -7, atol=1e-3)
    # and no farther from the float32 product than torch's own bf16 GEMM is, beyond one rounding
    plain = torch.nn.Linear(37, 29).to(torch.bfloat16)
    plain.load_state_dict(linear.state_dict())
    exact = F.linear(x.float(), linear.weight.float()) + linear.bias.float()
    assert (got.float() - exact).abs().max() <= (plain(x).float() - exact).abs().max() + 2 ** -7


def test_install_leaves_float32_and_native_bf16_cpus_alone(monkeypatch, emulated):
    assert emulated_bf16.install(_model()) == 0  # float32 weights
    monkeypatch.setattr(emulated_bf16, "cpu_has_native_bf16", lambda: True)
    model = _model().to(torch.bfloat16)
    assert emulated_bf16.install(model) == 0
    assert type(model[0]) is torch.nn.Linear


def test_experts_take_the_native_kernel_at_any_size_only_in_emulated_bf16(monkeypatch, emulated):
    assert moe.native_max_rows(torch.bfloat16) is None
    assert moe.native_max_rows(torch.float32) == moe.NATIVE_MAX_ROWS
    monkeypatch.setattr(moe, "cpu_has_native_bf16", lambda: True)
    assert moe.native_max_rows(torch.bfloat16) == moe.NATIVE_MAX_ROWS

