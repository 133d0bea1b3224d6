"""Weight loading shared by the in-tree models."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.nn as nn

from engine.ops.linear import copy_checked

# (fragment of our fused parameter's name, fragment of the checkpoint's name, shard id)
StackedParams = Sequence[tuple[str, str, Any]]


def default_weight_loader(param: torch.Tensor, loaded: torch.Tensor) -> None:
    copy_checked(param, loaded)


def load_stacked_weights(
    model: nn.Module,
    weights: Iterable[tuple[str, torch.Tensor]],
    stacked: StackedParams = (),
    rename: Callable[[str], str | None] = lambda name: name,
) -> set[str]:
    """Copy checkpoint tensors into `model`'s parameters and return the names of
    the parameters loaded.

    A checkpoint name containing a `stacked` checkpoint fragment goes into the
    fused parameter with the shard id (e.g. ``q_proj`` -> ``qkv_proj``, "q").
    `rename` maps a checkpoint name to a parameter name, or to None to skip it.
    Raises ValueError naming the tensor for an unexpected tensor or a shape
    mismatch, and naming every absent tensor when the checkpoint lacks some."""
    params = dict(model.named_parameters())
    loaded: dict[str, set[Any]] = {}
    for ckpt_name, tensor in weights:
        name = rename(ckpt_name)
        if name is None:
            continue
        shard_id = None
        for param_part, ckpt_part, shard in stacked:
            if ckpt_part in name:
                name, shard_id = name.replace(ckpt_part, param_part), shard
                break
        param = params.get(name)
        if param is None:
            raise ValueError(f"unexpected tensor {ckpt_name!r}: the model has no parameter {name!r}")
        loader: Callable[..., None] = getattr(param, "weight_loader", default_weight_loader)
        try:
            if shard_id is None:
                loader(param, tensor)
            else:
                loader(param, tensor, shard_id)
        except ValueError as e:
            raise ValueError(f"tensor {ckpt_name!r}: {e}") from None
        loaded.setdefault(name, set()).add(shard_id)
    missing = _missing_tensors(params, loaded, stacked)
    if missing:
        shown = ", ".join(repr(m) for m in missing[:8])
        more = f" and {len(missing) - 8} more" if len(missing) > 8 else ""
        raise ValueError(f"missing tensor(s) in the checkpoint: {shown}{more}")
    return set(loaded)


def _missing_tensors(params: dict[str, nn.Parameter], loaded: dict[str, set[Any]],
                     stacked: StackedParams) -> list[str]:
    """Checkpoint names of what was never loaded (fused parameters by shard)."""
    missing = []
    for name in params:
        parts = [(p, c, s) for p, c, s in stacked if p in name]
        if not parts:
            if name not in loaded:
                missing.append(name)
            continue
        have = loaded.get(name, set())
        if None in have:  # the checkpoint held the fused tensor itself
            continue
        missing.extend(name.replace(p, c) for p, c, s in parts if s not in have)
    return missing
