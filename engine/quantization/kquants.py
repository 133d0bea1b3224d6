"""Quantizing float weights to the K-quant block types (Q4_K, Q5_K, Q6_K) at load.

The `gguf` package reads these types but cannot write them; these quantizers
write blocks that any GGUF reader (and `engine/kernels/ggml_quant.cpp`) decodes.
Scales are plain min/max fits per sub-block, then quantized against the
super-block's float16 scale; no search for the error-minimising scale (what
llama.cpp's own quantizer adds), so files written here are a little less
accurate than llama.cpp's at the same size. Input: float32 [N, K], K a
multiple of 256; output: uint8 [N, K / 256 * block bytes].
"""

from __future__ import annotations

import numpy as np

QK_K = 256


def _f16_bytes(values: np.ndarray) -> np.ndarray:
    return values.astype(np.float16).view(np.uint8).reshape(*values.shape, 2)


def _pack_k_scales(sc: np.ndarray, mins: np.ndarray) -> np.ndarray:
    """8 six-bit scales and mins per super-block -> the 12 packed bytes."""
    sc = sc.astype(np.uint8)
    mins = mins.astype(np.uint8)
    out = np.empty((*sc.shape[:-1], 12), dtype=np.uint8)
    lo_s, hi_s = sc[..., :4], sc[..., 4:]
    lo_m, hi_m = mins[..., :4], mins[..., 4:]
    out[..., 0:4] = lo_s | ((hi_s >> 4) << 6)
    out[..., 4:8] = lo_m | ((hi_m >> 4) << 6)
    out[..., 8:12] = (hi_s & 0xF) | ((hi_m & 0xF) << 4)
    return out


def _fit_k(values: np.ndarray, levels: int) -> tuple[np.ndarray, ...]:
    """Per 32-value sub-block: (d, dmin, 6-bit scales, 6-bit mins, quants)."""
    rows, cols = values.shape
    x = values.reshape(rows, cols // QK_K, 8, 32).astype(np.float32)
    lo = np.minimum(x.min(axis=-1), 0.0)
    hi = x.max(axis=-1)
    scale = (hi - lo) / levels
    offset = -lo
    d = scale.max(axis=-1) / 63
    dmin = offset.max(axis=-1) / 63
    d = d.astype(np.float16).astype(np.float32)
    dmin = dmin.astype(np.float16).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        sc = np.where(d[..., None] > 0, np.rint(scale / d[..., None]), 0).clip(0, 63)
        mn = np.where(dmin[..., None] > 0, np.rint(offset / dmin[..., None]), 0).clip(0, 63)
        step = (d[..., None] * sc)[..., None]
        q = np.where(step > 0, np.rint((x + (dmin[..., None] * mn)[..., None]) / step), 0)
    q = q.clip(0, levels).astype(np.uint8)
    return d, dmin, sc, mn, q


def quantize_q4_k(values: np.ndarray) -> np.ndarray:
    """Q4_K blocks (144 bytes per 256 values) of `values` [N, K]."""
    rows, cols = values.shape
    d, dmin, sc, mn, q = _fit_k(values, 15)
    # group g of 32 bytes: sub-block 2g in the low nibbles, 2g + 1 in the high
    qs = (q[:, :, 0::2, :] | (q[:, :, 1::2, :] << 4)).reshape(rows, cols // QK_K, 128)
    blocks = np.concatenate([_f16_bytes(d), _f16_bytes(dmin), _pack_k_scales(sc, mn), qs], axis=-1)
    return blocks.reshape(rows, -1)


def quantize_q5_k(values: np.ndarray) -> np.ndarray:
    """Q5_K blocks (176 bytes per 256 values) of `values` [N, K]."""
    rows, cols = values.shape
    d, dmin, sc, mn, q = _fit_k(values, 31)
    low = q & 0xF
    qs = (low[:, :, 0::2, :] | (low[:, :, 1::2, :] << 4)).reshape(rows, cols // QK_K, 128)
    # byte l of qh: bit j is the fifth bit of value l of sub-block j
    high = (q >> 4).astype(np.uint8)
    qh = np.zeros((rows, cols // QK_K, 32), dtype=np.uint8)
    for j in range(8):
        qh |= high[:, :, j, :] << j
    blocks = np.concatenate([_f16_bytes(d), _f16_bytes(dmin), _pack_k_scales(sc, mn), qh, qs],
                            axis=-1)
    return blocks.reshape(rows, -1)


def quantize_q6_k(values: np.ndarray) -> np.ndarray:
    """Q6_K blocks (210 bytes per 256 values) of `values` [N, K]."""
    rows, cols = values.shape
    nb = cols // QK_K
    x = values.reshape(rows, nb, 16, 16).astype(np.float32)
    scale = np.abs(x).max(axis=-1) / 31
    d = (np.abs(scale).max(axis=-1) / 127).astype(np.float16).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        sc = np.where(d[..., None] > 0, np.rint(scale / d[..., None]), 0).clip(-128, 127)
        step = (d[..., None] * sc)[..., None]
        q = np.where(step != 0, np.rint(x / step), 0)
    q = (q.clip(-32, 31) + 32).astype(np.uint8).reshape(rows, nb, 2, 4, 32)  # halves of 128
    ql = np.concatenate([(q[:, :, :, 0] & 0xF) | ((q[:, :, :, 2] & 0xF) << 4),
                         (q[:, :, :, 1] & 0xF) | ((q[:, :, :, 3] & 0xF) << 4)], axis=-1)
    qh = ((q[:, :, :, 0] >> 4) | ((q[:, :, :, 1] >> 4) << 2) | ((q[:, :, :, 2] >> 4) << 4)
          | ((q[:, :, :, 3] >> 4) << 6))
    blocks = np.concatenate([ql.reshape(rows, nb, 128), qh.reshape(rows, nb, 64),
                             sc.astype(np.int8).view(np.uint8), _f16_bytes(d)], axis=-1)
    return blocks.reshape(rows, -1)
