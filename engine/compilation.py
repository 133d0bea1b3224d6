"""Optional ``torch.compile`` of the model (``compilation_config``).

``LLM(model, compilation_config={"backend": "inductor"})`` (CLI:
``--compilation-config '{"backend": "inductor"}'``) compiles the model's forward
when it is loaded (and again after a sleep-mode reload). The backend is a plugin of
group ``graph_backend`` (``engine.graph_backend_plugins``): the value is a callable
``make_backend(compilation_config) -> backend``, where ``backend`` is whatever
``torch.compile(backend=...)`` takes (a registered name or a callable). Built in:
``inductor`` (its cache under the engine's cache, so a second run reuses the
compiled code) and ``eager`` (TorchDynamo's capture, no code generation).

Attention stays outside the graphs: its inputs (the step's metadata: lists, block
tables, a per-step dict) change every step, so each layer's attention call is a
graph break and the rest of the layer is compiled with dynamic shapes.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from engine.utils import json_object_setting

logger = logging.getLogger(__name__)

CACHE_ENV = "ENGINE_COMPILE_CACHE"
COMPILATION_KEYS = ("backend", "dynamic", "cache_dir")


def compile_cache_dir(config: Any = None) -> Path:
    """Where compiled code is cached: ``compilation_config.cache_dir``, else
    ``$ENGINE_COMPILE_CACHE``, else ``~/.cache/engine/compile``."""
    chosen = getattr(config, "cache_dir", None) or os.environ.get(CACHE_ENV)
    return Path(chosen) if chosen else Path.home() / ".cache" / "engine" / "compile"


def inductor_backend(config: Any) -> str:
    """The built-in ``inductor`` graph backend: TorchInductor, with its cache
    (``TORCHINDUCTOR_CACHE_DIR``) under the engine's cache, unless the user chose
    one (``compilation_config.cache_dir`` always wins)."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    current = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    # torch writes its own default into the variable the first time it reads it
    torch_default = current is None or os.path.abspath(current) == os.path.abspath(
        default_cache_dir())
    if torch_default or getattr(config, "cache_dir", None):
        cache = compile_cache_dir(config) / "inductor"
        cache.mkdir(parents=True, exist_ok=True)
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache)
    return "inductor"


def eager_backend(config: Any) -> str:
    """The built-in ``eager`` graph backend: TorchDynamo captures the graphs and
    runs them as they are (for debugging a model under ``torch.compile``)."""
    return "eager"


def parse_compilation_config(value: dict[str, Any] | str | None) -> dict[str, Any]:
    """``compilation_config`` as a dict, from a dict or a JSON text (the CLI's).
    Raises ValueError naming the bad key or value."""
    if value is None or value == "":
        return {}
    value = json_object_setting("compilation_config", value)
    unknown = sorted(set(value) - set(COMPILATION_KEYS))
    if unknown:
        raise ValueError(f"compilation_config has unknown key(s) {', '.join(unknown)}; "
                         f"valid keys are: {', '.join(COMPILATION_KEYS)}")
    backend = value.get("backend")
    if backend is not None and not isinstance(backend, str):
        raise ValueError(f"compilation_config.backend must be a graph backend name, "
                         f"got {backend!r}")
    if not isinstance(value.get("dynamic", True), bool):
        raise ValueError(f"compilation_config.dynamic must be true or false, "
                         f"got {value['dynamic']!r}")
    return dict(value)


def resolve_graph_backend(name: str) -> Any:
    """The ``make_backend`` callable of the graph-backend plugin `name`. Raises
    ValueError listing the available ones when there is no such plugin."""
    import registry

    available = registry.load_plugins_by_group(registry.GRAPH_BACKEND_PLUGINS)
    make = available.get(name)
    if make is None:
        listing = ", ".join(repr(n) for n in sorted(available)) or "none"
        raise ValueError(f"unknown graph backend {name!r} (compilation_config.backend); "
                         f"available graph_backend plugins: {listing}")
    if not callable(make):
        raise TypeError(f"graph_backend plugin {name!r} is not callable: "
                        f"{type(make).__name__}")
    return make


def compile_model(model: Any, config: Any) -> None:
    """Compile `model`'s forward in place with the graph backend that
    ``config.backend`` names; each attention layer runs outside the graphs."""
    # lazily: the CLI imports this module to check its settings, without torch
    import torch

    from engine.attention import get_attention_layers
    from engine.ops.rotary_embedding import RotaryEmbedding

    make = resolve_graph_backend(config.backend)
    backend = make(config)
    for layer in get_attention_layers(model):
        layer.forward = torch._dynamo.disable(  # type: ignore[method-assign]
            layer.forward, recursive=True)
    for module in model.modules():
        if isinstance(module, RotaryEmbedding):  # grows its table to the step's positions
            module.cover = torch._dynamo.disable(  # type: ignore[method-assign]
                module.cover, recursive=True)
    model.compile(backend=backend, dynamic=config.dynamic)
    logger.info("model compiled lazily with graph backend %r (torch.compile backend %r)",
                config.backend, backend)
