"""Checks of quantization plugins: the method's declarations, its storage, and its
linear-layer kernel against the dequantized float32 reference (``x @
dequantize(W).T + b`` computed in float32), then an engine serving the default
model with it."""

from __future__ import annotations

from typing import Any

from engine.testing._contracts import _load
from engine.testing._core import Check, CheckFailed, KitContext, needs

KNOWN_FORMATS = ("safetensors", "pt", "gguf")
# weight [N, K]: K a multiple of 256 (the largest GGUF block)
SHAPE = (48, 512)
ROWS = (1, 3, 40)  # one decode row, a small batch, a prompt chunk
# max |linear - reference| / max |reference| allowed: activations may be quantized
# to int8 per block (about 1% here) and bfloat16 adds its rounding
TOLERANCE = {"float32": 0.03, "bfloat16": 0.05}
# relative RMS error of dequantize(quantize(W)) against W: any 4-bit or wider method
# stays well under it; a method that loses the weight does not
ROUND_TRIP_TOLERANCE = 0.25


def quantization_checks(ctx: KitContext, name: str) -> list[Check]:
    """The checks of quantization plugin `name`."""
    prefix = f"quantization/{name}::"
    return [
        Check(prefix + "is_subclass", lambda: _method(ctx, name) and None,
              "the value is an engine.quantization.QuantizationMethod subclass, built with "
              "no arguments"),
        Check(prefix + "declarations", lambda: _check_declarations(ctx, name),
              "checkpoint_formats, gguf_type and cpu_features are well-formed"),
        Check(prefix + "round_trip", lambda: _check_round_trip(ctx, name),
              f"dequantize(quantize(W)) is W within {ROUND_TRIP_TOLERANCE:.0%} relative RMS"),
        Check(prefix + "linear_vs_dequantized", lambda: _check_linear(ctx, name),
              "linear(x) equals x @ dequantize(W).T + b (float32 reference) for "
              f"{', '.join(map(str, ROWS))} rows in float32 and bfloat16"),
        Check(prefix + "embedding_vs_dequantized", lambda: _check_embedding(ctx, name),
              "embedding(ids) equals the dequantized rows"),
        Check(prefix + "engine_run", lambda: _check_engine_run(ctx, name),
              "an engine serves the default model with quantization=NAME (strict mode)"),
    ]


def _method(ctx: KitContext, name: str) -> Any:
    from engine.quantization import QuantizationMethod

    def build() -> Any:
        value = _load(ctx, "quantization", name)
        if not (isinstance(value, type) and issubclass(value, QuantizationMethod)):
            raise CheckFailed(f"the value {value!r} is not a subclass of "
                              "engine.quantization.QuantizationMethod")
        try:
            method = value()
        except Exception as exc:
            raise CheckFailed(f"{value.__qualname__}() raised {type(exc).__name__}: {exc}") from None
        method.name = name
        return method

    return ctx.memo(("quant-method", name), build)


def _built(ctx: KitContext, name: str) -> Any:
    return needs("the method could not be built", _method, ctx, name)


def _check_declarations(ctx: KitContext, name: str) -> None:
    method = _built(ctx, name)
    formats = method.checkpoint_formats
    if not isinstance(formats, tuple) or not formats or not all(isinstance(f, str) for f in formats):
        raise CheckFailed(f"checkpoint_formats must be a non-empty tuple of format names, "
                          f"got {formats!r}")
    if method.gguf_type is not None and "gguf" not in formats:
        raise CheckFailed(f"gguf_type is {method.gguf_type!r} but 'gguf' is not in "
                          f"checkpoint_formats {formats!r}")
    features = method.cpu_features
    if not isinstance(features, tuple) or not all(isinstance(f, str) for f in features):
        raise CheckFailed(f"cpu_features must be a tuple of /proc/cpuinfo flag names, got {features!r}")


def _quantized(ctx: KitContext, name: str) -> tuple[Any, Any]:
    import torch

    from engine.quantization import QuantizedTensor

    def build() -> tuple[Any, Any]:
        method = _built(ctx, name)
        weight = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3)) * 0.1
        if not method.supports(SHAPE):
            raise CheckFailed(f"supports({list(SHAPE)}) is False; the kit needs that shape")
        stored = method.quantize(weight)
        if not isinstance(stored, QuantizedTensor) or tuple(stored.shape) != SHAPE:
            raise CheckFailed(f"quantize returned {stored!r}, expected a QuantizedTensor of "
                              f"shape {list(SHAPE)}")
        packed = method.pack(stored)  # as the engine stores a layer once it is loaded
        if not isinstance(packed, QuantizedTensor) or tuple(packed.shape) != SHAPE:
            raise CheckFailed(f"pack returned {packed!r}, expected a QuantizedTensor of "
                              f"shape {list(SHAPE)}")
        return weight, packed

    return ctx.memo(("quantized", name), build)


def _reference(ctx: KitContext, name: str) -> Any:
    import torch

    method = _built(ctx, name)
    _, stored = needs("quantize failed", _quantized, ctx, name)
    ref = method.dequantize(stored, torch.float32)
    if tuple(ref.shape) != SHAPE or ref.dtype != torch.float32:
        raise CheckFailed(f"dequantize returned {ref.dtype} {list(ref.shape)}, expected "
                          f"float32 {list(SHAPE)}")
    return ref


def _check_round_trip(ctx: KitContext, name: str) -> None:
    weight, _ = needs("quantize failed", _quantized, ctx, name)
    ref = _reference(ctx, name)
    error = float((ref - weight).pow(2).mean().sqrt() / weight.pow(2).mean().sqrt())
    if not error <= ROUND_TRIP_TOLERANCE:
        raise CheckFailed(f"dequantize(quantize(W)) is {error:.1%} off W (relative RMS); "
                          f"allowed {ROUND_TRIP_TOLERANCE:.0%}")


def _check_linear(ctx: KitContext, name: str) -> None:
    import torch

    method = _built(ctx, name)
    _, stored = needs("quantize failed", _quantized, ctx, name)
    ref_weight = needs("dequantize failed", _reference, ctx, name)
    gen = torch.Generator().manual_seed(5)
    bias = torch.randn(SHAPE[0], generator=gen)
    for dtype_name, tol in TOLERANCE.items():
        dtype = getattr(torch, dtype_name)
        for rows in ROWS:
            x = torch.randn(rows, SHAPE[1], generator=gen).to(dtype)
            for b in (None, bias.to(dtype)):
                out = method.linear(stored, x, b)
                if not isinstance(out, torch.Tensor) or tuple(out.shape) != (rows, SHAPE[0]) \
                        or out.dtype != dtype:
                    got = (f"{out.dtype} {list(out.shape)}" if isinstance(out, torch.Tensor)
                           else type(out).__name__)
                    raise CheckFailed(f"linear on {rows} {dtype_name} rows returned {got}, "
                                      f"expected {dtype_name} {[rows, SHAPE[0]]}")
                ref = x.float() @ ref_weight.T + (0 if b is None else b.float())
                error = float((out.float() - ref).abs().max() / ref.abs().max())
                if not error <= tol:
                    raise CheckFailed(
                        f"linear on {rows} {dtype_name} rows ({'with' if b is not None else 'no'} "
                        f"bias) is {error:.2%} off the dequantized float32 reference "
                        f"(max error / max value); allowed {tol:.0%}")


def _check_embedding(ctx: KitContext, name: str) -> None:
    import torch

    method = _built(ctx, name)
    _, stored = needs("quantize failed", _quantized, ctx, name)
    ref = needs("dequantize failed", _reference, ctx, name)
    ids = torch.tensor([0, 7, 7, SHAPE[0] - 1])
    out = method.embedding(stored, ids, torch.float32)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (len(ids), SHAPE[1]):
        raise CheckFailed(f"embedding of {len(ids)} ids returned {out!r:.80}, expected "
                          f"[{len(ids)}, {SHAPE[1]}] float32")
    error = float((out.float() - ref[ids]).abs().max() / ref.abs().max())
    if not error <= 1e-3:
        raise CheckFailed(f"embedding rows are {error:.2%} off the dequantized rows")


def _check_engine_run(ctx: KitContext, name: str) -> None:
    from engine.testing._e2e import MAX_TOKENS, run_engine

    _built(ctx, name)
    report = ctx.memo(("engine_run", "cpu", "quantization", name),
                      lambda: run_engine("cpu", strict=True, quantization=name))
    for tokens in report["tokens"]:
        if len(tokens) != MAX_TOKENS:
            raise CheckFailed(f"the engine returned {len(tokens)} tokens for a prompt, "
                              f"expected {MAX_TOKENS}")
