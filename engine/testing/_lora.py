"""The kit's LoRA check of a platform that claims LoRA (its worker implements
``add_lora``, ``remove_lora``, ``list_loras`` and ``pin_lora``): greedy tokens of
one batch mixing an adapter's requests and the base model's, in float32 on the
default model, equal the ``cpu`` platform's.

The adapter is written by the kit in PEFT's format (``adapter_config.json`` +
``adapter_model.safetensors``): rank 8 on every projection of the default model,
random from a fixed seed and large enough that it changes the cpu platform's
greedy tokens (checked, so a platform that ignores adapters cannot pass).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from engine.testing._core import CheckFailed, CheckSkipped, KitContext
from engine.testing._e2e import PROMPTS, run_engine
from engine.testing._setup import kit_engine_config, platform_cls

RANK = 8
PROJECTIONS = {"self_attn": ("q_proj", "k_proj", "v_proj", "o_proj"),
               "mlp": ("gate_proj", "up_proj", "down_proj")}


def write_adapter(folder: Path) -> Path:
    """A random rank-`RANK` PEFT adapter for the default model in `folder`."""
    import torch
    from safetensors.torch import save_file

    from engine.engine_args import default_model_dir

    config = json.loads((default_model_dir() / "config.json").read_text())
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    head_dim = config.get("head_dim") or hidden // config["num_attention_heads"]
    q, kv = config["num_attention_heads"] * head_dim, config["num_key_value_heads"] * head_dim
    shapes = {"q_proj": (hidden, q), "k_proj": (hidden, kv), "v_proj": (hidden, kv),
              "o_proj": (q, hidden), "gate_proj": (hidden, inter), "up_proj": (hidden, inter),
              "down_proj": (inter, hidden)}
    gen = torch.Generator().manual_seed(23)
    tensors = {}
    for layer in range(config["num_hidden_layers"]):
        for block, names in PROJECTIONS.items():
            for name in names:
                fan_in, fan_out = shapes[name]
                key = f"base_model.model.model.layers.{layer}.{block}.{name}"
                tensors[f"{key}.lora_A.weight"] = torch.randn(RANK, fan_in, generator=gen) * 0.1
                tensors[f"{key}.lora_B.weight"] = torch.randn(fan_out, RANK, generator=gen) * 0.1
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": RANK, "lora_alpha": 2 * RANK,
        "target_modules": [n for names in PROJECTIONS.values() for n in names]}))
    return folder


def _missing_lora_methods(ctx: KitContext, name: str) -> list[str]:
    import registry
    from engine.lora.engine_side import LORA_WORKER_METHODS
    from engine.worker import WorkerBase

    config = kit_engine_config()
    cls: Any = platform_cls(ctx, name)
    cls.check_and_update_config(config)
    try:
        worker = registry.resolve_qualname(config.parallel_config.worker_cls)
    except Exception as exc:
        raise CheckSkipped(f"worker_cls cannot be imported ({exc}); see the "
                           "check_and_update_config check") from None
    return [m for m in LORA_WORKER_METHODS
            if getattr(worker, m, None) in (None, getattr(WorkerBase, m))]


def check_lora_vs_cpu(ctx: KitContext, name: str) -> None:
    """Fail when the platform's greedy tokens with an adapter (mixed with the base
    model in one batch) differ from the cpu platform's; skipped when the
    platform's worker does not implement LoRA."""
    cls: Any = platform_cls(ctx, name)
    missing = _missing_lora_methods(ctx, name)
    if missing:
        raise CheckSkipped(f"the platform's worker does not implement {', '.join(missing)}: "
                           "it does not claim LoRA")
    if not cls.supports_dtype("float32"):
        raise CheckSkipped(f"{cls.__qualname__}.supported_dtypes excludes float32, the dtype "
                           "greedy tokens are compared in")

    def runs() -> tuple[dict[str, Any], dict[str, Any]]:
        with tempfile.TemporaryDirectory(prefix="engine-kit-lora-") as tmp:
            adapter = str(write_adapter(Path(tmp) / "kit-adapter"))
            return (run_engine(name, lora_path=adapter), run_engine("cpu", lora_path=adapter))

    plugin, cpu = ctx.memo(("lora_runs", name), runs)
    n = len(PROMPTS)
    if cpu["tokens"][:n] == cpu["tokens"][n:]:
        raise CheckFailed("the kit's adapter leaves the cpu platform's greedy tokens as the "
                          "base model's: the check could not tell LoRA from no LoRA")
    for i, (got, expected) in enumerate(zip(plugin["tokens"], cpu["tokens"], strict=True)):
        if got != expected:
            which = "the adapter" if i < n else "the base model"
            at = next((j for j, (g, e) in enumerate(zip(got, expected, strict=False)) if g != e),
                      min(len(got), len(expected)))
            raise CheckFailed(
                f"prompt {PROMPTS[i % n]!r} on {which} (batched with the other's requests): "
                f"greedy token {at} is {got[at:at + 1]} on {name!r} and {expected[at:at + 1]} "
                f"on 'cpu' (dtype float32, default model, a rank-{RANK} adapter on every "
                f"projection); {name!r} gave {got}, cpu {expected}")
