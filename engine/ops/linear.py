"""Linear layers split across tensor-parallel ranks (identity split at world size 1).

Column-parallel layers split the output features, row-parallel layers the input
features (then all-reduce). Every parameter carries a ``weight_loader(param,
loaded_tensor[, shard_id])`` that takes the full checkpoint tensor and copies this
rank's slice, so a model's `load_weights` never deals with ranks itself. A loader
raises ValueError when the checkpoint shape does not fit.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from engine.kernels import (
    LINEAR_AMX,
    LINEAR_AMX_SILU,
    LINEAR_AMX_SPLIT,
    LINEAR_BF16_GEMV,
    LINEAR_FP32_GEMV,
    LINEAR_ONEDNN,
    LINEAR_ONEDNN_SILU,
    amx_set_aside,
    portable_forced,
    usable_for,
)
from engine.ops.activation import SiluAndMul
from engine.ops.fast_path import forget_fast_paths
from engine.ops.weight_memory import empty_weight
from engine.quantization import QuantizedTensor, QuantizedWeight, add_rows
from engine.utils import pad_rows_to_bucket


def tp_world_size_and_rank() -> tuple[int, int]:
    """(world size, rank) of the tensor-parallel group; (1, 0) when not initialised."""
    from engine.distributed import parallel_state

    return (parallel_state.get_tensor_model_parallel_world_size(),
            parallel_state.get_tensor_model_parallel_rank())


def divide(numerator: int, denominator: int, what: str = "size") -> int:
    if numerator % denominator:
        raise ValueError(
            f"{what} {numerator} is not divisible by the tensor parallel size {denominator}"
        )
    return numerator // denominator


def load_rows(layer: nn.Module, param: torch.Tensor, offset: int, size: int,
              loaded: torch.Tensor | QuantizedTensor) -> None:
    """Fill rows ``offset .. offset + size`` of `layer`'s `param` from `loaded`: a
    float tensor is copied (`copy_checked`); a quantized one (a GGUF file's
    blocks) becomes those rows of the layer's quantized weight."""
    if isinstance(loaded, QuantizedTensor):
        add_rows(layer, param, offset, size, loaded)
    else:
        copy_checked(param.data.narrow(0, offset, size), loaded)


def copy_checked(param: torch.Tensor, loaded: torch.Tensor) -> None:
    """Copy `loaded` into `param` (casting dtype), or raise ValueError on a shape mismatch."""
    if tuple(param.shape) != tuple(loaded.shape):
        raise ValueError(
            f"shape mismatch: checkpoint tensor has shape {list(loaded.shape)}, "
            f"the model expects {list(param.shape)}"
        )
    param.data.copy_(loaded)


def onednn_packing_supported(weight: torch.Tensor) -> bool:
    """Whether `weight` is prepacked for oneDNN's matmul: a CPU bfloat16 tensor on
    a torch built with oneDNN (mkldnn) bf16 support and a CPU with bfloat16
    arithmetic (elsewhere its products are widened: `widen_bf16_products`), or a
    CPU float32 tensor while the compiled kernels are in use. float32 prompt
    chunks then run oneDNN on the packed weight (about twice torch's BLAS on
    prompt-sized products, and not bound to one vendor's library), which sums in
    another order than BLAS: with ``ENGINE_CPU_KERNELS=0`` (the reference path)
    float32 stays on F.linear."""
    if weight.device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    if weight.dtype == torch.bfloat16:
        return torch.ops.mkldnn._is_mkldnn_bf16_supported() and not widen_bf16_products()
    return weight.dtype == torch.float32 and usable_for(weight)


# On such a CPU the bf16 GEMV kernel (its portable code: bf16 widened in registers)
# runs products of up to this many rows, its own limit: it took half the time of
# `widened_linear` at 5-8 rows, and oneDNN's emulated bf16 took 0.8-1.0x widened's
# (benchmarks/profile_no_amx.py --widened)
WIDENED_GEMV_MAX_ROWS = 8


# widen_bf16_products' answer by ENGINE_CPU_NATIVE_BF16's value: a plain dict, which
# torch.compile traces as a constant (it warns on a functools cache in a traced call)
_WIDEN_BY_OVERRIDE: dict[str | None, bool] = {}


def _widen_cached(native_override: str | None) -> bool:
    found = _WIDEN_BY_OVERRIDE.get(native_override)
    if found is None:
        from engine.platforms.cpu import cpu_has_native_bf16

        found = _WIDEN_BY_OVERRIDE[native_override] = not cpu_has_native_bf16()
    return found


def widen_bf16_products() -> bool:
    """Whether bfloat16 products of more than a few rows are computed in float32
    (`widened_linear`): on a CPU without bfloat16 arithmetic (neither AMX nor
    AVX512-BF16, e.g. Intel before Cooper Lake, AMD before Zen 4;
    ``ENGINE_CPU_NATIVE_BF16=0`` says so on any CPU). oneDNN emulates bf16 there:
    its products took 3.7-4.5x the time of widening the weight to float32 and
    multiplying in float32 at 64 rows and more (docs/prefill.md, "bfloat16 on a CPU
    without bfloat16 arithmetic"), and the oneDNN copy of the weight is not kept."""
    return _widen_cached(os.environ.get("ENGINE_CPU_NATIVE_BF16"))


# `widened_linear` converts this many bytes of float32 weight at a time: a large
# weight (an LM head: 113 MB in float32 for a 49k vocabulary) converted whole was
# a fresh memory map per call, 28,000 page faults, 2-3.6x the time of the tiles
# (which the heap keeps between calls)
WIDEN_TILE_BYTES = 8 << 20


def widened_linear(x: torch.Tensor, weight: torch.Tensor,
                   bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x W^T + b`` for bfloat16 `x` [rows, in] and `weight` computed in float32 (each
    product of two bfloat16 values is exact there, the sums are float32's, as any
    bf16 matmul accumulates) and rounded once to bfloat16; the weight is widened
    WIDEN_TILE_BYTES of output rows at a time."""
    n, k = weight.shape
    step = max(16, WIDEN_TILE_BYTES // (4 * k) // 16 * 16)
    xf = x.float()
    if n <= step:
        out = F.linear(xf, weight.float(), None if bias is None else bias.float())
        return out.to(x.dtype)
    out = x.new_empty((*x.shape[:-1], n))
    for start in range(0, n, step):
        part = slice(start, start + step)
        out[..., part] = F.linear(xf, weight[part].float(),
                                  None if bias is None else bias[part].float())
    return out


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """`weight` [out, in] reordered once into oneDNN's blocked layout: eager
    ``F.linear`` in bf16 repacks the weight on every call, which made a one-row
    bf16 matmul slower than float32 (docs/benchmarks.md, "Against vLLM's CPU build")."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)


# Few-row bf16 products (decode steps) read each weight once and do little else,
# so they go to the engine's compiled kernels (engine.kernels), which stream the
# weight faster than oneDNN's general kernel (docs/benchmarks.md, "Against vLLM's
# CPU build"): up to GEMV_MAX_ROWS rows the GEMV kernel on the plain weight, up to
# AMX_MAX_ROWS the AMX kernel on a copy packed in tile order; more rows (prompt
# chunks) stay on oneDNN, whose blocking suits compute-bound sizes.
GEMV_MAX_ROWS = 4
GEMV_FIRST_ROWS = 2  # with an AMX copy, the GEMV kernel still wins up to here
AMX_MAX_ROWS = 32


def pack_weight_for_amx(weight: torch.Tensor) -> torch.Tensor | None:
    """`weight` [out, in] repacked for the AMX kernel, or None where it does not
    apply (not bf16 or float32, kernels not loaded, no AMX or ENGINE_KERNEL_PATH
    setting it aside, out not a multiple of 16 or in not a multiple of 32). A
    float32 weight is packed split (`split_weight`), for `amx_split_linear`."""
    if (weight.dtype not in (torch.bfloat16, torch.float32) or weight.dim() != 2
            or weight.shape[0] % 16 or weight.shape[1] % 32 or not usable_for(weight)
            or amx_set_aside() or not torch.ops.engine_kernels.amx_supported()):
        return None
    if weight.dtype == torch.float32:
        weight = split_weight(weight)
    return torch.ops.engine_kernels.amx_pack_weight(weight.detach())


def split_weight(weight: torch.Tensor) -> torch.Tensor:
    """float32 `weight` [out, in] as bfloat16 [out, 2 in]: [hi | lo], hi the
    weight rounded to bfloat16 and lo what is left, rounded (together 16 of
    float32's 24 significant bits, within 2^-16 of the weight)."""
    weight = weight.detach()
    hi = weight.bfloat16()
    return torch.cat([hi, (weight - hi.float()).bfloat16()], dim=1)


# float32 products of up to this many rows (decode steps) go to the compiled
# float32 GEMV kernel, which streams the weight as stored; more rows (prompt
# chunks) go to oneDNN on the packed weight (onednn_packing_supported), or on a
# CPU with AMX to the split kernel (amx_split_linear).
FP32_GEMV_MAX_ROWS = 32
# where the GEMV's native code is its AVX2 path (no AVX-512: 8-lane registers, three
# input rows a pass), oneDNN on the packed weight overtakes it past about this many
# rows (docs/fp32-decode.md, "Where oneDNN takes over on AVX2"): larger decode
# steps go there
FP32_GEMV_MAX_ROWS_AVX2 = 16
# fp32_gemv_max_rows' answer once asked: a plain list, which torch.compile reads as
# a constant (`pack_linear_weights` asks before any model runs)
_fp32_gemv_rows: list[int] = []


def fp32_gemv_max_rows() -> int:
    """The most rows the compiled float32 GEMV takes on this CPU: FP32_GEMV_MAX_ROWS,
    or FP32_GEMV_MAX_ROWS_AVX2 where its native code is the AVX2 path. Asked only
    once the kernels are loaded (`usable_for` said yes)."""
    if not _fp32_gemv_rows:
        if torch.compiler.is_compiling():  # not asked in eager mode first: never here
            return FP32_GEMV_MAX_ROWS
        avx2 = torch.ops.engine_kernels.fp32_gemv_path() == "avx2"
        _fp32_gemv_rows.append(FP32_GEMV_MAX_ROWS_AVX2 if avx2 else FP32_GEMV_MAX_ROWS)
    return _fp32_gemv_rows[0]


# with the split AMX copy, the GEMV kernel still wins up to here; from 9 to
# FP32_GEMV_MAX_ROWS rows the split kernel takes 0.5-0.7x its time (both read
# 4 bytes a weight, the GEMV's FMAs bind past a few rows: docs/prefill.md)
FP32_GEMV_FIRST_ROWS = 8


def plain_linear(x: torch.Tensor, weight: torch.Tensor,
                 bias: torch.Tensor | None = None, portable: bool | None = None) -> torch.Tensor:
    """``x W^T + b`` on an unpacked weight: F.linear, except that float32
    decode-sized products (up to `fp32_gemv_max_rows` rows) run the compiled
    float32 GEMV kernel when it is loaded, and that bfloat16 products on a CPU
    without bfloat16 arithmetic (`widen_bf16_products`) run the bf16 GEMV kernel
    up to WIDENED_GEMV_MAX_ROWS rows and `widened_linear` past them. The kernels sum in
    another order than BLAS (float32 reassociation); ``ENGINE_CPU_KERNELS=0`` keeps
    F.linear for float32. `portable` (default: `portable_forced`) selects the
    kernels' portable code."""
    if (x.dtype == torch.float32 and x.dim() == 2 and 0 < x.shape[0] <= FP32_GEMV_MAX_ROWS
            and weight.dim() == 2):
        operands = (x, weight) if bias is None else (x, weight, bias)
        if (usable_for(*operands) and x.is_contiguous() and weight.is_contiguous()
                and x.shape[0] <= fp32_gemv_max_rows()):
            out = x.new_empty((x.shape[0], weight.shape[0]))
            torch.ops.engine_kernels.fp32_gemv(
                out, x, weight, bias, portable_forced() if portable is None else portable)
            return out
    if (x.dtype == torch.bfloat16 and weight.dtype == torch.bfloat16 and x.dim() == 2
            and weight.dim() == 2 and x.is_cpu and widen_bf16_products()):
        rows = x.shape[0]
        operands = (x, weight) if bias is None else (x, weight, bias)
        if (0 < rows <= WIDENED_GEMV_MAX_ROWS and usable_for(*operands) and x.is_contiguous()
                and weight.is_contiguous()):
            out = x.new_empty((rows, weight.shape[0]))
            torch.ops.engine_kernels.bf16_gemv(
                out, x, weight, bias, portable_forced() if portable is None else portable)
            return out
        if rows > GEMV_MAX_ROWS:
            return widened_linear(x, weight, bias)
    return F.linear(x, weight, bias)


def packed_linear(x: torch.Tensor, packed: torch.Tensor | None, bias: torch.Tensor | None,
                  weight: torch.Tensor | None = None,
                  amx_packed: torch.Tensor | None = None) -> torch.Tensor:
    """``x W^T + b`` with W prepacked by `pack_weight`; same result as F.linear up
    to float32 summation order. Given the plain `weight` (and its `amx_packed`
    copy), few-row calls run the compiled kernels instead (see GEMV_MAX_ROWS,
    FP32_GEMV_MAX_ROWS), and so do prompt chunks on AMX (AMX_PROMPT_MAX_ROWS; in
    float32, `amx_split_linear`). A float32 weight packed only for AMX (`packed`
    None, see `pack_linear_weights`) falls back to `plain_linear`."""
    out = few_rows_linear(x, bias, weight, amx_packed)
    if out is None:
        out = amx_prompt_linear(x, bias, amx_packed)
    if out is not None:
        return out
    if packed is None:
        assert weight is not None, "packed_linear: no packed weight and no plain one"
        return plain_linear(x, weight, bias)
    return onednn_linear(x, packed, bias)


# bf16 prompt chunks of more than AMX_MAX_ROWS and up to this many rows run the AMX
# kernel on the tile-ordered copy too: it reads each weight from memory once per
# call, prefetching ahead, and splits the outputs between threads, where oneDNN's
# kernel waits on weights the layer before evicted and its down projection does not
# gain from a second thread (docs/prefill.md, "Time to first token, end to end").
# The kernel reads x from L2 once per pair of output blocks, so x must fit there
# beside the weight panel: at most AMX_PROMPT_MAX_X_BYTES of it (past that, e.g.
# 512 x 1,536, oneDNN's blocking wins). Larger steps stay on oneDNN. 0: never.
AMX_PROMPT_MAX_ROWS = 512
AMX_PROMPT_MAX_X_BYTES = 768 << 10


def _amx_prompt_rows(x: torch.Tensor, amx_packed: torch.Tensor | None) -> bool:
    return (x.dim() == 2 and x.is_contiguous()
            and amx_prompt_shape(x.shape[0], x.shape[1], x.dtype, amx_packed, portable_forced()))


def amx_prompt_shape(rows: int, features: int, dtype: torch.dtype,
                     amx_packed: torch.Tensor | None, portable: bool) -> bool:
    """Whether contiguous [rows, features] activations of `dtype` take the AMX
    kernel past the few-row sizes (`amx_prompt_linear`, `amx_prompt_silu_and_mul`)."""
    return (amx_packed is not None and dtype == torch.bfloat16
            and AMX_MAX_ROWS < rows <= AMX_PROMPT_MAX_ROWS
            and rows * features * 2 <= AMX_PROMPT_MAX_X_BYTES and not portable)


# float32 products of more than FP32_GEMV_MAX_ROWS rows (prompt chunks), on a CPU
# with AMX, run as three bfloat16 tile products on the weight's split copy
# (`amx_split_linear`, about half of oneDNN's float32 time, within ~1e-5 of it;
# docs/prefill.md, "float32 prompts on AMX"), every row count: the kernel reads
# x's two bfloat16 parts (as many bytes as x) from L2, so it takes x
# AMX_PROMPT_MAX_X_BYTES at a time.
def _amx_split_rows(x: torch.Tensor, amx_packed: torch.Tensor | None) -> bool:
    return (amx_packed is not None and x.dim() == 2 and x.dtype == torch.float32
            and x.shape[0] > FP32_GEMV_MAX_ROWS and x.is_contiguous()
            and not portable_forced())


def _split_product(op, x: torch.Tensor, bias: torch.Tensor | None, amx_packed: torch.Tensor,
                   out_features: int) -> torch.Tensor:
    out = x.new_empty((x.shape[0], out_features))
    step = max(AMX_MAX_ROWS, AMX_PROMPT_MAX_X_BYTES // (x.shape[1] * 4) // AMX_MAX_ROWS
               * AMX_MAX_ROWS)
    for start in range(0, x.shape[0], step):
        op(out[start:start + step], x[start:start + step], amx_packed, bias)
    return out


def amx_prompt_linear(x: torch.Tensor, bias: torch.Tensor | None,
                      amx_packed: torch.Tensor | None) -> torch.Tensor | None:
    """``x W^T + b`` by the AMX kernel for a prompt-sized bf16 or float32 `x`; None
    when the product belongs to oneDNN."""
    if _amx_split_rows(x, amx_packed):
        return _split_product(torch.ops.engine_kernels.amx_split_linear, x, bias, amx_packed,
                              amx_packed.shape[0] * 16)
    if not _amx_prompt_rows(x, amx_packed):
        return None
    out = x.new_empty((x.shape[0], amx_packed.shape[0] * 16))
    torch.ops.engine_kernels.amx_linear(out, x, amx_packed, bias)
    return out


def amx_prompt_silu_and_mul(x: torch.Tensor, bias: torch.Tensor | None,
                            amx_packed: torch.Tensor | None) -> torch.Tensor | None:
    """``silu_and_mul(x [G; U]^T + b)`` by the AMX kernel for a prompt-sized bf16
    or float32 `x` (the projection and the activation in one pass, rounded as
    the two ops round); None when it belongs to oneDNN."""
    if _amx_split_rows(x, amx_packed):
        return _split_product(torch.ops.engine_kernels.amx_split_silu_and_mul, x, bias,
                              amx_packed, amx_packed.shape[0] * 8)
    if not _amx_prompt_rows(x, amx_packed):
        return None
    out = x.new_empty((x.shape[0], amx_packed.shape[0] * 8))
    torch.ops.engine_kernels.amx_silu_and_mul(out, x, amx_packed, bias)
    return out


def few_rows_kernel(rows: int, dtype: torch.dtype, bias: torch.Tensor | None,
                    weight: torch.Tensor | None, amx_packed: torch.Tensor | None,
                    portable: bool) -> int:
    """Which compiled kernel `few_rows_linear` runs for `rows` contiguous CPU rows
    of `dtype` (an ``engine.kernels.LINEAR_*`` code), or 0 where the product is not one of
    theirs (oneDNN's, or F.linear's for a float32 weight the GEMV cannot take)."""
    if weight is None or not 0 < rows <= max(FP32_GEMV_MAX_ROWS, AMX_MAX_ROWS):
        return 0
    operands = (weight,) if bias is None else (weight, bias)
    if weight.dtype is not dtype or not usable_for(*operands):
        return 0
    if dtype == torch.float32 and rows <= FP32_GEMV_MAX_ROWS:
        if amx_packed is not None and rows > FP32_GEMV_FIRST_ROWS and not portable:
            return LINEAR_AMX_SPLIT
        return (LINEAR_FP32_GEMV if weight.dim() == 2 and weight.is_contiguous()
                and rows <= fp32_gemv_max_rows() else 0)
    if dtype == torch.bfloat16 and rows <= AMX_MAX_ROWS:
        amx = amx_packed is not None and not portable
        if rows <= (GEMV_FIRST_ROWS if amx else GEMV_MAX_ROWS) and weight.is_contiguous():
            return LINEAR_BF16_GEMV
        if amx:
            return LINEAR_AMX
    return 0


def few_rows_linear(x: torch.Tensor, bias: torch.Tensor | None, weight: torch.Tensor | None,
                    amx_packed: torch.Tensor | None = None,
                    portable: bool | None = None) -> torch.Tensor | None:
    """``x W^T + b`` by the compiled kernels when `x` has few rows (a decode step)
    and they apply; None when the product belongs to oneDNN (`onednn_linear`).
    `portable` (default: `portable_forced`) selects the kernels' portable code."""
    rows = x.shape[0] if x.dim() == 2 else 0
    if weight is None or not 0 < rows <= max(FP32_GEMV_MAX_ROWS, AMX_MAX_ROWS):
        return None
    if portable is None:
        portable = portable_forced()
    kernel = (few_rows_kernel(rows, x.dtype, bias, weight, amx_packed, portable)
              if x.is_contiguous() and x.is_cpu else 0)
    if kernel == LINEAR_AMX_SPLIT:
        out = x.new_empty((rows, amx_packed.shape[0] * 16))
        torch.ops.engine_kernels.amx_split_linear(out, x, amx_packed, bias)
        return out
    if kernel in (LINEAR_BF16_GEMV, LINEAR_AMX):
        out = x.new_empty((rows, weight.shape[0]))
        if kernel == LINEAR_BF16_GEMV:
            torch.ops.engine_kernels.bf16_gemv(out, x, weight, bias, portable)
        else:
            torch.ops.engine_kernels.amx_linear(out, x, amx_packed, bias)
        return out
    if x.dtype == torch.float32 and rows <= FP32_GEMV_MAX_ROWS:
        if usable_for(x) and rows > fp32_gemv_max_rows():
            return None  # oneDNN's on the packed weight (or the caller's F.linear)
        return plain_linear(x, weight, bias, portable)  # its GEMV, or F.linear
    return None


def onednn_linear(x: torch.Tensor, packed: torch.Tensor,
                  bias: torch.Tensor | None) -> torch.Tensor:
    """``x W^T + b`` by oneDNN on the weight packed by `pack_weight`."""
    if torch.compiler.is_compiling():
        return torch.ops.engine_graph.onednn_linear(x, packed, bias)
    return _onednn_linear(x, packed, bias)


def _onednn_linear(x: torch.Tensor, packed: torch.Tensor,
                   bias: torch.Tensor | None) -> torch.Tensor:
    if x.dim() != 2:
        return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
    rows = x.shape[0]
    return torch.ops.mkldnn._linear_pointwise(pad_rows_to_bucket(x, AMX_MAX_ROWS), packed, bias, "none", [],
                                              "")[:rows]


def onednn_silu_and_mul(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor,
                        gate_bias: torch.Tensor | None = None,
                        up_bias: torch.Tensor | None = None) -> torch.Tensor:
    """``silu(x G^T + g) * (x U^T + u)`` for `x` [rows, in] with G and U packed by
    `pack_weight`: two oneDNN matmuls, the first applying SiLU to its output as
    it stores it, the second multiplying its output by the first's. No
    [rows, 2 * d] intermediate is written and read back, and no third pass over
    memory runs for the activation (what a fused gate_up projection followed by
    `SiluAndMul` costs). The gate is rounded once, after SiLU, where the unfused
    path rounds before and after it: bfloat16 results differ in the last bit."""
    if torch.compiler.is_compiling():
        return torch.ops.engine_graph.onednn_silu_and_mul(x, gate, up, gate_bias, up_bias)
    return _onednn_silu_and_mul(x, gate, up, gate_bias, up_bias)


def _onednn_silu_and_mul(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor,
                         gate_bias: torch.Tensor | None,
                         up_bias: torch.Tensor | None) -> torch.Tensor:
    rows = x.shape[0]
    x = pad_rows_to_bucket(x, AMX_MAX_ROWS)
    gated = torch.ops.mkldnn._linear_pointwise(x, gate, gate_bias, "swish", [], "")
    return torch.ops.mkldnn._linear_pointwise.binary(x, gated, up, up_bias, "mul")[:rows]


# Under torch.compile the oneDNN calls on packed weights are opaque ops of their
# own: inductor lowers `mkldnn._linear_pointwise` itself only for a weight that is
# a graph constant, which the packed copy kept on the module is not.
@torch.library.custom_op("engine_graph::onednn_linear", mutates_args=())
def _onednn_linear_op(x: torch.Tensor, packed: torch.Tensor,
                      bias: torch.Tensor | None) -> torch.Tensor:
    return _onednn_linear(x, packed, bias)


@_onednn_linear_op.register_fake
def _(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], packed.shape[0]))


@torch.library.custom_op("engine_graph::onednn_silu_and_mul", mutates_args=())
def _onednn_silu_and_mul_op(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor,
                            gate_bias: torch.Tensor | None,
                            up_bias: torch.Tensor | None) -> torch.Tensor:
    return _onednn_silu_and_mul(x, gate, up, gate_bias, up_bias)


@_onednn_silu_and_mul_op.register_fake
def _(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, gate_bias: torch.Tensor | None,
      up_bias: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty((x.shape[0], gate.shape[0]))


def pack_linear_weights(model: nn.Module) -> int:
    """Prepack, for oneDNN, the weight of every linear layer and LM head of `model`
    that `onednn_packing_supported` accepts (the float weights stay, for anything
    that reads them), and for the AMX kernels where they apply
    (`pack_weight_for_amx`: a float32 weight gets that copy instead of oneDNN's).
    Called once after the weights are loaded, on the CPU.
    A `MergedColumnParallelLinear` made with ``gated_activation=True`` gets its
    gate and up halves packed apart (`MergedColumnParallelLinear.silu_and_mul`).
    Returns the number of layers packed."""
    packed = 0
    if usable_for(torch.empty(0)):
        fp32_gemv_max_rows()  # asked once here, outside any torch.compile trace
    for module in model.modules():
        if getattr(module, "quant_weight", None) is not None:
            continue  # its quantization method's kernels run it
        if hasattr(module, "packed_weight") and onednn_packing_supported(module.weight):
            module.amx_weight = pack_weight_for_amx(module.weight)
            if module.amx_weight is not None and module.weight.dtype == torch.float32:
                pass  # prompt chunks run `amx_split_linear` on it: no oneDNN copy
            elif getattr(module, "gated_activation", False):
                # instead of the whole weight, not as well: that would be a third copy
                gate, up = module.weight.detach().chunk(2)
                module.packed_gate, module.packed_up = pack_weight(gate), pack_weight(up)
            else:
                module.packed_weight = pack_weight(module.weight)
            packed += 1
    forget_fast_paths(model)  # their fast forms hold the weights as they were
    return packed


def _fast_operands(layer: ColumnParallelLinear | RowParallelLinear, dtype: torch.dtype
                   ) -> tuple[torch.Tensor, torch.Tensor | None] | QuantizedWeight | None:
    """What `layer`'s fast form multiplies by: (weight, AMX copy) for a float
    weight, its `QuantizedWeight`, or None where it has no fast form."""
    if (type(layer) not in _FAST_LINEAR_CLASSES or layer.lora is not None
            or layer.tp_size != 1):
        return None
    if layer.quant_weight is not None:
        return layer.quant_weight
    weight = layer.weight
    packed = layer.packed_weight is not None or getattr(layer, "packed_gate", None) is not None
    # forward takes `few_rows_linear` on a packed weight, `plain_linear` on a
    # float32 one (the same GEMV kernel) and on a bfloat16 one whose products are
    # widened (the bf16 GEMV: the fast form takes up to GEMV_MAX_ROWS rows, forward
    # the rest); any other bfloat16 weight oneDNN could not pack stays on F.linear
    widened = dtype is torch.bfloat16 and widen_bf16_products()
    if not (packed or dtype is torch.float32 or widened) or weight.dtype != dtype:
        return None
    return weight, layer.amx_weight


def fast_linear_fn(layer: ColumnParallelLinear | RowParallelLinear,
                   dtype: torch.dtype) -> Callable[[torch.Tensor], torch.Tensor | None] | None:
    """`layer`'s product for a model's fast path (engine.ops.fast_path): ``run(x)`` on
    contiguous [T, in] rows of `dtype` returns what the layer's forward would, or
    None for a row count its kernel does not take (the caller then runs the
    layer). None when the layer has no fast form: a subclass of its own, LoRA,
    tensor parallelism, a quantization method without one, or a weight that
    forward multiplies with F.linear."""
    operands = _fast_operands(layer, dtype)
    bias = layer.bias
    if operands is None or isinstance(operands, QuantizedWeight):
        return None if operands is None else operands.fast_fn(bias, dtype)
    weight, amx = operands
    portable = portable_forced()

    def run(x: torch.Tensor) -> torch.Tensor | None:
        return few_rows_linear(x, bias, weight, amx, portable)

    return run


def fast_linear_kernel(layer: ColumnParallelLinear | RowParallelLinear, dtype: torch.dtype,
                       rows: int, gated: bool = False
                       ) -> tuple[list[int], list[torch.Tensor | None]] | None:
    """The kernel call `layer` makes for `rows` contiguous rows of `dtype` on a
    model's fast path, for ``engine_kernels::decode_layers``: ``([kernel,
    out_features, a, b, c], [operand, bias])`` (an ``engine.kernels.LINEAR_*`` code,
    then the kernel's integers: see decode_layers.cpp; a quantized weight of several
    block types: LINEAR_GGML_PARTS, then 5 integers and 2 tensors a part), or None
    where it runs none of those kernels. That call is `fast_linear_fn`'s, or past its
    rows, the one the layer's forward makes: the AMX kernel's, or without it oneDNN's
    on the packed weight (`gated`: a gate_up projection's `silu_and_mul`, the
    activation inside: LINEAR_AMX_SILU, LINEAR_ONEDNN_SILU)."""
    operands = _fast_operands(layer, dtype)
    bias = layer.bias
    if operands is None or isinstance(operands, QuantizedWeight):
        return None if operands is None else operands.fast_kernel(bias, dtype, rows)
    weight, amx = operands
    portable = portable_forced()
    kernel = few_rows_kernel(rows, dtype, bias, weight, amx, portable)
    if kernel:
        operand = amx if kernel in (LINEAR_AMX, LINEAR_AMX_SPLIT) else weight
        return [kernel, weight.shape[0], int(portable), 0, 0], [operand, bias]
    if gated and not isinstance(layer, MergedColumnParallelLinear):
        return None
    if amx is not None and amx_prompt_shape(rows, weight.shape[1], dtype, amx, portable):
        if gated:
            return [LINEAR_AMX_SILU, amx.shape[0] * 8, 0, 0, 0], [amx, bias]
        return [LINEAR_AMX, amx.shape[0] * 16, 0, 0, 0], [amx, bias]
    if dtype not in (torch.bfloat16, torch.float32) or not 0 < rows <= AMX_MAX_ROWS:
        return None
    # no compiled kernel takes these rows (bfloat16 without AMX; float32 past
    # `fp32_gemv_max_rows`): the layer's forward runs oneDNN on its packed weight,
    # rows as they are (pad_rows_to_bucket pads past AMX_MAX_ROWS)
    if gated:
        halves = layer._packed_halves() if isinstance(layer, MergedColumnParallelLinear) else None
        if halves is None or bias is not None:
            return None
        return [LINEAR_ONEDNN_SILU, weight.shape[0] // 2, 0, 0, 0], [halves[0], halves[1]]
    if layer.packed_weight is None:
        return None
    return [LINEAR_ONEDNN, weight.shape[0], 0, 0, 0], [layer.packed_weight, bias]


def _new_param(*shape: int, loader) -> nn.Parameter:
    # uninitialised: the checkpoint overwrites it, so random init would be wasted
    # time; large ones in huge pages (engine.ops.weight_memory)
    param = nn.Parameter(empty_weight(*shape), requires_grad=False)
    param.weight_loader = loader
    return param


def _expect_dim(loaded: torch.Tensor, dim: int, size: int) -> None:
    if loaded.dim() <= dim or loaded.shape[dim] != size:
        raise ValueError(
            f"shape mismatch: checkpoint tensor has shape {list(loaded.shape)}, "
            f"the model expects size {size} in dimension {dim}"
        )


class ColumnParallelLinear(nn.Module):
    """``y = x W^T + b`` with W's rows (output features) split across ranks.
    Output: [*, output_size / tp], or the full [*, output_size] with `gather_output`."""

    def __init__(self, input_size: int, output_size: int, bias: bool = True,
                 gather_output: bool = False, prefix: str = "") -> None:
        super().__init__()
        self.tp_size, self.tp_rank = tp_world_size_and_rank()
        self.input_size = input_size
        self.output_size = output_size
        self.output_size_per_partition = divide(output_size, self.tp_size, "output size")
        self.gather_output = gather_output
        self.prefix = prefix
        self.weight = _new_param(self.output_size_per_partition, input_size,
                                 loader=self.weight_loader)
        self.bias = _new_param(self.output_size_per_partition, loader=self.weight_loader) \
            if bias else None
        self.packed_weight: torch.Tensor | None = None  # see pack_linear_weights
        self.amx_weight: torch.Tensor | None = None
        # LoRA: ``lora(x, out) -> out`` adds the step's adapter deltas (engine.lora)
        self.lora: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
        self.quant_weight: QuantizedWeight | None = None  # see engine.quantization

    def weight_loader(self, param: torch.Tensor, loaded: torch.Tensor) -> None:
        size = param.shape[0]
        _expect_dim(loaded, 0, size * self.tp_size)
        load_rows(self, param, 0, size, loaded.narrow(0, self.tp_rank * size, size))

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        if self.quant_weight is not None:
            return self.quant_weight.linear(x, self.bias)
        if self.packed_weight is not None or self.amx_weight is not None:
            return packed_linear(x, self.packed_weight, self.bias, self.weight, self.amx_weight)
        return plain_linear(x, self.weight, self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self._matmul(x)
        if self.lora is not None:
            out = self.lora(x, out)
        if self.gather_output and self.tp_size > 1:
            from engine.distributed.parallel_state import tensor_model_parallel_all_gather

            out = tensor_model_parallel_all_gather(out, dim=-1)
        return out

    def extra_repr(self) -> str:
        return (f"in={self.input_size}, out={self.output_size_per_partition} "
                f"(of {self.output_size}), bias={self.bias is not None}")


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel projections of the same input fused into one matmul
    (e.g. gate and up). Loaded per part: ``weight_loader(param, tensor, shard_id)``
    with `shard_id` the index into `output_sizes`; without a shard id the tensor is
    the already-fused weight.

    ``gated_activation=True`` (two equal parts, gate then up, feeding `SiluAndMul`):
    `pack_linear_weights` packs the halves apart, and `silu_and_mul` computes the
    activation of prompt-sized inputs inside the two matmuls."""

    def __init__(self, input_size: int, output_sizes: Sequence[int], bias: bool = True,
                 gather_output: bool = False, prefix: str = "",
                 gated_activation: bool = False) -> None:
        self.output_sizes = list(output_sizes)
        if gated_activation and (len(self.output_sizes) != 2
                                 or self.output_sizes[0] != self.output_sizes[1]):
            raise ValueError(f"{prefix or 'MergedColumnParallelLinear'}: gated_activation "
                             f"needs two equal output sizes, got {self.output_sizes}")
        super().__init__(input_size, sum(output_sizes), bias, gather_output, prefix)
        self.gated_activation = gated_activation
        # the gate and up halves packed for oneDNN, in place of `packed_weight`
        # (pack_linear_weights); plain attributes, so that sleep mode drops them
        self.packed_gate: torch.Tensor | None = None
        self.packed_up: torch.Tensor | None = None

    def _packed_halves(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        if self.packed_gate is None or self.packed_up is None or self.quant_weight is not None:
            return None
        return self.packed_gate, self.packed_up

    def _shard_range(self, shard_id: int) -> tuple[int, int]:
        sizes = [divide(s, self.tp_size, "output size") for s in self.output_sizes]
        return sum(sizes[:shard_id]), sizes[shard_id]

    def weight_loader(self, param: torch.Tensor, loaded: torch.Tensor,
                      shard_id: int | None = None) -> None:
        if shard_id is None:
            for i, part in enumerate(loaded.split(self.output_sizes, dim=0)):
                self.weight_loader(param, part, i)
            return
        offset, size = self._shard_range(shard_id)
        _expect_dim(loaded, 0, size * self.tp_size)
        load_rows(self, param, offset, size, loaded.narrow(0, self.tp_rank * size, size))

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        halves = self._packed_halves()
        if halves is None:
            return super()._matmul(x)
        out = few_rows_linear(x, self.bias, self.weight, self.amx_weight)
        if out is None:
            out = amx_prompt_linear(x, self.bias, self.amx_weight)
        if out is not None:
            return out
        biases = (None, None) if self.bias is None else self.bias.chunk(2)
        return torch.cat([onednn_linear(x, w, b) for w, b in zip(halves, biases, strict=True)],
                         dim=-1)

    def silu_and_mul(self, x: torch.Tensor,
                     activation: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """``activation(self(x))``, for `activation` a SiLU-and-mul op. Where that
        op runs `SiluAndMul.forward_cpu`, the halves are packed apart and `x`
        [rows, in] has too many rows for the compiled few-row kernels (a prompt
        chunk), `onednn_silu_and_mul` computes it inside the matmuls. Otherwise
        (LoRA, quantized weights, gathering across ranks, a replaced or disabled
        op) the projection runs, then `activation`."""
        halves = self._packed_halves()
        amx = self.amx_weight if self.quant_weight is None else None
        if ((halves is None and amx is None) or not (isinstance(activation, SiluAndMul)
                                                     and activation.uses_cpu_forward())
                or self.lora is not None or x.dim() != 2
                or (self.gather_output and self.tp_size > 1)):
            return activation(self(x))
        out = few_rows_linear(x, self.bias, self.weight, self.amx_weight)
        if out is not None:
            return activation(out)
        out = amx_prompt_silu_and_mul(x, self.bias, self.amx_weight)
        if out is not None:
            return out
        if halves is None:  # a float32 weight packed for AMX alone, the kernels aside
            return activation(self(x))
        biases = (None, None) if self.bias is None else self.bias.chunk(2)
        return onednn_silu_and_mul(x, *halves, *biases)


class QKVParallelLinear(ColumnParallelLinear):
    """The query, key and value projections fused: output [*, (H + 2 Hkv) * D] per
    rank. Key/value heads are replicated when there are fewer of them than ranks.
    Loaded per part with ``shard_id`` "q", "k" or "v"."""

    def __init__(self, hidden_size: int, head_size: int, total_num_heads: int,
                 total_num_kv_heads: int | None = None, bias: bool = True,
                 prefix: str = "") -> None:
        tp_size, _ = tp_world_size_and_rank()
        total_num_kv_heads = total_num_kv_heads or total_num_heads
        self.head_size = head_size
        self.total_num_heads = total_num_heads
        self.total_num_kv_heads = total_num_kv_heads
        self.num_heads = divide(total_num_heads, tp_size, "number of attention heads")
        if tp_size >= total_num_kv_heads:
            self.num_kv_heads = 1
            self.kv_replicas = divide(tp_size, total_num_kv_heads, "number of KV heads")
        else:
            self.num_kv_heads = divide(total_num_kv_heads, tp_size, "number of KV heads")
            self.kv_replicas = 1
        output_size = (self.num_heads + 2 * self.num_kv_heads) * tp_size * head_size
        super().__init__(hidden_size, output_size, bias, False, prefix)

    def _shard_range(self, shard_id: str) -> tuple[int, int, int]:
        """(offset in this rank's output, size, rank of the checkpoint slice)."""
        q = self.num_heads * self.head_size
        kv = self.num_kv_heads * self.head_size
        if shard_id == "q":
            return 0, q, self.tp_rank
        kv_rank = self.tp_rank // self.kv_replicas
        if shard_id == "k":
            return q, kv, kv_rank
        if shard_id == "v":
            return q + kv, kv, kv_rank
        raise ValueError(f"QKV shard id must be 'q', 'k' or 'v', not {shard_id!r}")

    def weight_loader(self, param: torch.Tensor, loaded: torch.Tensor,
                      shard_id: str | None = None) -> None:
        if shard_id is None:
            sizes = [self.total_num_heads * self.head_size,
                     self.total_num_kv_heads * self.head_size,
                     self.total_num_kv_heads * self.head_size]
            _expect_dim(loaded, 0, sum(sizes))
            for sid, part in zip("qkv", loaded.split(sizes, dim=0), strict=True):
                self.weight_loader(param, part, sid)
            return
        offset, size, src_rank = self._shard_range(shard_id)
        total = self.total_num_heads if shard_id == "q" else self.total_num_kv_heads
        _expect_dim(loaded, 0, total * self.head_size)
        load_rows(self, param, offset, size, loaded.narrow(0, src_rank * size, size))


class RowParallelLinear(nn.Module):
    """``y = x W^T + b`` with W's columns (input features) split across ranks; the
    partial products are all-reduced and the bias added once, after the reduction.
    Input: [*, input_size / tp] (this rank's slice)."""

    def __init__(self, input_size: int, output_size: int, bias: bool = True,
                 reduce_results: bool = True, prefix: str = "") -> None:
        super().__init__()
        self.tp_size, self.tp_rank = tp_world_size_and_rank()
        self.input_size = input_size
        self.output_size = output_size
        self.input_size_per_partition = divide(input_size, self.tp_size, "input size")
        self.reduce_results = reduce_results
        self.prefix = prefix
        self.weight = _new_param(output_size, self.input_size_per_partition,
                                 loader=self.weight_loader)
        self.bias = _new_param(output_size, loader=self.weight_loader) if bias else None
        self.packed_weight: torch.Tensor | None = None  # see pack_linear_weights
        self.amx_weight: torch.Tensor | None = None
        # LoRA: adds the step's adapter deltas to this rank's partial output (engine.lora)
        self.lora: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
        self.quant_weight: QuantizedWeight | None = None  # see engine.quantization

    def weight_loader(self, param: torch.Tensor, loaded: torch.Tensor) -> None:
        if param.dim() == 2:  # the weight; a bias is replicated
            size = param.shape[1]
            _expect_dim(loaded, 1, size * self.tp_size)
            loaded = loaded.narrow(1, self.tp_rank * size, size)
        load_rows(self, param, 0, param.shape[0], loaded)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        packed = self.packed_weight
        prepacked = packed is not None or self.amx_weight is not None
        if self.tp_size == 1:
            if self.quant_weight is not None:
                out = self.quant_weight.linear(x, self.bias)
            elif prepacked:
                out = packed_linear(x, packed, self.bias, self.weight, self.amx_weight)
            else:
                out = plain_linear(x, self.weight, self.bias)
            return out if self.lora is None else self.lora(x, out)
        from engine.distributed.parallel_state import tensor_model_parallel_all_reduce

        out = (plain_linear(x, self.weight) if not prepacked
               else packed_linear(x, packed, None, self.weight, self.amx_weight))
        if self.lora is not None:  # the ranks' partial deltas add up in the all-reduce
            out = self.lora(x, out)
        if self.reduce_results:
            out = tensor_model_parallel_all_reduce(out)
        return out if self.bias is None else out + self.bias

    def extra_repr(self) -> str:
        return (f"in={self.input_size_per_partition} (of {self.input_size}), "
                f"out={self.output_size}, bias={self.bias is not None}")


# the classes whose forward `fast_linear_fn` reproduces (a subclass may change it)
_FAST_LINEAR_CLASSES = (ColumnParallelLinear, MergedColumnParallelLinear, QKVParallelLinear,
                        RowParallelLinear)
