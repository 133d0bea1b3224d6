"""The pooling config of an embedding model folder.

A sentence-transformers folder's own files decide, as sentence-transformers does:
``modules.json`` lists the modules (a ``Normalize`` module means L2-normalise),
the Pooling module's ``config.json`` picks the pooling mode, and
``sentence_bert_config.json`` the maximum sequence length. A plain encoder folder
gets mean pooling without normalisation.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.utils import read_json_file

POOLING_MODES = ("mean", "cls", "max", "mean_sqrt_len", "lasttoken")
# sentence-transformers' Pooling config keys -> our mode names
_MODE_KEYS = {
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len",
    "pooling_mode_lasttoken": "lasttoken",
}


@dataclass
class PoolingConfig:
    mode: str = "mean"
    normalize: bool = False
    max_seq_length: int | None = None
    do_lower_case: bool = False


def load_pooling_config(model_dir: str | Path) -> PoolingConfig:
    """The pooling settings of `model_dir`. Raises ValueError naming the file when
    one of the sentence-transformers files is unreadable or asks for something
    unsupported."""
    model_dir = Path(model_dir)
    config = PoolingConfig()
    pooling_dir = model_dir / "1_Pooling"
    modules_file = model_dir / "modules.json"
    if modules_file.is_file():
        modules = read_json_file(modules_file, list)
        for module in modules:
            kind = str(module.get("type", ""))
            if kind.endswith(".Pooling"):
                pooling_dir = model_dir / module.get("path", "")
            elif kind.endswith(".Normalize"):
                config.normalize = True
    pooling_file = pooling_dir / "config.json"
    if pooling_dir != model_dir and pooling_file.is_file():
        config.mode = _pooling_mode(pooling_file, read_json_file(pooling_file))
    st_file = model_dir / "sentence_bert_config.json"
    if st_file.is_file():
        st = read_json_file(st_file)
        if st.get("max_seq_length") is not None:
            config.max_seq_length = int(st["max_seq_length"])
        config.do_lower_case = bool(st.get("do_lower_case", False))
    return config


def _pooling_mode(path: Path, pooling: dict[str, Any]) -> str:
    if "pooling_mode" in pooling:  # newer single-key form
        mode = {"mean_tokens": "mean", "cls_token": "cls", "max_tokens": "max",
                "mean_sqrt_len_tokens": "mean_sqrt_len"}.get(pooling["pooling_mode"],
                                                              pooling["pooling_mode"])
        modes = [mode]
    else:
        modes = [mode for key, mode in _MODE_KEYS.items() if pooling.get(key)]
    if len(modes) != 1 or modes[0] not in POOLING_MODES:
        raise ValueError(
            f"{path}: exactly one supported pooling mode must be on, found {modes or 'none'}. "
            f"Valid options are: {', '.join(POOLING_MODES)}"
        )
    return modes[0]
