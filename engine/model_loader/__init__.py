"""Model loading: from a model (folder, GGUF file or Hub cache entry) to a built
model with its weights.

- `loader`: `load_model`, the load formats (`ModelLoader`, `register_model_loader`)
  and the ``config.json`` of a model;
- `gguf`: the GGUF reader (metadata, config, dequantized weights);
- `hf_cache`: a Hub repository id resolved to its snapshot in the local cache;
- `pooling_config`: the pooling settings of an embedding model folder.

Importing this package (or `hf_cache`) imports no torch: a CLI command can say that
a model does not exist before it pays for torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from engine._lazy import lazy_exports

_LAZY = {
    "CONFIG_FILE": "engine.model_loader.loader",
    "INDEX_FILE": "engine.model_loader.loader",
    "PT_INDEX_FILE": "engine.model_loader.loader",
    "GGUFLoader": "engine.model_loader.loader",
    "ModelLoader": "engine.model_loader.loader",
    "PtLoader": "engine.model_loader.loader",
    "SafetensorsLoader": "engine.model_loader.loader",
    "apply_loader_registrations": "engine.model_loader.loader",
    "get_model_loader": "engine.model_loader.loader",
    "load_hf_config": "engine.model_loader.loader",
    "load_model": "engine.model_loader.loader",
    "loader_registrations_for_workers": "engine.model_loader.loader",
    "read_config_json": "engine.model_loader.loader",
    "register_model_loader": "engine.model_loader.loader",
    "resolve_dtype": "engine.model_loader.loader",
    "weight_files": "engine.model_loader.loader",
}

__all__ = [
    "CONFIG_FILE",
    "GGUFLoader",
    "INDEX_FILE",
    "ModelLoader",
    "PT_INDEX_FILE",
    "PtLoader",
    "SafetensorsLoader",
    "apply_loader_registrations",
    "get_model_loader",
    "load_hf_config",
    "load_model",
    "loader_registrations_for_workers",
    "read_config_json",
    "register_model_loader",
    "resolve_dtype",
    "weight_files",
]

if TYPE_CHECKING:  # pragma: no cover
    from engine.model_loader.loader import (
        CONFIG_FILE,
        INDEX_FILE,
        PT_INDEX_FILE,
        GGUFLoader,
        ModelLoader,
        PtLoader,
        SafetensorsLoader,
        apply_loader_registrations,
        get_model_loader,
        load_hf_config,
        load_model,
        loader_registrations_for_workers,
        read_config_json,
        register_model_loader,
        resolve_dtype,
        weight_files,
    )

__getattr__, __dir__ = lazy_exports(__name__, _LAZY, globals())
