"""int8 weights with one float scale per output channel (row), multiplied in
plain torch: a quantization method as a third party writes one."""

from __future__ import annotations

import torch

from engine.quantization import QuantizationMethod, QuantizedTensor


class ToyInt8(QuantizationMethod):
    """Row-wise symmetric int8: W[n] = scale[n] * q[n]."""

    checkpoint_formats = ("safetensors", "pt")

    def quantize(self, weight: torch.Tensor) -> QuantizedTensor:
        w = weight.float()
        scale = w.abs().amax(dim=1).clamp(min=1e-8) / 127
        q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
        return QuantizedTensor(self, weight.shape, {"q": q, "scale": scale})

    def dequantize(self, weight: QuantizedTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        t = weight.tensors
        return (t["q"].float() * t["scale"][:, None]).to(dtype)

    def linear(self, weight: QuantizedTensor, x: torch.Tensor,
               bias: torch.Tensor | None) -> torch.Tensor:
        t = weight.tensors
        out = (x.float() @ t["q"].float().T) * t["scale"]
        if bias is not None:
            out = out + bias.float()
        return out.to(x.dtype)


class BrokenToyInt8(ToyInt8):
    """The same storage, with a linear kernel that forgets the scales."""

    def linear(self, weight: QuantizedTensor, x: torch.Tensor,
               bias: torch.Tensor | None) -> torch.Tensor:
        out = x.float() @ weight.tensors["q"].float().T
        return (out if bias is None else out + bias.float()).to(x.dtype)
