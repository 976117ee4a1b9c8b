"""bfloat16 Linear layers on a CPU without bfloat16 arithmetic (no AMX, no AVX512-BF16).

There torch's bfloat16 GEMMs are emulated and several times slower than float32 ones (docs/benchmarks.md,
"Engine speed, fourth step"). The weights stay bfloat16 in memory, which is what an operator who asks for bf16
wants; each call widens them instead: a few rows go through the native kernel, which widens each weight as it
loads it (worker/native_stages.py `linear`), more rows through a float32 GEMM on a widened copy. The
output is rounded to bfloat16, as the module's is.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from worker.model_loader import cpu_has_native_bf16
from worker.native_stages import linear as native_linear

# Rows up to which the native kernel beats widening the weight for a float32 GEMM (docs/benchmarks.md).
NATIVE_MAX_ROWS = 8


class WidenedBf16Linear(torch.nn.Linear):
    """An nn.Linear with bfloat16 weights whose products are computed in float32 (installed by `install`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        out = native_linear(x.reshape(rows, x.shape[-1]), self.weight) if rows <= NATIVE_MAX_ROWS else None
        if out is None:
            out = F.linear(x.reshape(rows, x.shape[-1]).float(), self.weight.float())
        if self.bias is not None:
            out += self.bias.float()
        return out.to(x.dtype).reshape(*x.shape[:-1], out.shape[-1])


def install(model: torch.nn.Module) -> int:
    """On a CPU without native bfloat16, makes every bfloat16 nn.Linear of `model` a WidenedBf16Linear;
    returns how many. Elsewhere (native bf16, GPUs, float32) nothing changes."""
    if cpu_has_native_bf16():
        return 0
    count = 0
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if (type(module) is torch.nn.Linear and isinstance(weight, torch.Tensor) and weight.dtype == torch.bfloat16
                and weight.device.type == "cpu" and weight.is_contiguous()):
            module.__class__ = WidenedBf16Linear
            count += 1
    return count
