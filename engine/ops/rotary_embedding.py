"""Rotary position embedding (RoPE), with the scaling variants found in HF configs."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from engine.kernels import usable_for
from engine.ops.custom_op import CustomOp

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")

# Positions the cos/sin table holds at first. It doubles when a longer context
# arrives, up to `max_position`: a model whose context is 300k positions would
# otherwise hold ~150 MB of tables that only its longest requests touch.
INITIAL_TABLE_POSITIONS = 4096


def rope_parameters_from_hf(hf_config: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """``(rope_theta, scaling)`` from a config.json dict, in both the transformers 5
    form (``rope_parameters``) and the older one (``rope_theta`` + ``rope_scaling``).
    `scaling` is None for plain RoPE, else a dict with ``rope_type``."""
    params = dict(hf_config.get("rope_parameters") or {})
    scaling = dict(hf_config.get("rope_scaling") or {})
    theta = params.pop("rope_theta", hf_config.get("rope_theta", 10000.0))
    merged = {**params, **scaling}  # like transformers: an explicit rope_scaling wins
    rope_type = (scaling.get("rope_type") or scaling.get("type")
                 or params.get("rope_type") or params.get("type") or "default")
    if rope_type == "default":
        return float(theta), None
    merged["rope_type"] = rope_type
    return float(theta), merged


def _inv_freq(rotary_dim: int, base: float, scaling: dict[str, Any] | None) -> torch.Tensor:
    exponents = torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim
    inv_freq = 1.0 / (base**exponents)
    rope_type = scaling["rope_type"] if scaling else "default"
    if rope_type == "default":
        return inv_freq
    if rope_type == "linear":
        return inv_freq / float(scaling["factor"])
    if rope_type == "llama3":
        return _llama3_inv_freq(inv_freq, scaling)
    raise ValueError(
        f"rope_scaling type {rope_type!r} is not supported. "
        f"Valid options are: {', '.join(SUPPORTED_ROPE_TYPES)}"
    )


def _llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict[str, Any]) -> torch.Tensor:
    # Llama 3.1: long wavelengths are divided by `factor`, short ones kept, and the
    # band between is interpolated smoothly.
    factor = float(scaling["factor"])
    low = float(scaling.get("low_freq_factor", 1.0))
    high = float(scaling.get("high_freq_factor", 4.0))
    old_len = float(scaling["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(medium, smoothed, scaled)


@CustomOp.register("rotary_embedding")
class RotaryEmbedding(CustomOp):
    """Neox-style RoPE over the first `rotary_dim` features of each head.

    ``forward(positions [T], query [T, H*D] or [T, H, D], key [T, Hkv*D] or
    [T, Hkv, D]) -> (query, key)`` of the same shapes. cos/sin are computed in
    float32 for the first `INITIAL_TABLE_POSITIONS` positions (at most
    `max_position`), and the table doubles when a later position needs it."""

    def __init__(
        self,
        head_size: int,
        rotary_dim: int,
        max_position: int,
        base: float = 10000.0,
        rope_scaling: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.head_size = head_size
        self.rotary_dim = rotary_dim
        self.max_position = max_position
        self.base = base
        self.rope_scaling = rope_scaling
        self._inv_freq = _inv_freq(rotary_dim, base, rope_scaling)
        # [positions held, rotary_dim]: cos half then sin half
        self.register_buffer("cos_sin_cache",
                             self._table(min(max_position, INITIAL_TABLE_POSITIONS)),
                             persistent=False)
        # the positions tensor last checked against the table: every layer of a
        # step passes the same one (the model runner builds a new one per step),
        # so the check costs one max() per step
        self._covered: torch.Tensor | None = None
        # (positions, dtype, cos, sin) of the last call: every layer of a step
        # passes the same positions, so the lookup is done once per step
        self._last_cos_sin: tuple | None = None

    def _table(self, num_positions: int) -> torch.Tensor:
        """cos and sin [num_positions, rotary_dim] in float32 (each row depends
        only on its position, so a longer table starts with the shorter one)."""
        freqs = torch.outer(torch.arange(num_positions, dtype=torch.float32), self._inv_freq)
        return torch.cat([freqs.cos(), freqs.sin()], dim=-1)

    # a data-dependent size: under torch.compile a graph break, next to attention's
    # (engine.compilation marks it; a decorator here would import TorchDynamo, ~1 s,
    # in every process that never compiles)
    def cover(self, positions: torch.Tensor) -> None:
        """Grow the cos/sin table (doubling, at most to `max_position` rows) so it
        holds every position in `positions`. Positions at or past `max_position`
        raise IndexError: the engine never schedules past max_model_len."""
        rows = self.cos_sin_cache.shape[0]
        if positions is self._covered or positions.numel() == 0:
            return
        highest = int(positions.max())
        if highest >= self.max_position:
            raise IndexError(f"position {highest} is past the rotary table's "
                             f"max_position={self.max_position}")
        if highest >= rows:
            grown = max(2 * rows, 1 << highest.bit_length())
            table = self._table(min(grown, self.max_position))
            self.cos_sin_cache = table.to(self.cos_sin_cache.device, self.cos_sin_cache.dtype)
            self._last_cos_sin = None
        self._covered = positions

    def forward_native(
        self, positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        self.cover(positions)
        cos, sin = self._cos_sin(positions, query.dtype)
        return self._rotate(query, cos, sin), self._rotate(key, cos, sin)

    def forward_cpu(
        self, positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One pass over q and k in C++ (engine.kernels) where it is loaded; else
        `forward_native`. Returns new contiguous tensors of the input shapes."""
        if (positions.dim() != 1 or positions.dtype != torch.int64 or self.rotary_dim % 2
                or self.cos_sin_cache.dtype != torch.float32 or not usable_for(query, key)):
            return self.forward_native(positions, query, key)
        self.cover(positions)
        tokens = positions.shape[0]
        q = query.reshape(tokens, -1)
        k = key.reshape(tokens, -1)
        q_out, k_out = torch.empty_like(q), torch.empty_like(k)
        torch.ops.engine_kernels.rotary_embedding(
            q_out, k_out, positions, q, k, self.cos_sin_cache, self.head_size)
        return q_out.view(query.shape), k_out.view(key.shape)

    def fast_fn(self, dtype: torch.dtype) -> Callable[
            [torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None:
        """`forward_cpu`'s kernel call for a model's fast path (engine.ops.fast_path):
        ``run(positions, query, key)`` on [T, H*D] / [T, Hkv*D] rows of `dtype` (views
        into a fused q/k/v output are fine) returns new contiguous query and key
        tensors. The caller covers the step's positions once (`cover`) before the
        first layer. None where this op does not run `forward_cpu`'s kernel."""
        if (getattr(self._forward_method, "__func__", None) is not RotaryEmbedding.forward_cpu
                or self.rotary_dim % 2 or self.cos_sin_cache.dtype != torch.float32
                or not usable_for(torch.empty(0, dtype=dtype))):
            return None
        rotary_embedding = torch.ops.engine_kernels.rotary_embedding
        head_size = self.head_size

        def run(positions: torch.Tensor, query: torch.Tensor,
                key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            q_out = query.new_empty(query.shape)
            k_out = key.new_empty(key.shape)
            # the table is read at every call: `cover` may have grown it
            rotary_embedding(q_out, k_out, positions, query, key, self.cos_sin_cache, head_size)
            return q_out, k_out

        return run

    def _cos_sin(self, positions: torch.Tensor,
                 dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin [T, 1, rotary_dim / 2] of `positions`, reused while equal
        positions come back in the same dtype."""
        last = self._last_cos_sin
        if (last is not None and last[1] == dtype and last[0].shape == positions.shape
                and torch.equal(last[0], positions)):
            return last[2], last[3]
        cos, sin = self.cos_sin_cache.index_select(0, positions).to(dtype).chunk(2, dim=-1)
        cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
        self._last_cos_sin = (positions.clone(), dtype, cos, sin)
        return cos, sin

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.view(shape[0], -1, self.head_size)
        x1, x2 = x[..., : self.rotary_dim].chunk(2, dim=-1)
        rotated = [x1 * cos - x2 * sin, x2 * cos + x1 * sin]
        if self.rotary_dim < self.head_size:
            rotated.append(x[..., self.rotary_dim :])
        return torch.cat(rotated, dim=-1).view(shape)

    def extra_repr(self) -> str:
        return (f"head_size={self.head_size}, rotary_dim={self.rotary_dim}, "
                f"max_position={self.max_position}, base={self.base}, "
                f"rope_scaling={self.rope_scaling}")
