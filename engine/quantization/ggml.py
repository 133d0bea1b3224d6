"""The built-in quantization methods: llama.cpp's block formats (GGUF tensor types).

Each method keeps a weight as GGUF stores it, ``{"blocks": uint8 [N, row_bytes]}``,
and runs it with the compiled kernels of ``engine/kernels/ggml_quant.cpp``. Once a
layer is loaded, the 32-value types (Q4_0 Q4_1 Q5_0 Q5_1 Q8_0) are repacked
(`GGMLBlockMethod.pack`) into ``{"interleaved": uint8 [N, row_bytes]}``: the same
bytes with the blocks of 16 rows interleaved, the layout the decode kernel
streams in order (its comment in ggml_quant.cpp, "interleaved groups"):

- few rows (decode steps, small batches: `MAX_KERNEL_ROWS`, `MAX_INTERLEAVED_ROWS`):
  ``ggml_linear`` reads every block once.
  With bfloat16 activations each 32-value chunk of x is quantized to int8 and
  multiplied with integer dot products, on the best path this CPU's
  ``/proc/cpuinfo`` flags allow (`kernel_paths`); float32 activations take the
  chunks as floats (the dequantize-then-matmul product up to summation order);
- many rows (prompts): ``ggml_matmul`` dequantizes the weight a tile of rows
  at a time (`PREFILL_TILE_BYTES`, so the tile stays in cache and the whole float
  weight is never allocated) into the activation dtype, each tile multiplied by
  torch's dense matmul (compute-bound, where oneDNN is best).

Quantizing at load (``quantization="q4_0"`` on a float checkpoint) uses the
`gguf` package's quantizers for the 32-value types and `engine.quantization.kquants`
for the K-quants.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from engine.kernels import LINEAR_GGML, cpu_flags, kernels_available
from engine.quantization.interface import (
    QuantizationMethod,
    QuantizedTensor,
    one_row_per_sequence,
)

# (ggml type id, values per block, bytes per block)
GGML_TYPES: dict[str, tuple[int, int, int]] = {
    "Q4_0": (2, 32, 18), "Q4_1": (3, 32, 20), "Q5_0": (6, 32, 22), "Q5_1": (7, 32, 24),
    "Q8_0": (8, 32, 34), "Q4_K": (12, 256, 144), "Q5_K": (13, 256, 176), "Q6_K": (14, 256, 210),
}

# kernel paths (engine/kernels/ggml_quant.cpp), best last, with the cpuinfo flags each needs
PATHS = {"float": (0, ()), "portable": (1, ()), "avx2": (2, ("avx2",)),
         "avx512_vnni": (3, ("avx2", "avx512_vnni", "avx512vl"))}
PATH_ENV = "ENGINE_QUANT_KERNEL_PATH"
_VNNI = PATHS["avx512_vnni"][0]
_AVX2 = PATHS["avx2"][0]
_FLOAT = PATHS["float"][0]
# ggml_compiled_paths' bit saying the avx2 path has kernels for interleaved groups
_AVX2_GROUPS_BIT = 8
# up to this many activation rows, the block kernel; more: dequantize, then a dense matmul
MAX_KERNEL_ROWS = 16
# the same for interleaved weights and bfloat16 activations on the avx512_vnni path,
# whose kernel stays ahead of dequantize-then-matmul to about 50 rows, and on the
# avx2 path (its 8-row halves: 1.3-2.3x faster than the tiles at 32-48 rows on a
# 2-core AVX2 EPYC; benchmarks/bench_kernels.py --parts ggml). float32 activations
# that may be rounded (`QuantizedTensor.quantized_activations`) take it only in a
# step of one row per sequence (`one_row_per_sequence`: decode rows, rounded to
# int8 as a lone sequence's are) and keep the float tiles past MAX_KERNEL_ROWS
# otherwise: with the int8 kernel up to 48 rows a prompt's rows were rounded to
# int8 too, and the teacher-forced agreement with the float32-dequantized model
# fell from >= 98% to 93-96% (Q4_1, Q5_0, Q5_1) on the tests' tiny models
MAX_INTERLEAVED_ROWS = 48
# the same for the K-quants (256-value super-blocks, file layout) with bfloat16
# activations on the avx512_vnni path, where dequantize-then-matmul catches up
# with the super-block kernel at 12-16 rows (benchmarks/bench_kernels.py --parts kquants)
MAX_K_SUPER_ROWS = 12
# the smallest of the three: a call with no more rows never needs the layout's own
_MIN_ROW_LIMIT = min(MAX_KERNEL_ROWS, MAX_INTERLEAVED_ROWS, MAX_K_SUPER_ROWS)
# bytes of dequantized weight per tile of a prompt-sized product (fits a core's L2)
PREFILL_TILE_BYTES = 1 << 20

_paths: list[str] | None = None
_interleaving: bool | None = None


def kernel_paths() -> list[str]:
    """The int8 kernel paths this process can run, best first: those compiled
    into the kernels whose ``/proc/cpuinfo`` flags are all present, then
    ``"portable"``. Empty when the kernels are not loaded."""
    global _paths
    if _paths is None:
        if not kernels_available():
            return []
        compiled = torch.ops.engine_kernels.ggml_compiled_paths()
        flags = cpu_flags()
        _paths = [name for name, (bit, needs) in reversed(PATHS.items())
                  if name != "float" and compiled >> bit & 1 and all(f in flags for f in needs)]
    return _paths


def interleaves() -> bool:
    """Whether the best int8 path here reads the 32-value formats in interleaved
    groups (`GGMLBlockMethod.pack`): avx512_vnni, and avx2 where its group
    kernels are compiled in (they need F16C and FMA besides AVX2)."""
    global _interleaving
    if _interleaving is None:
        best = kernel_paths()[:1]
        if not best:
            return False  # the kernels are not loaded (yet): nothing to decide
        _interleaving = best == ["avx512_vnni"] or (
            best == ["avx2"]
            and bool(torch.ops.engine_kernels.ggml_compiled_paths() >> _AVX2_GROUPS_BIT & 1))
    return _interleaving


def kernel_path(dtype: torch.dtype, quantized_activations: bool = False) -> int:
    """The kernel path for activations of `dtype`: ``ENGINE_QUANT_KERNEL_PATH``
    when set, else float chunks for float32 (unless the weight allows
    `quantized_activations`: ``dtype="auto"`` chose float32) and the best int8
    path otherwise.
    (Read on every call, so that a test can force a path between two calls: one
    environment look-up, a decode step's hundred calls barely see it.)"""
    forced = os.environ.get(PATH_ENV)
    if forced:
        if forced not in PATHS or (forced != "float" and forced not in kernel_paths()):
            raise ValueError(f"{PATH_ENV}={forced!r} is not a kernel path this CPU runs; "
                             f"valid: float, {', '.join(kernel_paths())}")
        return PATHS[forced][0]
    if dtype is torch.float32 and not quantized_activations:
        return _FLOAT
    return PATHS[kernel_paths()[0]][0]


class GGMLBlockMethod(QuantizationMethod):
    """One GGUF block type, stored and multiplied in place (see the module doc)."""

    checkpoint_formats: ClassVar[tuple[str, ...]] = ("gguf", "safetensors", "pt")
    cpu_features: ClassVar[tuple[str, ...]] = ("avx2", "avx512_vnni", "avx512vl")

    def __init__(self) -> None:
        assert self.gguf_type is not None
        self.type_id, self.block_values, self.block_bytes = GGML_TYPES[self.gguf_type]
        if not self.name:
            self.name = self.gguf_type.lower()

    def supports(self, shape: Sequence[int]) -> bool:
        return len(shape) == 2 and shape[1] % self.block_values == 0

    def available(self) -> bool:
        return bool(kernel_paths())

    def row_bytes(self, cols: int) -> int:
        return cols // self.block_values * self.block_bytes

    @staticmethod
    def _stored(weight: QuantizedTensor) -> tuple[torch.Tensor, bool]:
        """The weight's bytes, and whether they are interleaved (`pack`)."""
        if "interleaved" in weight.tensors:
            return weight.tensors["interleaved"], True
        return weight.tensors["blocks"], False

    def pack(self, weight: QuantizedTensor) -> QuantizedTensor:
        """The 32-value types' blocks interleaved by groups of 16 rows, in
        place (`weight` is spent), where the CPU's best int8 path reads that layout
        (`interleaves`: avx512_vnni, avx2); other types, and other CPUs, keep the
        blocks as they are (their paths would rebuild each row as the file has it
        on every call)."""
        if self.block_values != 32 or "blocks" not in weight.tensors or not interleaves():
            return weight
        blocks = weight.tensors["blocks"]  # repacked in place: no second copy at load
        torch.ops.engine_kernels.ggml_interleave(blocks, blocks, self.type_id)
        return QuantizedTensor(self, weight.shape, {"interleaved": blocks})

    def from_gguf(self, blocks: torch.Tensor, shape: Sequence[int]) -> QuantizedTensor:
        rows, cols = shape
        if not self.supports(shape) or tuple(blocks.shape) != (rows, self.row_bytes(cols)):
            raise ValueError(f"{self.gguf_type} blocks of shape {list(blocks.shape)} do not "
                             f"hold a [{rows}, {cols}] weight")
        return QuantizedTensor(self, shape, {"blocks": blocks.contiguous()})

    def quantize(self, weight: torch.Tensor) -> QuantizedTensor:
        if not self.supports(weight.shape):
            raise ValueError(f"{self.name}: a [{', '.join(map(str, weight.shape))}] weight does not "
                             f"split into blocks of {self.block_values}")
        values = weight.detach().float().cpu().numpy()
        blocks = self._quantize_numpy(values)
        return self.from_gguf(torch.from_numpy(np.ascontiguousarray(blocks)), weight.shape)

    def _quantize_numpy(self, values: np.ndarray) -> np.ndarray:
        import gguf

        return gguf.quants.quantize(values, gguf.GGMLQuantizationType[str(self.gguf_type)])

    def dequantize(self, weight: QuantizedTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        stored, interleaved = self._stored(weight)
        if kernel_paths():  # the kernels write float32 or bfloat16
            kernel_dtype = dtype if dtype in (torch.float32, torch.bfloat16) else torch.float32
            out = torch.empty(tuple(weight.shape), dtype=kernel_dtype)
            torch.ops.engine_kernels.ggml_dequantize(out, stored, self.type_id, interleaved)
            return out.to(dtype)
        import gguf

        values = gguf.dequantize(weight.tensors["blocks"].numpy(),
                                 gguf.GGMLQuantizationType[str(self.gguf_type)])
        return torch.from_numpy(np.ascontiguousarray(values)).reshape(weight.shape).to(dtype)

    def _row_limit(self, interleaved: bool, path: int, dtype: torch.dtype,
                   decode_rows: bool = False) -> int:
        """The most activation rows the block kernel takes; more go to
        dequantize-then-matmul (the crossovers measured per layout). `decode_rows`:
        a step of decode rows only (`one_row_per_sequence`)."""
        if interleaved and (path == _AVX2 or path == _VNNI) and (
                dtype is torch.bfloat16 or decode_rows):
            # float32 rows that may be rounded (an int8 path): only in a step of
            # decode rows, which a lone sequence's decode takes to the kernel too
            return MAX_INTERLEAVED_ROWS
        if path == _VNNI and dtype is torch.bfloat16 and self.block_values == 256:
            return MAX_K_SUPER_ROWS
        return MAX_KERNEL_ROWS

    def linear(self, weight: QuantizedTensor, x: torch.Tensor,
               bias: torch.Tensor | None) -> torch.Tensor:
        # a decode step makes a hundred of these calls, each a few microseconds of
        # kernel on the small layers: the Python here is kept to what the call needs
        # (the model's x is already [T, K] and contiguous: no reshapes)
        dtype = x.dtype
        if dtype is not torch.bfloat16 and dtype is not torch.float32:
            return F.linear(x, self.dequantize(weight, dtype), bias)
        x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
        if not x2.is_contiguous():
            x2 = x2.contiguous()
        rows = x2.shape[0]
        out = x2.new_empty((rows, weight.shape[0]))
        if bias is not None and bias.dtype != dtype:
            bias = bias.to(dtype)
        stored = weight.tensors.get("interleaved")
        interleaved = stored is not None
        if stored is None:
            stored = weight.tensors["blocks"]
        path = kernel_path(dtype, weight.quantized_activations)
        # float32 rows past MAX_KERNEL_ROWS reach the block kernel in a step of
        # decode rows only, even where a test forces an int8 path (`_row_limit`)
        if rows > _MIN_ROW_LIMIT and rows > self._row_limit(interleaved, path, dtype,
                                                            one_row_per_sequence()):
            torch.ops.engine_kernels.ggml_matmul.default(out, x2, stored, self.type_id, bias,
                                                         PREFILL_TILE_BYTES, interleaved)
        else:
            torch.ops.engine_kernels.ggml_linear.default(out, x2, stored, self.type_id, bias,
                                                         path, interleaved)
        return out if x2 is x else out.reshape(*x.shape[:-1], weight.shape[0])

    def _fast_call(self, weight: QuantizedTensor, bias: torch.Tensor | None,
                   dtype: torch.dtype, max_rows: int
                   ) -> tuple[torch.Tensor, bool, int, int, int] | None:
        """The block-kernel call `fast_fn` binds: (storage, interleaved, kernel path,
        most rows, most rows in a step of decode rows), or None where it has no
        fast form."""
        if (dtype is not torch.bfloat16 and dtype is not torch.float32) or not kernel_paths() \
                or (bias is not None and bias.dtype != dtype):
            return None
        stored, interleaved = self._stored(weight)
        path = kernel_path(dtype, weight.quantized_activations)
        return (stored, interleaved, path, min(max_rows, self._row_limit(interleaved, path, dtype)),
                min(max_rows, self._row_limit(interleaved, path, dtype, decode_rows=True)))

    def fast_fn(self, weight: QuantizedTensor, bias: torch.Tensor | None, dtype: torch.dtype,
                  max_rows: int) -> Callable[[torch.Tensor], torch.Tensor | None] | None:
        """`linear`'s block-kernel call with the storage, the kernel path
        (``ENGINE_QUANT_KERNEL_PATH`` read once) and the row limit decided here."""
        call = self._fast_call(weight, bias, dtype, max_rows)
        if call is None:
            return None
        stored, interleaved, path, limit, decode_limit = call
        out_features, type_id = weight.shape[0], self.type_id
        ggml_linear = torch.ops.engine_kernels.ggml_linear.default

        def run(x: torch.Tensor) -> torch.Tensor | None:
            rows = x.shape[0]
            if rows > limit and (rows > decode_limit or not one_row_per_sequence()):
                return None
            out = x.new_empty((rows, out_features))
            ggml_linear(out, x, stored, type_id, bias, path, interleaved)
            return out

        return run

    def decode_kernel(self, weight: QuantizedTensor, bias: torch.Tensor | None,
                      dtype: torch.dtype, rows: int, max_rows: int
                      ) -> tuple[list[int], torch.Tensor, torch.Tensor | None] | None:
        """`fast_fn`'s kernel call for `rows` rows as ``engine_kernels::decode_layers``
        takes it: ``([LINEAR_GGML, out_features, type, path, interleaved], blocks,
        bias)``, or None where `fast_fn(..., max_rows)`'s form would not run it in
        the step running now."""
        call = self._fast_call(weight, bias, dtype, max_rows)
        if call is None or not 0 < rows <= call[4 if one_row_per_sequence() else 3]:
            return None
        stored, interleaved, path, _, _ = call
        return [LINEAR_GGML, weight.shape[0], self.type_id, path, int(interleaved)], stored, bias

    def embedding(self, weight: QuantizedTensor, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        flat = ids.reshape(-1).to(torch.long).contiguous()
        out = torch.empty((flat.shape[0], weight.shape[1]), dtype=dtype)
        stored, interleaved = self._stored(weight)
        torch.ops.engine_kernels.ggml_embedding(out, flat, stored, self.type_id, interleaved)
        return out.reshape(*ids.shape, weight.shape[1])


class Q8_0(GGMLBlockMethod):
    """Q8_0: 32 int8 values and a float16 scale per block (8.5 bits a value)."""
    gguf_type = "Q8_0"


class Q4_0(GGMLBlockMethod):
    """Q4_0: 32 4-bit values and a float16 scale per block (4.5 bits a value)."""
    gguf_type = "Q4_0"


class Q4_1(GGMLBlockMethod):
    """Q4_1: 32 4-bit values, a float16 scale and minimum per block (5 bits a value)."""
    gguf_type = "Q4_1"


class Q5_0(GGMLBlockMethod):
    """Q5_0: 32 5-bit values and a float16 scale per block (5.5 bits a value)."""
    gguf_type = "Q5_0"


class Q5_1(GGMLBlockMethod):
    """Q5_1: 32 5-bit values, a float16 scale and minimum per block (6 bits a value)."""
    gguf_type = "Q5_1"


class Q4_K(GGMLBlockMethod):
    """Q4_K: 256-value super-blocks of 4-bit values, 6-bit scales and minimums
    per 32 (4.5 bits a value)."""
    gguf_type = "Q4_K"

    def _quantize_numpy(self, values: np.ndarray) -> np.ndarray:
        from engine.quantization.kquants import quantize_q4_k

        return quantize_q4_k(values)


class Q5_K(GGMLBlockMethod):
    """Q5_K: as Q4_K with a fifth bit per value (5.5 bits a value)."""
    gguf_type = "Q5_K"

    def _quantize_numpy(self, values: np.ndarray) -> np.ndarray:
        from engine.quantization.kquants import quantize_q5_k

        return quantize_q5_k(values)


class Q6_K(GGMLBlockMethod):
    """Q6_K: 256-value super-blocks of 6-bit values, an 8-bit scale per 16
    (6.56 bits a value)."""
    gguf_type = "Q6_K"

    def _quantize_numpy(self, values: np.ndarray) -> np.ndarray:
        from engine.quantization.kquants import quantize_q6_k

        return quantize_q6_k(values)
