"""Reading a LoRA adapter in PEFT's format.

An adapter folder holds ``adapter_config.json`` (rank ``r``, ``lora_alpha``,
``use_rslora``, ``target_modules``, per-module ``rank_pattern`` /
``alpha_pattern``) and ``adapter_model.safetensors`` with one pair of tensors per
adapted linear layer: ``<module>.lora_A.weight`` [r, in] and
``<module>.lora_B.weight`` [out, r], where ``<module>`` is the layer's name in the
base model behind PEFT's ``base_model.model.`` prefix. The layer computes
``W x + scaling * B (A x)`` with ``scaling = lora_alpha / r`` (``lora_alpha /
sqrt(r)`` with rsLoRA), as PEFT does.

`read_adapter` checks what can be checked without the model (files, fields,
ranks); `engine.lora.layers` checks the rest against the model's layers.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from engine.lora.request import LoRARequest

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."
_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")


class LoRAAdapterError(ValueError):
    """An adapter that cannot be served: the message names the adapter, and the
    file or field at fault. A ValueError, so a server answers it with 400."""


@dataclass
class AdapterModule:
    """One adapted linear layer, as the checkpoint has it (full, unsharded)."""

    name: str  # the base model's module name, e.g. model.layers.0.self_attn.q_proj
    lora_a: torch.Tensor  # [r, in]
    lora_b: torch.Tensor  # [out, r]
    scaling: float

    @property
    def rank(self) -> int:
        return self.lora_a.shape[0]


@dataclass
class PeftAdapter:
    """An adapter read from disk, checked against the engine's limits only."""

    request: LoRARequest
    config: dict[str, Any]
    modules: dict[str, AdapterModule] = field(default_factory=dict)

    def error(self, message: str) -> LoRAAdapterError:
        return adapter_error(self.request, message)


def adapter_error(request: LoRARequest, message: str) -> LoRAAdapterError:
    return LoRAAdapterError(f"LoRA adapter {request.name!r} ({request.path}): {message}")


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """PEFT's per-module override: a pattern key names a module by its full
    dotted name or any dotted suffix of it (a regular expression)."""
    for key, value in patterns.items():
        if re.fullmatch(rf"(.*\.)?(?:{key})", module):
            return value
    return default


# adapter_config.json fields whose non-default values change what the layer
# computes in ways this engine does not implement; refused by name
_UNSUPPORTED: tuple[tuple[str, tuple[object, ...], str], ...] = (
    ("use_dora", (None, False), "DoRA adapters are not supported"),
    ("fan_in_fan_out", (None, False), "fan_in_fan_out adapters (Conv1D layers) are not supported"),
    ("bias", (None, "none"), "adapters that train biases are not supported"),
    ("lora_bias", (None, False), "adapters with a LoRA bias are not supported"),
    ("modules_to_save", (None, []), "adapters that replace whole modules are not supported"),
    ("layer_replication", (None, []), "layer replication is not supported"),
    ("trainable_token_indices", (None, [], {}), "trainable tokens are not supported"),
)


def read_adapter(request: LoRARequest, max_lora_rank: int) -> PeftAdapter:
    """Read and check the adapter folder of `request`.

    Raises `LoRAAdapterError` naming the adapter and the file or field: missing
    or unreadable files, a PEFT type other than LORA, an unsupported feature, a
    rank above `max_lora_rank`, tensors that do not pair up."""
    folder = Path(request.path)
    if not folder.is_dir():
        raise adapter_error(request, "the adapter folder does not exist")
    config_path = folder / CONFIG_FILE
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise adapter_error(request, f"{CONFIG_FILE} is missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise adapter_error(request, f"{CONFIG_FILE} is not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise adapter_error(request, f"{CONFIG_FILE} must hold a JSON object")
    adapter = PeftAdapter(request, config)
    peft_type = config.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise adapter.error(f"{CONFIG_FILE}: peft_type {peft_type!r} is not supported "
                            "(only 'LORA')")
    for key, defaults, why in _UNSUPPORTED:
        if config.get(key) not in defaults:
            raise adapter.error(f"{CONFIG_FILE}: {key}={config[key]!r}: {why}")
    rank = _positive_number(adapter, "r", int)
    alpha = _positive_number(adapter, "lora_alpha", (int, float), default=rank)
    if rank > max_lora_rank:
        raise adapter.error(f"{CONFIG_FILE}: r={rank} is larger than max_lora_rank="
                            f"{max_lora_rank}; raise max_lora_rank")
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    for key, pattern in (("rank_pattern", rank_pattern), ("alpha_pattern", alpha_pattern)):
        if not isinstance(pattern, dict):
            raise adapter.error(f"{CONFIG_FILE}: {key} must be an object")
    use_rslora = bool(config.get("use_rslora", False))

    tensors = _read_weights(adapter, folder / WEIGHTS_FILE)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = _KEY.match(key)
        if match is None:
            raise adapter.error(f"{WEIGHTS_FILE}: tensor {key!r} is not a LoRA A or B weight")
        module = match["module"].removeprefix(_PEFT_PREFIX)
        pairs.setdefault(module, {})[match["ab"]] = tensor
    if not pairs:
        raise adapter.error(f"{WEIGHTS_FILE} holds no LoRA weights")
    for module, pair in sorted(pairs.items()):
        if set(pair) != {"A", "B"}:
            lacking = "lora_B" if "A" in pair else "lora_A"
            raise adapter.error(f"{WEIGHTS_FILE}: module {module!r} has no {lacking} weight")
        lora_a, lora_b = pair["A"], pair["B"]
        if lora_a.dim() != 2 or lora_b.dim() != 2 or lora_b.shape[1] != lora_a.shape[0]:
            raise adapter.error(
                f"{WEIGHTS_FILE}: module {module!r}: lora_A {list(lora_a.shape)} and lora_B "
                f"{list(lora_b.shape)} are not a rank-r pair ([r, in] and [out, r])")
        module_rank = lora_a.shape[0]
        if module_rank > max_lora_rank:
            raise adapter.error(
                f"module {module!r} has rank {module_rank} (r / rank_pattern), larger than "
                f"max_lora_rank={max_lora_rank}; raise max_lora_rank")
        module_alpha = float(_pattern_value(alpha_pattern, module, alpha))
        r = int(_pattern_value(rank_pattern, module, rank))
        scaling = module_alpha / (math.sqrt(r) if use_rslora else r)
        adapter.modules[module] = AdapterModule(module, lora_a, lora_b, scaling)
    return adapter


def target_module_names(adapter: PeftAdapter) -> list[str]:
    """The short names ``target_modules`` lists (q_proj, ...); [] when it is a
    regular expression or absent (the tensors then say which modules)."""
    targets = adapter.config.get("target_modules")
    if isinstance(targets, list):
        return [str(t) for t in targets]
    return []


def _positive_number(adapter: PeftAdapter, key: str, kind: Any, default: Any = None) -> Any:
    value = adapter.config.get(key, default)
    if value is None or isinstance(value, bool) or not isinstance(value, kind) or value <= 0:
        raise adapter.error(f"{CONFIG_FILE}: {key} must be a positive number, got {value!r}")
    return value


def _read_weights(adapter: PeftAdapter, path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise adapter.error(f"{WEIGHTS_FILE} is missing")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise adapter.error(f"{WEIGHTS_FILE} cannot be read (corrupt or not safetensors): "
                            f"{exc}") from None
