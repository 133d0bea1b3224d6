"""The interface of a quantization method, and the weights it stores.

A quantization method (a ``quantization`` plugin, see docs/quantization.md) owns
three things: how a float weight [N, K] is stored (`QuantizationMethod.quantize`,
or `QuantizationMethod.from_gguf` for blocks read from a GGUF file as they are),
the kernel of a linear layer on that storage (`QuantizationMethod.linear`, after
an optional repacking once at load, `QuantizationMethod.pack`), and the way back
to floats (`QuantizationMethod.dequantize`, the reference the conformance kit
compares `linear` with). The engine calls nothing else.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from typing import ClassVar

import torch

# whether the step running now brings one row per sequence (`one_row_per_sequence`);
# a context variable, so that two engines stepping in two threads of one process
# each read their own step's (a new thread starts with the default)
_one_row_per_sequence: ContextVar[bool] = ContextVar("one_row_per_sequence", default=False)


@contextmanager
def step_rows(decode_only: bool) -> Iterator[None]:
    """Say, for the duration of a model step (its forward and its logits), whether
    every sequence in it brings one row (`decode_only`): a decode step, or a
    speculative verification step (which attends each verified position as a
    sequence of its own). The model runner says it around each step, a draft
    model around each of its forwards; a method's `linear` reads it with
    `one_row_per_sequence` (outside a step: False). It holds for the thread (and
    asyncio task) that says it."""
    token = _one_row_per_sequence.set(decode_only)
    try:
        yield
    finally:
        _one_row_per_sequence.reset(token)


def one_row_per_sequence() -> bool:
    """Whether the step running now brings one row per sequence (`step_rows`):
    its rows are tokens being decoded, none a prompt's. The built-in GGUF methods
    then take float32 activations that ``dtype="auto"`` chose to their int8
    kernels on up to 48 rows, as a lone sequence's decode row always is (a
    prompt's rows past 16 keep float products), so that in such steps a sequence
    decodes the same whether alone or with up to 47 others."""
    return _one_row_per_sequence.get()


class QuantizedTensor:
    """A weight [N, K] as a quantization method stores it: named tensors whose
    first dimension is the weight's rows (so a slice of rows is a slice of each),
    plus the logical shape. The model's weight loaders take one in place of a
    float tensor, for the layers that can hold it (linear layers, embeddings)."""

    #: Whether the method's products may quantize float32 activations (to int8 per
    #: block, as llama.cpp does with every activation) rather than multiply them as
    #: they are. The engine sets it on a model's weights where ``dtype="auto"``
    #: resolved to float32 (a CPU without bfloat16 arithmetic): there float32 is
    #: the engine's choice, not a request for full precision. An explicit
    #: ``dtype="float32"`` leaves it False. bfloat16 activations, rounded already,
    #: may be quantized either way.
    quantized_activations: bool = False

    def __init__(self, method: QuantizationMethod, shape: Sequence[int],
                 tensors: dict[str, torch.Tensor]) -> None:
        self.method = method
        self.shape = torch.Size(shape)
        self.tensors = tensors
        for key, t in tensors.items():
            if t.shape[0] != self.shape[0]:
                raise ValueError(f"{method.name}: stored tensor {key!r} has {t.shape[0]} rows, "
                                 f"the weight {self.shape[0]}")

    def dim(self) -> int:
        return len(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes the stored tensors hold."""
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def narrow(self, dim: int, start: int, length: int) -> QuantizedTensor:
        """Rows ``start .. start + length`` (dim 0). Along dim 1 only the whole
        width is possible: a block-quantized row cannot be split (tensor-parallel
        row splits need float weights)."""
        if dim == 0:
            return QuantizedTensor(self.method, (length, *self.shape[1:]),
                                   {k: t.narrow(0, start, length) for k, t in self.tensors.items()})
        if start == 0 and length == self.shape[dim]:
            return self
        raise ValueError(f"{self.method.name}-quantized weights cannot be split along their input "
                         "features (tensor parallelism over a row-parallel layer); use a float "
                         "checkpoint or tensor_parallel_size=1")

    def __repr__(self) -> str:
        return f"QuantizedTensor({self.method.name}, shape={list(self.shape)}, {self.nbytes} bytes)"


def concat_rows(parts: Sequence[QuantizedTensor]) -> QuantizedTensor:
    """One tensor of `parts` stacked by rows (all of one method and width)."""
    first = parts[0]
    return QuantizedTensor(first.method, (sum(p.shape[0] for p in parts), *first.shape[1:]),
                           {k: torch.cat([p.tensors[k] for p in parts]) for k in first.tensors})


class QuantizationMethod:
    """A way of storing linear-layer weights quantized, with its kernels.

    Subclass it and publish the class as a ``quantization`` plugin; the plugin's
    name is the method's name (``LLM(model, quantization=NAME)``, and
    `name` is set to it when the engine loads the plugin). Class attributes
    declare what it serves:

    - `checkpoint_formats`: the load formats whose float weights it quantizes at
      load (``"safetensors"``, ``"pt"``, ``"gguf"``);
    - `gguf_type`: the GGUF tensor type (``"Q4_1"``) whose blocks it takes as
      they are (`from_gguf`); a GGUF file's tensors of that type then stay
      quantized without being named;
    - `cpu_features`: the ``/proc/cpuinfo`` flags its fast kernels use (any
      subset may be missing: the method must still run, on a slower path).

    `quantize` and `linear` are required; `dequantize` too (the reference).
    """

    name: str = ""
    checkpoint_formats: ClassVar[tuple[str, ...]] = ("safetensors", "pt")
    gguf_type: ClassVar[str | None] = None
    cpu_features: ClassVar[tuple[str, ...]] = ()

    def supports(self, shape: Sequence[int]) -> bool:
        """Whether a weight of `shape` [N, K] can be stored this way (e.g. K a
        multiple of the block size). Layers it refuses stay in floats."""
        return len(shape) == 2

    def available(self) -> bool:
        """Whether its kernels can run in this process. When False, weights
        read quantized from a file are dequantized at load instead."""
        return True

    def quantize(self, weight: torch.Tensor) -> QuantizedTensor:
        """`weight` [N, K] (float) quantized. Called once per layer at load."""
        raise NotImplementedError(f"{type(self).__qualname__}.quantize")

    def from_gguf(self, blocks: torch.Tensor, shape: Sequence[int]) -> QuantizedTensor:
        """The GGUF blocks of a weight of `shape` ([N, row_bytes] uint8, rows in
        the file's order) as stored by this method. Only for `gguf_type`."""
        raise NotImplementedError(f"{type(self).__qualname__}.from_gguf")

    def pack(self, weight: QuantizedTensor) -> QuantizedTensor:
        """`weight` (all the rows of one layer, of this method) in the layout
        its kernels read fastest, for `linear`, `dequantize` and `embedding`
        from then on. Called once per layer when loading is done; rows are no
        longer sliced or stacked after it, and `weight` itself is not used
        again (its tensors may be repacked in place). By default `weight` as
        it is."""
        return weight

    def linear(self, weight: QuantizedTensor, x: torch.Tensor,
               bias: torch.Tensor | None) -> torch.Tensor:
        """``x @ W.T + bias`` for x [T, K] in the model's dtype; returns [T, N]
        in x's dtype. float32 `x` is multiplied as it is unless
        `weight.quantized_activations` says it may be rounded."""
        raise NotImplementedError(f"{type(self).__qualname__}.linear")

    def fast_fn(self, weight: QuantizedTensor, bias: torch.Tensor | None, dtype: torch.dtype,
                  max_rows: int) -> Callable[[torch.Tensor], torch.Tensor | None] | None:
        """Optional: `linear` for decode steps, bound once to `weight` and `bias`
        (a model's fast path, engine.ops.fast_path): ``run(x)`` on contiguous
        [T, K] rows of `dtype` must return exactly what ``linear(weight, x, bias)``
        would, or None (then `linear` runs) — always None past `max_rows` rows
        (the most rows the layer hands to `linear` unpadded: 48, of which only a
        step of decode rows, `one_row_per_sequence`, brings more than 16; `run`
        sees no more than `linear` would). Worth it where `linear`'s own Python is
        a noticeable part of a small kernel call. By default None: `linear` is
        called."""
        return None

    def dequantize(self, weight: QuantizedTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float weight [N, K] that `weight` stands for."""
        raise NotImplementedError(f"{type(self).__qualname__}.dequantize")

    def embedding(self, weight: QuantizedTensor, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Rows `ids` of the table, as floats of `dtype`; by default the
        dequantized rows."""
        rows = weight.narrow(0, 0, weight.shape[0])
        return self.dequantize(rows, dtype)[ids]
