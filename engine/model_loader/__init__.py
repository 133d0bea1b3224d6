"""Model loading: from a model (folder, GGUF file or Hub cache entry) to a built
model with its weights.

- `loader`: `load_model`, the load formats (`ModelLoader`, `register_model_loader`)
  and the ``config.json`` of a model;
- `gguf`: the GGUF reader (metadata, config, dequantized weights);
- `hf_cache`: a Hub repository id resolved to its snapshot in the local cache;
- `pooling_config`: the pooling settings of an embedding model folder.
"""

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
