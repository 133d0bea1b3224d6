"""Gated activations."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.ops.custom_op import CustomOp


@CustomOp.register("silu_and_mul")
class SiluAndMul(CustomOp):
    """SwiGLU gate: ``x[..., :d]`` through SiLU times ``x[..., d:]``, where the last
    dimension of `x` is ``2 * d`` (a fused gate_up projection's output)."""

    def forward_native(self, x: torch.Tensor) -> torch.Tensor:
        d = x.shape[-1] // 2
        return F.silu(x[..., :d]) * x[..., d:]
