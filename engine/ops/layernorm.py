"""RMSNorm, with the residual add fused in (the pre-norm transformer pattern)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn

from engine.kernels import usable_for
from engine.ops.custom_op import CustomOp


@CustomOp.register("rms_norm")
class RMSNorm(CustomOp):
    """``y = x / sqrt(mean(x^2) + eps) * weight``, computed in float32.

    ``forward(x)`` returns the normalised tensor; ``forward(x, residual)`` first
    adds `residual` to `x` and returns ``(normalised, x + residual)``."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.variance_epsilon = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))

    def forward_native(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if residual is not None:
            x = x + residual
            residual = x
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        out = self.weight * h.to(dtype)
        return out if residual is None else (out, residual)

    def forward_cpu(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """One pass in C++ (engine.kernels) where it is loaded; else `forward_native`."""
        tensors = (x, self.weight) if residual is None else (x, residual, self.weight)
        if x.dim() < 1 or not usable_for(*tensors):
            return self.forward_native(x, residual)
        rows = x.reshape(-1, self.hidden_size)
        out = torch.empty_like(rows)
        if residual is None:
            torch.ops.engine_kernels.rms_norm(out, rows, self.weight, self.variance_epsilon)
            return out.view(x.shape)
        new_residual = torch.empty_like(rows)
        torch.ops.engine_kernels.fused_add_rms_norm(
            out, new_residual, rows, residual.reshape(-1, self.hidden_size), self.weight,
            self.variance_epsilon)
        return out.view(x.shape), new_residual.view(x.shape)

    def fast_fn(self, dtype: torch.dtype) -> Callable[
            [torch.Tensor, torch.Tensor | None], tuple[torch.Tensor, torch.Tensor]] | None:
        """`forward_cpu`'s kernel calls for a model's fast path (engine.ops.fast_path):
        ``run(x, residual)`` on contiguous [T, hidden] rows of `dtype` returns
        ``(normalised, residual)`` (`x` itself as the residual when `residual` is
        None). None where this op does not run `forward_cpu` or the kernels cannot
        take its weight."""
        weight = self.weight
        if (getattr(self._forward_method, "__func__", None) is not RMSNorm.forward_cpu
                or weight.dtype != dtype or not weight.is_contiguous() or not usable_for(weight)):
            return None
        eps = self.variance_epsilon
        rms_norm = torch.ops.engine_kernels.rms_norm
        fused_add_rms_norm = torch.ops.engine_kernels.fused_add_rms_norm

        def run(x: torch.Tensor,
                residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
            out = torch.empty_like(x)
            if residual is None:
                rms_norm(out, x, weight, eps)
                return out, x
            new_residual = torch.empty_like(x)
            fused_add_rms_norm(out, new_residual, x, residual, weight, eps)
            return out, new_residual

        return run

    def extra_repr(self) -> str:
        return f"{self.hidden_size}, eps={self.variance_epsilon}"
