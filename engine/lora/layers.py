"""Adapters bound to the model's linear layers, and the batched LoRA product.

Each adaptable layer (`ColumnParallelLinear` and `RowParallelLinear`, fused ones
included) gets a `LoRALayer` as its ``lora`` hook, which adds, to this rank's
partial output, every row's own adapter delta. The active adapters sit in
``max_loras`` slots: per layer, one `LayerSlots` holds every slot's A and B
stacked, written when an adapter is activated, so a step only says which slot
each row uses (-1: the base model) and each layer does one call over the whole
batch (``engine_kernels::lora_add``, engine/kernels/lora.cpp; plain PyTorch, a
pair of matmuls per adapter of the step and part, where the kernels cannot run).

A fused layer (q, k, v; gate, up) has one part per checkpoint module: a part's
A rows and B columns sit at its own offsets, B holding only the part's output
columns (placed and sharded exactly as the base layer places and shards that
part, by calling the base layer's own weight loader). A row-parallel layer's A
is split over the input features like the base weight; the partial deltas of
the ranks then add up in the layer's own all-reduce.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from engine.kernels import portable_forced, usable_for
from engine.lora.adapter import (
    WEIGHTS_FILE,
    AdapterModule,
    PeftAdapter,
    target_module_names,
)
from engine.ops.linear import ColumnParallelLinear, RowParallelLinear


@dataclass
class PartWeights:
    """One part of one adapter for one layer, this rank's shard, float32 on the host."""

    part: int  # which of the layer's parts (0 for an unfused layer)
    a: torch.Tensor  # [r, in_per_rank]
    b: torch.Tensor  # [r, columns], scaled
    columns: tuple[int, int]  # the part's output columns in this rank's output


# one adapter's weights: layer name -> its parts that the adapter adapts
AdapterWeights = dict[str, list[PartWeights]]


@dataclass
class _Part:
    """Where a checkpoint module (e.g. ``...q_proj``) lives in the model."""

    layer_name: str  # our module, e.g. ``...qkv_proj``
    shard_id: Any  # the base layer loader's shard id; None for an unfused layer
    index: int  # the part's index among the layer's parts


class StepBatch:
    """The current step's rows: which slot each row uses.

    ``slots`` (int32 [T] on the host, -1 for base-model rows) is what the kernel
    reads; ``groups`` (slot, rows as a slice or an index tensor on the model's
    device) what the plain-PyTorch path loops over. None / empty: no adapter in
    the step, and the hooks do nothing."""

    def __init__(self) -> None:
        self.slots: torch.Tensor | None = None
        self.groups: list[tuple[int, slice | torch.Tensor]] = []

    def set(self, slots: torch.Tensor | None, groups: list[tuple[int, slice | torch.Tensor]]
            ) -> None:
        self.slots, self.groups = slots, groups


class LayerSlots:
    """Every slot's A and B for one layer, in the model's device and dtype.

    ``a [slots, parts * max_rank, in]``: part p of slot s in rows ``p * max_rank``
    onwards; ``b [slots, max_rank, out]`` (float32 on the host): part p in its
    own output columns;
    ``ranks [slots, parts]`` (int32, host): each part's rank in each slot, 0 where
    the slot's adapter leaves the part alone (or the slot is free)."""

    def __init__(self, num_slots: int, num_parts: int, max_rank: int, in_features: int,
                 out_features: int, device: torch.device, dtype: torch.dtype) -> None:
        self.max_rank = max_rank
        self.a = torch.zeros(num_slots, num_parts * max_rank, in_features, device=device,
                             dtype=dtype)
        # on the host, a bfloat16 layer's B stays float32: the kernel's expand then
        # multiplies without widening every B vector first (B is small: rank x out)
        b_dtype = torch.float32 if device.type == "cpu" else dtype
        self.b = torch.zeros(num_slots, max_rank, out_features, device=device, dtype=b_dtype)
        self.ranks = torch.zeros(num_slots, num_parts, dtype=torch.int32)
        self.spans = torch.zeros(num_parts, 2, dtype=torch.int32)  # each part's columns
        self._ranks: list[list[int]] = self.ranks.tolist()  # read by the PyTorch path

    def write(self, slot: int, parts: Sequence[PartWeights]) -> None:
        """Put one adapter's parts (none: the slot is emptied) into `slot`."""
        self.ranks[slot] = 0
        self.b[slot].zero_()
        for part in parts:
            r = part.a.shape[0]
            start = part.part * self.max_rank
            self.a[slot, start:start + r] = part.a
            self.b[slot, :r, part.columns[0]:part.columns[1]] = part.b
            self.ranks[slot, part.part] = r
            self.spans[part.part] = torch.tensor(part.columns, dtype=torch.int32)
        self._ranks = self.ranks.tolist()

    def apply(self, x: torch.Tensor, out: torch.Tensor, step: StepBatch) -> torch.Tensor:
        """``out[t] += x[t]``'s delta under the adapter of row t's slot, for every row."""
        assert step.slots is not None
        if x.dim() == 2 and usable_for(out, x, self.a) and self.b.is_cpu:  # B: float32
            torch.ops.engine_kernels.lora_add(out, x, self.a, self.b, self.ranks, self.spans,
                                              step.slots, portable_forced())
            return out
        spans = self.spans.tolist()
        for slot, rows in step.groups:
            ranks = self._ranks[slot]
            if not any(ranks):
                continue
            h = x[rows] @ self.a[slot].t()  # [n, parts * max_rank]
            for part, r in enumerate(ranks):
                if r == 0:
                    continue
                start, end = spans[part]
                hp = h[:, part * self.max_rank:part * self.max_rank + r]
                bp = self.b[slot, :r, start:end].to(h.dtype)
                if isinstance(rows, slice):
                    out[rows, start:end].addmm_(hp, bp)
                else:
                    out[:, start:end].index_add_(0, rows, hp @ bp)
        return out


class LoRALayer:
    """The ``lora`` hook of one linear layer: ``out += delta`` for the step's adapters."""

    def __init__(self, name: str, step: StepBatch, num_parts: int) -> None:
        self.name = name
        self.step = step
        self.num_parts = num_parts
        self.slots: LayerSlots | None = None  # made when an adapter first adapts the layer

    def __call__(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        if self.slots is None or self.step.slots is None:
            return out
        return self.slots.apply(x, out, self.step)


class LoRATargets:
    """The adaptable layers of one model (this rank's shards), hooked up."""

    def __init__(self, model: nn.Module, step: StepBatch) -> None:
        self.layers: dict[str, nn.Module] = {}
        self.hooks: dict[str, LoRALayer] = {}
        self.parts: dict[str, _Part] = {}  # checkpoint module name -> where it lives
        stacked: Sequence[tuple[str, str, Any]] = getattr(model, "stacked_params", ())
        for name, module in model.named_modules():
            if not isinstance(module, (ColumnParallelLinear, RowParallelLinear)):
                continue
            self.layers[name] = module
            dotted = f".{name}."
            fused = [(ours, ckpt, shard) for ours, ckpt, shard in stacked if ours in dotted]
            if not fused:
                self.parts[name] = _Part(name, None, 0)
            for index, (ours, ckpt_part, shard) in enumerate(fused):
                self.parts[dotted.replace(ours, ckpt_part).strip(".")] = _Part(name, shard, index)
            module.lora = self.hooks[name] = LoRALayer(name, step, max(1, len(fused)))
        self.short_names = sorted({n.rsplit(".", 1)[-1] for n in self.parts})

    def write(self, slot: int, weights: AdapterWeights, num_slots: int, max_rank: int,
              device: torch.device, dtype: torch.dtype) -> None:
        """Put an adapter's weights into `slot` of every layer (emptying the slot in
        the layers the adapter leaves alone); a layer's slots are allocated when an
        adapter first adapts it."""
        for name, hook in self.hooks.items():
            parts = weights.get(name)
            if hook.slots is None:
                if not parts:
                    continue
                layer = self.layers[name]
                if isinstance(layer, RowParallelLinear):
                    shape = (layer.input_size_per_partition, layer.output_size)
                else:
                    assert isinstance(layer, ColumnParallelLinear)
                    shape = (layer.input_size, layer.output_size_per_partition)
                hook.slots = LayerSlots(num_slots, hook.num_parts, max_rank, *shape,
                                        device=device, dtype=dtype)
            hook.slots.write(slot, parts or ())

    def bind(self, adapter: PeftAdapter) -> AdapterWeights:
        """This rank's weights of `adapter`, per layer, in float32 on the host.
        Raises `LoRAAdapterError` naming the adapter and the module or field when
        the adapter does not fit the model."""
        for target in target_module_names(adapter):
            if target.rsplit(".", 1)[-1] not in self.short_names:
                raise adapter.error(
                    f"adapter_config.json: target_modules names {target!r}, which this model "
                    f"lacks or LoRA cannot adapt here (it adapts: {', '.join(self.short_names)})")
        by_layer: dict[str, list[tuple[_Part, AdapterModule]]] = {}
        for module in adapter.modules.values():
            part = self.parts.get(module.name)
            if part is None:
                raise adapter.error(self._unknown_module(module.name))
            by_layer.setdefault(part.layer_name, []).append((part, module))
        bound = {}
        for layer_name, parts in by_layer.items():
            layer = self.layers[layer_name]
            try:
                if isinstance(layer, RowParallelLinear):
                    bound[layer_name] = [_bind_row(layer, part, module) for part, module in parts]
                else:
                    assert isinstance(layer, ColumnParallelLinear)
                    bound[layer_name] = [_bind_column(layer, part, module)
                                         for part, module in parts]
            except _Mismatch as exc:
                raise adapter.error(
                    f"{WEIGHTS_FILE}: module {exc.module!r}: {exc}; the adapter was made for "
                    "a base model of another size (hidden_size / intermediate_size / heads)"
                ) from None
        return bound

    def _unknown_module(self, name: str) -> str:
        def generic(module: str) -> str:  # the name with its layer index left out
            return re.sub(r"\.\d+\.", ".#.", module)

        if generic(name) != name and generic(name) in {generic(p) for p in self.parts}:
            layers = {m.group(1) for p in self.parts if (m := re.search(r"\.(\d+)\.", p))}
            return (f"{WEIGHTS_FILE}: module {name!r} is in a layer the model does not have "
                    f"(num_hidden_layers={len(layers)}); the adapter was made for another "
                    "base model")
        return (f"target_modules: the model has no module {name!r} that LoRA can adapt "
                f"(it adapts: {', '.join(self.short_names)})")


class _Mismatch(ValueError):
    def __init__(self, module: str, message: str) -> None:
        super().__init__(message)
        self.module = module


def _bind_column(layer: ColumnParallelLinear, part: _Part,
                 module: AdapterModule) -> PartWeights:
    if module.lora_a.shape[1] != layer.input_size:
        raise _Mismatch(module.name, f"lora_A takes {module.lora_a.shape[1]} input features, "
                                     f"the model's layer {layer.input_size}")
    # the base layer's loader picks and places this rank's rows of the part; a
    # column of ones next to B marks which output columns those are
    scaled = module.lora_b.float() * module.scaling
    marked = torch.cat([scaled, torch.ones(scaled.shape[0], 1)], dim=1)
    placed = torch.zeros(layer.output_size_per_partition, module.rank + 1)
    try:
        if part.shard_id is None:
            layer.weight_loader(placed, marked)
        else:  # a merged layer (qkv, gate_up): its loader takes the part's shard id
            layer.weight_loader(placed, marked, part.shard_id)  # type: ignore[call-arg]
    except ValueError as exc:
        raise _Mismatch(module.name, f"lora_B: {exc}") from None
    rows = placed[:, -1].nonzero().flatten().tolist()
    start, end = rows[0], rows[-1] + 1
    return PartWeights(part.index, module.lora_a.float().contiguous(),
                       placed[start:end, :-1].t().contiguous(), (start, end))


def _bind_row(layer: RowParallelLinear, part: _Part, module: AdapterModule) -> PartWeights:
    if module.lora_b.shape[0] != layer.output_size:
        raise _Mismatch(module.name, f"lora_B gives {module.lora_b.shape[0]} output features, "
                                     f"the model's layer {layer.output_size}")
    a = torch.zeros(module.rank, layer.input_size_per_partition)
    try:  # this rank's columns, as the base weight is split
        layer.weight_loader(a, module.lora_a.float())
    except ValueError as exc:
        raise _Mismatch(module.name, f"lora_A: {exc}") from None
    b = module.lora_b.float() * module.scaling
    return PartWeights(part.index, a, b.t().contiguous(), (0, layer.output_size))
