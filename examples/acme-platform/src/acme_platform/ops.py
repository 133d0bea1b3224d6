"""Acme's replacement of the engine's RMSNorm: wherever a model builds
`engine.ops.RMSNorm`, it gets `AcmeRMSNorm`, whose `forward_oot` (chosen on an
out-of-tree platform) calls the ``acme::rms_norm`` operator."""

from __future__ import annotations

from engine.ops import RMSNorm


@RMSNorm.register_oot
class AcmeRMSNorm(RMSNorm):
    def forward_oot(self, x, residual=None):
        import torch

        if residual is not None:
            x = x + residual
            residual = x
        out = torch.ops.acme.rms_norm(x, self.weight, self.variance_epsilon)
        return out if residual is None else (out, residual)
