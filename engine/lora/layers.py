"""Adapters bound to the model's linear layers, and the batched LoRA product.

Each adaptable layer (`ColumnParallelLinear` and `RowParallelLinear`, fused ones
included) gets a `LoRALayer` as its ``lora`` hook, which adds, to this rank's
partial output, the LoRA delta of every adapter in the step for that adapter's
rows of the batch: one pair of matmuls per adapter and layer, whatever the mix
of adapters and base-model rows in the step.

Fused layers hold one adapter as one pair too: the A matrices of the parts
(q, k, v; gate, up) are stacked, and B is block-diagonal over the parts, each
block placed and sharded exactly as the base layer places and shards that part
(by calling the base layer's own weight loader). A row-parallel layer's A is
split over the input features like the base weight; the partial deltas of the
ranks then add up in the layer's own all-reduce.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from engine.lora.adapter import (
    WEIGHTS_FILE,
    AdapterModule,
    PeftAdapter,
    target_module_names,
)
from engine.ops.linear import ColumnParallelLinear, RowParallelLinear

# one adapter's weights for one layer and rank: x [T, in] -> x @ a_t @ b_t [T, out]
LayerWeights = tuple[torch.Tensor, torch.Tensor]  # a_t [in, R], b_t [R, out] (scaled)


@dataclass
class _Part:
    """Where a checkpoint module (e.g. ``...q_proj``) lives in the model."""

    layer_name: str  # our module, e.g. ``...qkv_proj``
    shard_id: Any  # the base layer loader's shard id; None for an unfused layer


class LoRALayer:
    """The ``lora`` hook of one linear layer: ``out += delta`` for the step's adapters."""

    def __init__(self, name: str, step: StepBatch) -> None:
        self.name = name
        self.step = step

    def __call__(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        stacked = self.step.stacked
        if stacked is not None:
            entry = stacked.get(self.name)
            if entry is not None:
                a_all, b_all, counts = entry
                h = x @ a_all  # every adapter's A for every row: one matmul
                h.mul_(self.step.mask(counts))  # keep each row's own adapter's columns
                out.addmm_(h, b_all)
            return out
        for weights, rows in self.step.groups:
            pair = weights.get(self.name)
            if pair is None:
                continue
            a_t, b_t = pair
            if isinstance(rows, slice):
                view = out[rows]
                view.addmm_(x[rows] @ a_t, b_t)
            else:
                out.index_add_(0, rows, (x.index_select(0, rows) @ a_t) @ b_t)
        return out


class StepBatch:
    """The current step's adapters and their rows.

    One adapter: ``groups`` holds ``[(weights, rows)]`` (rows a slice or an index
    tensor) and each layer runs one pair of matmuls on those rows. Several:
    `stacked` holds, per layer, every adapter's A side by side and B stacked
    (``a_all [in, sum R]``, ``b_all [sum R, out]``, the ranks), and each row keeps
    only its own adapter's columns of ``x @ a_all`` (a 0/1 mask; base-model rows
    keep none): three operations per layer whatever the number of adapters, as
    the per-adapter calls, not their arithmetic, are what costs on small ranks.
    """

    def __init__(self) -> None:
        self.groups: list[tuple[dict[str, LayerWeights], slice | torch.Tensor]] = []
        self.stacked: dict[str, tuple[torch.Tensor, torch.Tensor, tuple[int, ...]]] | None = None
        self.onehot: torch.Tensor | None = None  # [T, adapters]: which adapter each row runs
        self._masks: dict[tuple[int, ...], torch.Tensor] = {}

    def set_groups(self, groups: list, stacked: dict | None, onehot: torch.Tensor | None) -> None:
        self.groups, self.stacked, self.onehot = groups, stacked, onehot
        self._masks = {}

    def mask(self, counts: tuple[int, ...]) -> torch.Tensor:
        """[T, sum(counts)]: row t keeps the columns of its adapter (one layout per
        distinct set of ranks, shared by the layers that have it)."""
        mask = self._masks.get(counts)
        if mask is None:
            assert self.onehot is not None, "set_groups gives several adapters their one-hot rows"
            repeats = torch.tensor(counts, device=self.onehot.device)
            mask = self._masks[counts] = self.onehot.repeat_interleave(repeats, dim=1)
        return mask


def stack_adapters(adapters: list[dict[str, LayerWeights]]
                   ) -> dict[str, tuple[torch.Tensor, torch.Tensor, tuple[int, ...]]]:
    """Per layer, the adapters' A matrices side by side and their B matrices
    stacked (an adapter that leaves the layer alone contributes rank 0)."""
    stacked = {}
    for name in {n for weights in adapters for n in weights}:
        pairs = [weights.get(name) for weights in adapters]
        present = [p for p in pairs if p is not None]
        a_all = torch.cat([a for a, _ in present], dim=1)
        b_all = torch.cat([b for _, b in present], dim=0)
        counts = tuple(0 if p is None else p[0].shape[1] for p in pairs)
        stacked[name] = (a_all, b_all, counts)
    return stacked


class LoRATargets:
    """The adaptable layers of one model (this rank's shards), hooked up."""

    def __init__(self, model: nn.Module, step: StepBatch) -> None:
        self.layers: dict[str, nn.Module] = {}
        self.parts: dict[str, _Part] = {}  # checkpoint module name -> where it lives
        stacked: Sequence[tuple[str, str, Any]] = getattr(model, "stacked_params", ())
        for name, module in model.named_modules():
            if not isinstance(module, (ColumnParallelLinear, RowParallelLinear)):
                continue
            self.layers[name] = module
            module.lora = LoRALayer(name, step)
            dotted = f".{name}."
            fused = [(ours, ckpt, shard) for ours, ckpt, shard in stacked if ours in dotted]
            if not fused:
                self.parts[name] = _Part(name, None)
            for ours, ckpt_part, shard in fused:
                self.parts[dotted.replace(ours, ckpt_part).strip(".")] = _Part(name, shard)
        self.short_names = sorted({n.rsplit(".", 1)[-1] for n in self.parts})

    def bind(self, adapter: PeftAdapter) -> dict[str, LayerWeights]:
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
                    bound[layer_name] = _bind_row(layer, parts)
                else:
                    assert isinstance(layer, ColumnParallelLinear)
                    bound[layer_name] = _bind_column(layer, parts)
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


def _bind_column(layer: ColumnParallelLinear,
                 parts: list[tuple[_Part, AdapterModule]]) -> LayerWeights:
    a_rows, b_cols = [], []
    for part, module in parts:
        if module.lora_a.shape[1] != layer.input_size:
            raise _Mismatch(module.name, f"lora_A takes {module.lora_a.shape[1]} input features, "
                                         f"the model's layer {layer.input_size}")
        b = torch.zeros(layer.output_size_per_partition, module.rank)
        scaled = module.lora_b.float() * module.scaling
        try:  # the base layer's loader picks and places this rank's rows of the part
            if part.shard_id is None:
                layer.weight_loader(b, scaled)
            else:  # a merged layer (qkv, gate_up): its loader takes the part's shard id
                layer.weight_loader(b, scaled, part.shard_id)  # type: ignore[call-arg]
        except ValueError as exc:
            raise _Mismatch(module.name, f"lora_B: {exc}") from None
        a_rows.append(module.lora_a.float())
        b_cols.append(b)
    a = torch.cat(a_rows)  # [R, in]
    b = torch.cat(b_cols, dim=1)  # [out_rank, R], block-diagonal over the parts
    return a.t().contiguous(), b.t().contiguous()


def _bind_row(layer: RowParallelLinear,
              parts: list[tuple[_Part, AdapterModule]]) -> LayerWeights:
    (_, module), = parts
    if module.lora_b.shape[0] != layer.output_size:
        raise _Mismatch(module.name, f"lora_B gives {module.lora_b.shape[0]} output features, "
                                     f"the model's layer {layer.output_size}")
    a = torch.zeros(module.rank, layer.input_size_per_partition)
    try:  # this rank's columns, as the base weight is split
        layer.weight_loader(a, module.lora_a.float())
    except ValueError as exc:
        raise _Mismatch(module.name, f"lora_A: {exc}") from None
    b = module.lora_b.float() * module.scaling
    return a.t().contiguous(), b.t().contiguous()
