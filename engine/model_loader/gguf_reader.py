"""A GGUF file read once: metadata parsed in one pass, tensors memory-mapped.

The `gguf` package's reader builds a NumPy view for every part of every metadata
field (a 49k-token vocabulary is hundreds of thousands of views, seconds on its
own); this one walks the header with `struct` over the memory map, and a tensor's
bytes are read only when its weights are asked for. Dequantization: Q4_0, Q4_1,
Q8_0, F16, BF16 and F32 in torch (vectorized, multi-threaded), every other type
through the `gguf` package's `dequantize`.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32

# metadata value types (GGUF spec: gguf_metadata_value_type)
_UINT8, _INT8, _UINT16, _INT16, _UINT32, _INT32, _FLOAT32, _BOOL, _STRING, _ARRAY, \
    _UINT64, _INT64, _FLOAT64 = range(13)
_SCALARS = {
    _UINT8: "<B", _INT8: "<b", _UINT16: "<H", _INT16: "<h", _UINT32: "<I", _INT32: "<i",
    _FLOAT32: "<f", _BOOL: "<?", _UINT64: "<Q", _INT64: "<q", _FLOAT64: "<d",
}
_NUMPY = {
    _UINT8: "<u1", _INT8: "<i1", _UINT16: "<u2", _INT16: "<i2", _UINT32: "<u4", _INT32: "<i4",
    _FLOAT32: "<f4", _BOOL: "?", _UINT64: "<u8", _INT64: "<i8", _FLOAT64: "<f8",
}

# ggml tensor types: (name, values per block, bytes per block)
GGML_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22), 7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 9: ("Q8_1", 32, 36),
    10: ("Q2_K", 256, 84), 11: ("Q3_K", 256, 110), 12: ("Q4_K", 256, 144),
    13: ("Q5_K", 256, 176), 14: ("Q6_K", 256, 210), 15: ("Q8_K", 256, 292),
    16: ("IQ2_XXS", 256, 66), 17: ("IQ2_XS", 256, 74), 18: ("IQ3_XXS", 256, 98),
    19: ("IQ1_S", 256, 50), 20: ("IQ4_NL", 32, 18), 21: ("IQ3_S", 256, 110),
    22: ("IQ2_S", 256, 82), 23: ("IQ4_XS", 256, 136), 24: ("I8", 1, 1), 25: ("I16", 1, 2),
    26: ("I32", 1, 4), 27: ("I64", 1, 8), 28: ("F64", 1, 8), 29: ("IQ1_M", 256, 56),
    30: ("BF16", 1, 2), 34: ("TQ1_0", 256, 54), 35: ("TQ2_0", 256, 66),
}


@dataclass(frozen=True)
class TensorInfo:
    """One tensor's entry: `shape` fastest dimension first (as GGUF lists it)."""

    name: str
    shape: tuple[int, ...]
    type_id: int
    offset: int  # from the start of the file
    nbytes: int

    @property
    def type_name(self) -> str:
        return GGML_TYPES.get(self.type_id, (f"type {self.type_id}", 0, 0))[0]


class GGUFReader:
    """The metadata (`fields`: key -> value) and tensor entries (`tensors`) of a
    GGUF file, parsed once; `raw(tensor)` is the tensor's bytes in the memory map.
    Raises ValueError for a file that is not GGUF or is cut short."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        with open(self.path, "rb") as f:
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)  # writable views, pages read lazily, never written back
        self._buf = memoryview(self._map)
        self._pos = 0
        try:
            self._parse()
        except (struct.error, IndexError, UnicodeDecodeError) as exc:
            raise ValueError(f"truncated or corrupt header ({exc})") from None

    def _parse(self) -> None:
        if bytes(self._buf[:4]) != GGUF_MAGIC:
            raise ValueError("the file does not start with the GGUF magic bytes")
        self._pos = 4
        version = self._scalar("<I")
        if version < 2:
            raise ValueError(f"GGUF version {version} is not supported (2 or 3 are)")
        n_tensors, n_fields = self._scalar("<Q"), self._scalar("<Q")
        self.fields: dict[str, Any] = {}
        for _ in range(n_fields):
            key = self._string()
            self.fields[key] = self._value(self._scalar("<I"))
        entries = []
        for _ in range(n_tensors):
            name = self._string()
            n_dims = self._scalar("<I")
            shape = struct.unpack_from(f"<{n_dims}Q", self._buf, self._pos)
            self._pos += 8 * n_dims
            type_id, offset = self._scalar("<I"), self._scalar("<Q")
            entries.append((name, shape, type_id, offset))
        alignment = int(self.fields.get("general.alignment", DEFAULT_ALIGNMENT))
        data_start = -(-self._pos // alignment) * alignment
        self.tensors: list[TensorInfo] = []
        for name, shape, type_id, offset in entries:
            _, block, block_bytes = GGML_TYPES.get(type_id, ("", 1, 0))
            count = int(np.prod(shape, dtype=np.int64))
            nbytes = count // block * block_bytes if block_bytes else 0
            self.tensors.append(TensorInfo(name, tuple(int(d) for d in shape), type_id,
                                           data_start + offset, nbytes))
            if data_start + offset + nbytes > len(self._buf):
                raise ValueError(f"tensor {name!r} ends past the end of the file")

    def _scalar(self, fmt: str) -> Any:
        (value,) = struct.unpack_from(fmt, self._buf, self._pos)
        self._pos += struct.calcsize(fmt)
        return value

    def _string(self) -> str:
        (length,) = struct.unpack_from("<Q", self._buf, self._pos)
        start = self._pos + 8
        self._pos = start + length
        return str(self._buf[start:self._pos], "utf-8")

    def _value(self, kind: int) -> Any:
        if kind == _STRING:
            return self._string()
        if kind == _ARRAY:
            item, count = self._scalar("<I"), self._scalar("<Q")
            if item == _STRING:
                return [self._string() for _ in range(count)]
            if item == _ARRAY:
                return [self._value(_ARRAY) for _ in range(count)]
            dtype = np.dtype(_NUMPY[item])
            values = np.frombuffer(self._buf, dtype=dtype, count=count, offset=self._pos)
            self._pos += dtype.itemsize * count
            return values.tolist()
        if kind not in _SCALARS:
            raise ValueError(f"unknown metadata value type {kind}")
        return self._scalar(_SCALARS[kind])

    def raw(self, tensor: TensorInfo) -> np.ndarray:
        """The tensor's bytes as a uint8 array over the memory map (copy on write)."""
        return np.frombuffer(self._buf, dtype=np.uint8, count=tensor.nbytes,
                             offset=tensor.offset)


def dequantize(reader: GGUFReader, tensor: TensorInfo) -> Any:
    """The tensor as float32 torch values, row-major (slowest dimension first).
    Raises NotImplementedError for a type neither torch code here nor the `gguf`
    package can dequantize."""
    import torch

    shape = tuple(reversed(tensor.shape))
    raw = reader.raw(tensor)
    name = tensor.type_name
    if name in ("F32", "F16", "BF16"):
        dtype = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}[name]
        values = torch.frombuffer(raw, dtype=torch.uint8).view(dtype)
        return values.to(torch.float32).reshape(shape)
    if name in ("Q4_0", "Q4_1", "Q8_0"):
        block_bytes = GGML_TYPES[tensor.type_id][2]
        blocks = torch.frombuffer(raw, dtype=torch.uint8).view(-1, block_bytes)
        scale = blocks[:, :2].contiguous().view(torch.float16).to(torch.float32)
        if name == "Q8_0":
            quants = blocks[:, 2:].contiguous().view(torch.int8).to(torch.float32)
            return (quants * scale).reshape(shape)
        packed = blocks[:, 4:] if name == "Q4_1" else blocks[:, 2:]
        # 16 bytes: the low nibbles are values 0-15 of the block, the high ones 16-31
        quants = torch.cat((packed & 0x0F, packed >> 4), dim=1).to(torch.float32)
        if name == "Q4_0":
            return ((quants - 8) * scale).reshape(shape)
        minimum = blocks[:, 2:4].contiguous().view(torch.float16).to(torch.float32)
        return (quants * scale + minimum).reshape(shape)
    from gguf import GGMLQuantizationType
    from gguf import dequantize as gguf_dequantize

    _, block, block_bytes = GGML_TYPES.get(tensor.type_id, ("", 1, 1))
    try:
        qtype = GGMLQuantizationType(tensor.type_id)
        values = gguf_dequantize(raw.reshape(-1, tensor.shape[0] // block * block_bytes), qtype)
    except (NotImplementedError, ValueError):
        raise NotImplementedError(name) from None
    return torch.from_numpy(np.array(values, dtype=np.float32).reshape(shape))
