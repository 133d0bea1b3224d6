"""Gated activations."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from engine.kernels import usable_for
from engine.ops.custom_op import CustomOp


@CustomOp.register("silu_and_mul")
class SiluAndMul(CustomOp):
    """SwiGLU gate: ``x[..., :d]`` through SiLU times ``x[..., d:]``, where the last
    dimension of `x` is ``2 * d`` (a fused gate_up projection's output)."""

    def forward_native(self, x: torch.Tensor) -> torch.Tensor:
        d = x.shape[-1] // 2
        return F.silu(x[..., :d]) * x[..., d:]

    def forward_cpu(self, x: torch.Tensor) -> torch.Tensor:
        """One pass in C++ (engine.kernels) where it is loaded; else `forward_native`."""
        if x.dim() < 1 or x.shape[-1] % 2 or not usable_for(x):
            return self.forward_native(x)
        rows = x.reshape(-1, x.shape[-1])
        out = rows.new_empty((rows.shape[0], rows.shape[1] // 2))
        torch.ops.engine_kernels.silu_and_mul(out, rows)
        return out.view(*x.shape[:-1], x.shape[-1] // 2)

    def fast_fn(self, dtype: torch.dtype) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """`forward_cpu`'s kernel call for a model's fast path (engine.ops.fast_path), on
        contiguous [T, 2 * d] rows of `dtype`; None where this op does not run
        `forward_cpu` or the kernels cannot take `dtype`."""
        if not self.uses_cpu_forward() or not usable_for(torch.empty(0, dtype=dtype)):
            return None
        silu_and_mul = torch.ops.engine_kernels.silu_and_mul

        def run(x: torch.Tensor) -> torch.Tensor:
            out = x.new_empty((x.shape[0], x.shape[1] // 2))
            silu_and_mul(out, x)
            return out

        return run

    def uses_cpu_forward(self) -> bool:
        """Whether this op computes by `forward_cpu` of this class (not disabled, not
        replaced by a subclass's method): then a gate_up projection may compute it
        inside its matmuls instead (`MergedColumnParallelLinear.silu_and_mul`)."""
        return getattr(self._forward_method, "__func__", None) is SiluAndMul.forward_cpu
