"""Build a model from a Hugging Face-format folder and load its weights.

``load_model(config)``: ``config.json``'s ``architectures`` pick the class through
`ModelRegistry`; the class is built under the engine config (so its layers see the
attention backend and custom-op choices), on the platform's device and dtype, then
filled from ``*.safetensors`` (single or sharded with
``model.safetensors.index.json``), memory-mapped. Every failure names the file and,
where there is one, the tensor.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from engine.config import EngineConfig, set_current_engine_config

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
INDEX_FILE = "model.safetensors.index.json"
# show a progress bar above this many bytes of weights
PROGRESS_BAR_BYTES = 200 * 1024 * 1024

_DTYPES = {"float32": torch.float32, "float": torch.float32, "bfloat16": torch.bfloat16,
           "float16": torch.float16, "half": torch.float16}


def load_hf_config(model_dir: str | Path) -> dict[str, Any]:
    """The parsed ``config.json`` of `model_dir`. Raises FileNotFoundError when the
    folder or file is missing, ValueError naming the file when it is not a JSON
    object."""
    path = Path(model_dir) / CONFIG_FILE
    if not Path(model_dir).is_dir():
        raise FileNotFoundError(f"model folder {str(model_dir)!r} does not exist")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; a model folder needs a config.json")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read it as JSON: {e}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a JSON object, found {type(config).__name__}")
    return config


def resolve_dtype(config: EngineConfig) -> torch.dtype:
    """The dtype to build the model in. ``"auto"``: the current platform's
    `resolve_auto_dtype` of the checkpoint's dtype (a float32 model runs in the
    platform's preferred dtype: bfloat16 on a CPU with native bf16)."""
    from engine.platforms import current_platform

    name = config.model_config.dtype
    if name != "auto":
        if name not in _DTYPES:
            raise ValueError(f"dtype {name!r} is not supported. "
                             f"Valid options are: auto, {', '.join(_DTYPES)}")
        return _DTYPES[name]
    hf = config.model_config.hf_config
    checkpoint = str(hf.get("torch_dtype") or hf.get("dtype") or "float32")
    checkpoint = str(_DTYPES.get(checkpoint, torch.float32)).removeprefix("torch.")
    return _DTYPES[current_platform.resolve_auto_dtype(checkpoint)]


def weight_files(model_dir: str | Path) -> list[Path]:
    """The safetensors files of `model_dir`: those named by the shard index when
    there is one, else every ``*.safetensors``. Raises FileNotFoundError when none
    exist or the index names a missing shard."""
    model_dir = Path(model_dir)
    index = model_dir / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{index}: not a safetensors index (needs 'weight_map'): {e}") from None
        files = [model_dir / name for name in sorted(set(weight_map.values()))]
        for file in files:
            if not file.is_file():
                raise FileNotFoundError(f"{file}: missing; it is named in {index}")
        return files
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{model_dir}: no *.safetensors weight files")
    return files


class _WeightStream:
    """Iterates ``(name, tensor)`` over safetensors files, remembering the file
    being read so errors can name it."""

    def __init__(self, files: list[Path]) -> None:
        self.files = files
        self.current: Path | None = None
        self.finished = False

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        from safetensors import safe_open
        from tqdm import tqdm

        total = sum(f.stat().st_size for f in self.files)
        with tqdm(total=total, unit="B", unit_scale=True, desc="Loading weights",
                  disable=None if total > PROGRESS_BAR_BYTES else True) as bar:
            for file in self.files:
                self.current = file
                try:
                    handle = safe_open(str(file), framework="pt", device="cpu")
                except OSError:
                    raise
                except Exception as e:
                    raise ValueError(f"{file}: cannot read safetensors file: {e}") from None
                with handle:
                    for name in handle.keys():
                        tensor = handle.get_tensor(name)
                        bar.update(tensor.nbytes)
                        yield name, tensor
        self.finished = True


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def load_model(config: EngineConfig) -> nn.Module:
    """Build and load the model of ``config.model_config.model`` (fills in
    ``model_config.hf_config`` when empty). Returns it in eval mode on
    ``config.device_config.device``.

    Raises FileNotFoundError for a missing folder / config.json / weights file;
    ValueError for an unknown architecture (``... are not supported ...``), an
    unreadable file, a missing or unexpected tensor, or a shape mismatch."""
    from engine.models import ModelRegistry

    model_config = config.model_config
    model_dir = Path(model_config.model)
    if not model_config.hf_config:
        model_config.hf_config = load_hf_config(model_dir)
    architectures = model_config.hf_config.get("architectures") or []
    if not architectures:
        raise ValueError(f"{model_dir / CONFIG_FILE}: no 'architectures' entry names the model class")
    model_cls, arch = ModelRegistry.load_model_cls(architectures)
    files = weight_files(model_dir)
    dtype = resolve_dtype(config)
    device = torch.device(config.device_config.device)
    logger.info("building %s (%s) in %s on %s", arch, model_cls.__qualname__, dtype, device)
    with set_current_engine_config(config), _default_dtype(dtype), device:
        model = model_cls(config=config, prefix="")
    stream = _WeightStream(files)
    try:
        model.load_weights(iter(stream))
    except ValueError as e:
        where = model_dir if stream.finished or stream.current is None else stream.current
        raise ValueError(f"{where}: {e}") from None
    return model.requires_grad_(False).eval()
