"""Quantized weights inside the model's layers.

A linear layer, embedding or LM head holds a `QuantizedWeight` in
``layer.quant_weight`` once its checkpoint rows arrive quantized (a GGUF file's
blocks, through the usual weight loaders: `add_rows`) or once `quantize_model`
quantizes its float weight after loading. The float parameter is then released
(it keeps its shape and dtype, for code that reads them, but holds one value).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Protocol, cast

import torch
import torch.nn as nn

from engine.kernels import LINEAR_GGML_PARTS
from engine.quantization.interface import (
    QuantizationMethod,
    QuantizedTensor,
    concat_rows,
    one_row_per_sequence,
)
from engine.utils import pad_rows_to_bucket

logger = logging.getLogger(__name__)

# up to this many rows, no padding: decode steps and small batches run the
# methods' own kernels, not a dense product per shape
PAD_ABOVE_ROWS = 16
# the same in a step of decode rows only (`one_row_per_sequence`): its row counts
# are bounded by the sequences a step holds, and the built-in kernels take up to
# 48 decode rows whole
DECODE_PAD_ABOVE_ROWS = 48


def _unpadded_rows() -> int:
    """The most rows `QuantizedWeight.linear` hands to the methods as they are, in
    the step running now."""
    return DECODE_PAD_ABOVE_ROWS if one_row_per_sequence() else PAD_ABOVE_ROWS


class QuantizedWeight:
    """A layer's weight [N, K] as row ranges, each a `QuantizedTensor` (one
    range unless the fused parts of a layer come in different types, e.g. a
    GGUF file with a Q6_K value projection next to Q4_K query and key)."""

    def __init__(self, shape: tuple[int, int]) -> None:
        self.shape = shape
        self.parts: list[tuple[int, QuantizedTensor]] = []

    def add(self, offset: int, rows: QuantizedTensor) -> None:
        """Rows ``offset .. offset + len(rows)`` of the weight."""
        self.parts.append((offset, rows))

    def finish(self, where: str) -> None:
        """Check the ranges cover the weight once; merge neighbours of one
        method, and let each method pack its rows for its kernels."""
        self.parts.sort(key=lambda p: p[0])
        at = 0
        merged: list[tuple[int, list[QuantizedTensor]]] = []
        for offset, rows in self.parts:
            if offset != at or rows.shape[1] != self.shape[1]:
                raise ValueError(f"{where}: quantized rows from {offset} do not continue the "
                                 f"weight at row {at} (or have another width)")
            if merged and merged[-1][1][0].method is rows.method:
                merged[-1][1].append(rows)
            else:
                merged.append((offset, [rows]))
            at += rows.shape[0]
        if at != self.shape[0]:
            raise ValueError(f"{where}: quantized rows cover {at} of the weight's {self.shape[0]} rows")
        self.parts = []
        for offset, group in merged:
            rows = group[0] if len(group) == 1 else concat_rows(group)
            self.parts.append((offset, rows.method.pack(rows)))

    @property
    def nbytes(self) -> int:
        return sum(rows.nbytes for _, rows in self.parts)

    @property
    def methods(self) -> list[str]:
        return [rows.method.name for _, rows in self.parts]

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """``x @ W.T + bias`` through each range's method. Prompt-sized inputs
        (more than `PAD_ABOVE_ROWS` rows; `DECODE_PAD_ABOVE_ROWS` in a step of
        decode rows) reach the methods padded to a `shape_bucket`: their dense
        products (oneDNN) build and keep a kernel, with its packed-weight scratch,
        per row count, so unpadded, every new prompt length grows the process (by
        MiBs, up to the caches' 1024 entries)."""
        if x.dim() != 2:
            return self._linear(x, bias)
        padded = pad_rows_to_bucket(x, _unpadded_rows())
        out = self._linear(padded, bias)
        return out if padded is x else out[:x.shape[0]]  # decode steps: no slice

    def _linear(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if len(self.parts) == 1:
            rows = self.parts[0][1]
            return rows.method.linear(rows, x, bias)
        outs = []
        for offset, rows in self.parts:
            part_bias = None if bias is None else bias[offset:offset + rows.shape[0]]
            outs.append(rows.method.linear(rows, x, part_bias))
        return torch.cat(outs, dim=-1)

    def _part_bias(self, bias: torch.Tensor | None, offset: int,
                   rows: QuantizedTensor) -> torch.Tensor | None:
        """The rows of a fused layer's bias that one range's product adds."""
        if bias is None or len(self.parts) == 1:
            return bias
        return bias[offset:offset + rows.shape[0]]

    def fast_fn(self, bias: torch.Tensor | None,
                  dtype: torch.dtype) -> Callable[[torch.Tensor], torch.Tensor | None] | None:
        """`linear` for a model's fast path (engine.ops.fast_path): the methods' own
        `QuantizationMethod.fast_fn`, taking the rows `linear` does not pad (up to
        `PAD_ABOVE_ROWS`, `DECODE_PAD_ABOVE_ROWS` in a step of decode rows); a
        weight of several ranges joins its ranges' outputs, as `linear` does. None
        where a range's method has no fast form."""
        fns = []
        for offset, rows in self.parts:
            fn = rows.method.fast_fn(rows, self._part_bias(bias, offset, rows), dtype,
                                     DECODE_PAD_ABOVE_ROWS)
            if fn is None:
                return None
            fns.append(fn)

        def run(x: torch.Tensor) -> torch.Tensor | None:
            if x.shape[0] > PAD_ABOVE_ROWS and not one_row_per_sequence():
                return None  # `linear` pads these rows
            if len(fns) == 1:
                return fns[0](x)
            outs = []
            for fn in fns:
                out = fn(x)
                if out is None:
                    return None
                outs.append(out)
            return torch.cat(outs, dim=-1)

        return run

    def fast_kernel(self, bias: torch.Tensor | None, dtype: torch.dtype, rows: int
                    ) -> tuple[list[int], list[torch.Tensor | None]] | None:
        """The compiled kernel call `fast_fn`'s form makes for `rows` rows, for
        ``engine_kernels::decode_layers`` (engine.ops.linear.fast_linear_kernel):
        ``([kernel, ...5 integers], [operand, bias])``; a weight of several ranges:
        ``([LINEAR_GGML_PARTS, out_features, 0, ranges, 0, then each range's 5],
        [each range's operand and bias])``. Only the built-in GGUF block methods
        say (`decode_kernel`); None otherwise."""
        specs = []
        for offset, part in self.parts:
            kernel = getattr(part.method, "decode_kernel", None)
            spec = None if kernel is None else kernel(part, self._part_bias(bias, offset, part), dtype,
                                                      rows, _unpadded_rows())
            if spec is None:
                return None
            specs.append(spec)
        if len(specs) == 1:
            ints, operand, part_bias = specs[0]
            return ints, [operand, part_bias]
        ints = [LINEAR_GGML_PARTS, self.shape[0], 0, len(specs), 0]
        tensors: list[torch.Tensor | None] = []
        for part_ints, operand, part_bias in specs:
            ints += part_ints
            tensors += [operand, part_bias]
        return ints, tensors

    def embedding(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if len(self.parts) != 1:
            raise ValueError("a quantized embedding table must be of one method")
        rows = self.parts[0][1]
        return rows.method.embedding(rows, ids, dtype)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.cat([rows.method.dequantize(rows, dtype) for _, rows in self.parts])


class QuantizableLayer(Protocol):
    """What the quantized-weight code uses of a linear or embedding layer (the
    layers of engine.ops carry these attributes)."""

    quant_weight: QuantizedWeight | None
    weight: torch.Tensor


def add_rows(layer: QuantizableLayer, param: torch.Tensor, offset: int, size: int,
             loaded: QuantizedTensor) -> None:
    """Weight-loader step for a quantized checkpoint tensor: keep `loaded` as
    rows ``offset .. offset + size`` of `layer`'s quantized weight. Raises
    ValueError on a shape mismatch or for a quantized bias."""
    if param.dim() != 2:
        raise ValueError(f"a quantized checkpoint tensor cannot fill a {param.dim()}-D parameter")
    if tuple(loaded.shape) != (size, param.shape[1]):
        raise ValueError(f"shape mismatch: checkpoint tensor has shape {list(loaded.shape)}, "
                         f"the model expects {[size, param.shape[1]]}")
    qw = getattr(layer, "quant_weight", None)
    if qw is None:
        qw = layer.quant_weight = QuantizedWeight((param.shape[0], param.shape[1]))
    qw.add(offset, loaded)


def _release(layer: QuantizableLayer) -> None:
    """Swap the float weight for one value broadcast to its shape."""
    old = layer.weight
    placeholder = torch.zeros((), dtype=old.dtype, device=old.device).expand(old.shape)
    layer.weight = nn.Parameter(placeholder, requires_grad=False)


def _quantizable(model: nn.Module) -> list[tuple[str, QuantizableLayer]]:
    return [(name, cast(QuantizableLayer, m)) for name, m in model.named_modules()
            if hasattr(m, "quant_weight")]


def finish_quantized_layers(model: nn.Module) -> int:
    """After loading: check every layer's quantized rows, release the float
    weights they replace, and let a tied LM head share its embedding's
    quantized table. When a method's kernels cannot run here, its layers are
    dequantized into their float weights instead (with a warning). Returns the
    number of quantized layers."""
    layers = _quantizable(model)
    by_weight = {id(m.weight): m for _, m in layers if m.quant_weight is not None}
    count = 0
    for name, layer in layers:
        if layer.quant_weight is None:
            source = by_weight.get(id(layer.weight))  # a head tied to a quantized embedding
            if source is None or source is layer:
                continue
            layer.quant_weight = source.quant_weight
            setattr(layer, "tied_quant_source", source)  # noqa: B010 (an attribute only tied heads get)
            continue
        layer.quant_weight.finish(name)
    for name, layer in layers:
        qw = layer.quant_weight
        if qw is None or getattr(layer, "tied_quant_source", None) is not None:
            continue
        unavailable = [rows.method.name for _, rows in qw.parts if not rows.method.available()]
        if unavailable:
            logger.warning("%s: the kernels of %s cannot run here (compiled CPU kernels not "
                           "loaded); dequantizing it", name, ", ".join(unavailable))
            layer.weight.data.copy_(qw.dequantize(layer.weight.dtype))
            layer.quant_weight = None
            continue
        _release(layer)
        count += 1
    for _, layer in layers:  # heads tied to an embedding that was dequantized after all
        source = getattr(layer, "tied_quant_source", None)
        if source is not None:
            layer.quant_weight = source.quant_weight
            layer.weight = source.weight
    return count


def quantize_model(model: nn.Module, method: QuantizationMethod) -> int:
    """Quantize the float weight of every linear layer, embedding and LM head
    of `model` that `method` supports (others stay float, logged). Returns the
    number of layers quantized (0, with a warning, when the method's kernels
    cannot run in this process: the model then stays float)."""
    if not method.available():
        logger.warning("quantization %r: its kernels cannot run here (compiled CPU kernels not "
                       "loaded); the weights stay %s", method.name,
                       next(model.parameters()).dtype)
        return 0
    count = 0
    for name, layer in _quantizable(model):
        if layer.quant_weight is not None:
            continue
        weight = layer.weight
        if not method.supports(tuple(weight.shape)):
            logger.info("%s: %s cannot store a %s weight; it stays %s", name, method.name,
                        list(weight.shape), weight.dtype)
            continue
        try:
            rows = method.quantize(weight.detach())
        except Exception as exc:
            raise ValueError(f"quantization method {method.name!r} failed on {name} "
                             f"{list(weight.shape)}: {type(exc).__name__}: {exc}") from exc
        qw = QuantizedWeight((weight.shape[0], weight.shape[1]))
        qw.add(0, rows)
        qw.finish(name)
        layer.quant_weight = qw
        tied = [m for _, m in _quantizable(model) if m is not layer and m.weight is weight]
        _release(layer)
        for other in tied:  # a head tied to this embedding: one table, one placeholder
            other.weight = layer.weight
            other.quant_weight = qw
        count += 1
    return count


def allow_quantized_activations(model: nn.Module) -> int:
    """Let the methods of every quantized weight of `model` quantize float32
    activations (`QuantizedTensor.quantized_activations`): for a model whose
    float32 dtype the engine chose (``dtype="auto"``), not the user. Returns the
    number of layers."""
    count = 0
    for _, layer in _quantizable(model):
        if layer.quant_weight is not None:
            for _, rows in layer.quant_weight.parts:
                rows.quantized_activations = True
            count += 1
    return count


def quantized_layers(model: nn.Module) -> dict[str, list[str]]:
    """Layer name -> the methods of its quantized weight, for every quantized layer."""
    return {name: layer.quant_weight.methods for name, layer in _quantizable(model)
            if layer.quant_weight is not None}
