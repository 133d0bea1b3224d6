"""Build a model and load its weights, through a pluggable load format.

``load_model(config)``: the model's config (``config.json``, or a GGUF file's
metadata) names the architecture, whose class comes from `ModelRegistry`; the
class is built under the engine config (so its layers see the attention backend
and custom-op choices), on the platform's device and dtype, then filled from the
weights of ``config.model_config.load_format``:

- ``"safetensors"``: ``*.safetensors`` (single or sharded with
  ``model.safetensors.index.json``), memory-mapped;
- ``"pt"``: torch files (``*.bin``, ``*.pt``, ``*.pth``, or a
  ``pytorch_model.bin.index.json``), loaded with ``weights_only=True``;
- ``"gguf"``: a ``.gguf`` file, or a folder holding exactly one: config,
  tokenizer and dequantized weights all come from it (`engine.model_loader.gguf`);
- ``"auto"`` (default): the first of those that the path holds;
- any format added with `register_model_loader(format, cls_or_"module:Class")`,
  a `ModelLoader` subclass.

Every failure names the file and, where there is one, the tensor.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from engine.config import EngineConfig, set_current_engine_config
from engine.model_loader.gguf import GGUFFile, find_gguf_file
from engine.quantization import (
    NO_QUANTIZATION,
    allow_quantized_activations,
    finish_quantized_layers,
    get_quantization_method,
    gguf_method,
    quantize_model,
)
from engine.utils import read_json_file, worker_importable_name

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
INDEX_FILE = "model.safetensors.index.json"
# show a progress bar above this many bytes of weights
PROGRESS_BAR_BYTES = 200 * 1024 * 1024

_DTYPES = {"float32": torch.float32, "float": torch.float32, "bfloat16": torch.bfloat16,
           "float16": torch.float16, "half": torch.float16}


def load_hf_config(model: str | Path, load_format: str = "auto") -> dict[str, Any]:
    """The model's config as a ``config.json`` dict: the folder's ``config.json``,
    or the metadata of a GGUF model (see `get_model_loader`). Raises
    FileNotFoundError when the path or its config is missing, ValueError naming
    the file when it cannot be read, or for an unknown `load_format`."""
    path = Path(model)
    if not path.exists():
        raise FileNotFoundError(f"model {str(model)!r} does not exist")
    return get_model_loader(load_format, path).load_config(path)


def read_config_json(model_dir: str | Path) -> dict[str, Any]:
    """The parsed ``config.json`` of the folder `model_dir`. Raises
    FileNotFoundError when the folder or file is missing, ValueError naming the
    file when it is not a JSON object."""
    path = Path(model_dir) / CONFIG_FILE
    if not Path(model_dir).is_dir():
        raise FileNotFoundError(f"model folder {str(model_dir)!r} does not exist")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing; a model folder needs a config.json")
    return read_json_file(path)


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

        with _progress_bar(sum(f.stat().st_size for f in self.files)) as bar:
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


def _progress_bar(total_bytes: int, threshold: int = PROGRESS_BAR_BYTES) -> Any:
    """A "Loading weights" bar over `total_bytes`, shown on a terminal only (tqdm's
    ``disable=None``) and only above `threshold` bytes, where loading takes a moment."""
    from tqdm import tqdm

    return tqdm(total=total_bytes, unit="B", unit_scale=True, desc="Loading weights",
                disable=None if total_bytes > threshold else True)


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


# ---------------------------------------------------------------------- formats


class ModelLoader:
    """A load format: where a model's config and weights come from.

    Subclass it and register it with `register_model_loader(format, cls)`. The
    engine builds it with no arguments and calls `load_config(path)` (in the
    process that builds the engine) and `iter_weights(path, hf_config)` (in each
    worker); `can_load(path)` lets ``load_format="auto"`` pick it.
    """

    def can_load(self, path: Path) -> bool:
        """True when `path` holds a model in this format; False by default (the
        format is then only used when named)."""
        return False

    def load_config(self, path: Path) -> dict[str, Any]:
        """The model's ``config.json`` dict; by default the folder's ``config.json``."""
        return read_config_json(path)

    def iter_weights(self, path: Path, hf_config: dict[str, Any]) -> Iterable[tuple[str, torch.Tensor]]:
        """``(Hugging Face tensor name, tensor)`` for every weight of the model."""
        raise NotImplementedError(f"{type(self).__qualname__}.iter_weights")


class SafetensorsLoader(ModelLoader):
    """``*.safetensors`` files, memory-mapped (sharded with an index or not)."""

    def can_load(self, path: Path) -> bool:
        return path.is_dir() and ((path / INDEX_FILE).is_file() or any(path.glob("*.safetensors")))

    def iter_weights(self, path: Path, hf_config: dict[str, Any]) -> Iterator[tuple[str, torch.Tensor]]:
        return _WeightStream(weight_files(path))  # iterable; remembers the file being read


# config.json sizes checked against a Hugging Face-layout checkpoint before the
# model is built: (field, tensor, dimension of that tensor)
_CHECKED_SHAPES = (("vocab_size", "model.embed_tokens.weight", 0),
                   ("hidden_size", "model.embed_tokens.weight", 1))
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


def check_config_against_checkpoint(path: Path, hf_config: dict[str, Any]) -> None:
    """Check ``config.json``'s layer count, vocabulary and hidden sizes against
    the tensors a safetensors checkpoint holds (read from the file headers:
    nothing is loaded), so that a config that does not match fails before the
    model is built (``num_hidden_layers: 100000`` would otherwise allocate all
    those layers first). Checkpoints without Hugging Face's Llama-style names
    are left to the model's own loading. Raises ValueError naming the file and
    the field."""
    from safetensors import safe_open

    shapes: dict[str, list[int]] = {}
    layers: set[int] = set()
    for file in weight_files(path):
        if not file.is_file():
            return  # the loader names the missing file
        try:
            with safe_open(str(file), framework="pt", device="cpu") as handle:
                for name in handle.keys():
                    match = _LAYER.match(name)
                    if match:
                        layers.add(int(match.group(1)))
                    elif name == "model.embed_tokens.weight":
                        shapes[name] = list(handle.get_slice(name).get_shape())
        except Exception:
            return  # an unreadable file: the loader says what is wrong with it
    config_file = path / CONFIG_FILE
    expected = hf_config.get("num_hidden_layers")
    if layers and isinstance(expected, int) and expected != max(layers) + 1:
        raise ValueError(f"{config_file}: num_hidden_layers is {expected}, but the checkpoint "
                         f"holds {max(layers) + 1} layers (model.layers.0 .. {max(layers)})")
    for field, tensor, dim in _CHECKED_SHAPES:
        value = hf_config.get(field)
        shape = shapes.get(tensor)
        if shape is not None and isinstance(value, int) and len(shape) > dim \
                and shape[dim] != value:
            raise ValueError(f"{config_file}: {field} is {value}, but the checkpoint's "
                             f"{tensor} has {shape[dim]} (shape {shape})")


def check_config_fits_memory(path: Path, hf_config: dict[str, Any], max_model_len: int | None,
                             dtype: torch.dtype) -> None:
    """Estimate what building the model allocates from its config (embeddings,
    decoder layers, the rotary table of `max_model_len` positions) and raise
    ValueError naming the file and the field that dominates when it is more
    than the machine's memory, before anything is allocated (a ``vocab_size``
    of 10**12 would otherwise end in an allocator traceback)."""
    def number(name: str, default: int = 0) -> int:
        value = hf_config.get(name, default)
        return value if isinstance(value, int) and not isinstance(value, bool) else default

    hidden, vocab = number("hidden_size"), number("vocab_size")
    layers, inter = number("num_hidden_layers"), number("intermediate_size", 4 * hidden)
    heads = max(1, number("num_attention_heads", 1))
    head_dim = number("head_dim") or hidden // heads
    positions = max_model_len or number("max_position_embeddings")
    size = torch.tensor([], dtype=dtype).element_size()
    untied = 1 if hf_config.get("tie_word_embeddings") else 2
    parts = {
        "vocab_size": vocab * hidden * size * untied,
        "num_hidden_layers": layers * (4 * hidden * hidden + 3 * hidden * inter) * size,
        "max_position_embeddings": positions * head_dim * 4,  # float32 cos and sin
    }
    total = sum(parts.values())
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if total > memory:
        field = max(parts, key=parts.__getitem__)
        what = {"vocab_size": f"vocab_size {vocab} x hidden_size {hidden}",
                "num_hidden_layers": f"num_hidden_layers {layers} of hidden_size {hidden}",
                "max_position_embeddings": f"a context of {positions} positions (pass a "
                                           "smaller max_model_len)"}[field]
        raise ValueError(f"{path / CONFIG_FILE}: {field}: building this model needs about "
                         f"{total / 2**30:.1f} GiB ({what}), more than this machine's "
                         f"{memory / 2**30:.1f} GiB of memory")


PT_INDEX_FILE = "pytorch_model.bin.index.json"
_PT_PATTERNS = ("*.bin", "*.pt", "*.pth")


class PtLoader(ModelLoader):
    """Torch files (``pytorch_model.bin``, shards named by
    ``pytorch_model.bin.index.json``, ``*.pt``), read with ``weights_only=True``
    so a file cannot run code."""

    def can_load(self, path: Path) -> bool:
        return path.is_dir() and bool(self._files(path, strict=False))

    @staticmethod
    def _files(path: Path, strict: bool = True) -> list[Path]:
        index = path / PT_INDEX_FILE
        if index.is_file():
            try:
                names = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError,
                    AttributeError) as e:
                raise ValueError(f"{index}: not a weight index (needs 'weight_map'): {e}") from None
            return [path / n for n in names]
        files = sorted({f for pattern in _PT_PATTERNS for f in path.glob(pattern)})
        if not files and strict:
            raise FileNotFoundError(f"{path}: no torch weight files ({', '.join(_PT_PATTERNS)})")
        return files

    def iter_weights(self, path: Path, hf_config: dict[str, Any]) -> Iterator[tuple[str, torch.Tensor]]:
        for file in self._files(path):
            if not file.is_file():
                raise FileNotFoundError(f"{file}: missing; it is named in {path / PT_INDEX_FILE}")
            try:
                state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:
                raise ValueError(f"{file}: cannot load with torch.load(weights_only=True): {e}") from None
            if not isinstance(state, dict) or not all(
                isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
            ):
                raise ValueError(f"{file}: expected a dict of tensor name -> tensor (a state dict)")
            yield from state.items()


class GGUFLoader(ModelLoader):
    """A ``.gguf`` file, or a folder holding exactly one (see `engine.model_loader.gguf`)."""

    def can_load(self, path: Path) -> bool:
        return find_gguf_file(path) is not None

    def _file(self, path: Path) -> Path:
        file = find_gguf_file(path)
        if file is None:
            raise FileNotFoundError(f"{path}: not a .gguf file nor a folder holding one")
        return file

    def load_config(self, path: Path) -> dict[str, Any]:
        return GGUFFile.open(self._file(path)).hf_config()

    def iter_weights(self, path: Path, hf_config: dict[str, Any],
                     quantization: str | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """The file's tensors; those of a type a quantization method serves stay
        in their blocks (`engine.quantization`): any such type when
        `quantization` is None, only the named method's, none for ``"none"``."""
        if quantization is None:
            # one plugin look-up per tensor type, not per tensor: each look-up imports
            # the quantization group's plugins again
            keep = functools.cache(gguf_method)
        elif quantization == NO_QUANTIZATION:
            keep = None
        else:
            named = get_quantization_method(quantization)
            keep = lambda tensor_type: named if named.gguf_type == tensor_type else None  # noqa: E731
        file = GGUFFile.open(self._file(path))
        # dequantizing a byte costs several times reading one: a lower threshold
        with _progress_bar(file.nbytes, PROGRESS_BAR_BYTES // 4) as bar:
            yield from file.weights(hf_config, progress=bar.update, keep_quantized=keep)
        del file
        GGUFFile.release_cached()  # config and tokenizer were read before the weights


_QUALNAME = re.compile(r"^[A-Za-z_][\w.]*[:.][A-Za-z_][\w.]*$")
# format -> ModelLoader subclass or "module:Class"; built-ins first ("auto" tries them in order)
_BUILTIN_LOADERS: dict[str, type[ModelLoader]] = {
    "safetensors": SafetensorsLoader,
    "gguf": GGUFLoader,
    "pt": PtLoader,
}
_LOADERS: dict[str, type[ModelLoader] | str] = dict(_BUILTIN_LOADERS)


def register_model_loader(load_format: str, loader: type[ModelLoader] | str) -> None:
    """Add (or replace) the load format `load_format`: a `ModelLoader` subclass
    or a lazy ``"module:Class"`` name, imported when first used. Call it from a
    general plugin, or in your script before building the engine (worker
    processes get it too). Raises ValueError for a bad name or value."""
    if not isinstance(load_format, str) or not load_format or load_format == "auto":
        raise ValueError(f"load format must be a non-empty name other than 'auto', not {load_format!r}")
    if isinstance(loader, str):
        if not _QUALNAME.match(loader):
            raise ValueError(f"model loader for {load_format!r} must be a ModelLoader subclass or "
                             f"a 'module:Class' string, not {loader!r}")
    elif not (isinstance(loader, type) and issubclass(loader, ModelLoader)):
        raise ValueError(f"model loader for {load_format!r} must be a ModelLoader subclass or a "
                         f"'module:Class' string, not {loader!r}")
    if _LOADERS.get(load_format) is not loader:
        import registry

        module = loader.partition(":")[0] if isinstance(loader, str) else loader.__module__
        registry.record_effect("model_loader", load_format, module=module)
    if load_format in _LOADERS and _LOADERS[load_format] is not loader:
        logger.info("load format %r: %r replaces %r", load_format, loader, _LOADERS[load_format])
    _LOADERS[load_format] = loader


def get_model_loader(load_format: str, path: str | Path) -> ModelLoader:
    """The loader of `load_format` for `path` (``"auto"``: the first format,
    built-ins first, whose loader `can_load` the path). Raises ValueError naming
    the valid formats for an unknown one, or naming the path when ``"auto"``
    finds none."""
    path = Path(path)
    if load_format == "auto":
        if not path.exists():
            raise FileNotFoundError(f"model {str(path)!r} does not exist")
        for attempt in range(2):
            for name in list(_LOADERS):
                loader = _instantiate(name)
                if loader.can_load(path):
                    return loader
            if attempt == 0:
                import registry

                registry.load_general_plugins()  # formats plugins register (once per process)
        if path.is_dir():
            read_config_json(path)  # a missing or broken config.json is the first thing to say
        raise FileNotFoundError(
            f"{path}: no *.safetensors weight files, nor weights in another known format "
            f"({', '.join(_LOADERS)}); a model is a folder with config.json and "
            "*.safetensors, or a .gguf file"
        )
    if load_format not in _LOADERS:
        import registry

        registry.load_general_plugins()  # where plugins register their formats (once per process)
    if load_format not in _LOADERS:
        raise ValueError(f"load_format {load_format!r} is not registered. Valid options are: "
                         f"auto, {', '.join(_LOADERS)}")
    return _instantiate(load_format)


def _instantiate(load_format: str) -> ModelLoader:
    entry = _LOADERS[load_format]
    if isinstance(entry, str):
        from engine.utils import resolve_obj_by_qualname

        try:
            cls = resolve_obj_by_qualname(entry)
        except (ImportError, AttributeError, ValueError) as e:
            raise ValueError(f"load format {load_format!r}: cannot import {entry!r}: {e}") from None
        if not (isinstance(cls, type) and issubclass(cls, ModelLoader)):
            raise ValueError(f"load format {load_format!r}: {entry!r} is not a ModelLoader subclass")
        entry = cls
    return entry()


def _format_name(loader: ModelLoader) -> str:
    for name, entry in _LOADERS.items():
        if entry is type(loader) or (isinstance(entry, str) and entry.endswith(type(loader).__qualname__)):
            return name
    return type(loader).__qualname__


def loader_registrations_for_workers() -> dict[str, str]:
    """The load formats registered in this process beyond the built-ins, as
    ``{format: "module:Class"}`` a worker process can replay with
    `apply_loader_registrations`. Raises ValueError naming a class the workers
    cannot import, and the fix."""
    exported = {}
    for name, entry in _LOADERS.items():
        if _BUILTIN_LOADERS.get(name) is entry:
            continue
        exported[name] = entry if isinstance(entry, str) else worker_importable_name(
            entry, f"model loader {name!r}")
    return exported


def apply_loader_registrations(registrations: dict[str, str]) -> None:
    """Register the formats `loader_registrations_for_workers` exported."""
    for name, value in registrations.items():
        _LOADERS[name] = value


def load_model(config: EngineConfig) -> nn.Module:
    """Build and load the model of ``config.model_config.model`` in
    ``config.model_config.load_format`` (fills in ``model_config.hf_config``
    when empty). Returns it in eval mode on ``config.device_config.device``.

    Raises FileNotFoundError for a missing folder / config / weights file;
    ValueError for an unknown architecture (``... are not supported ...``) or
    load format, an unreadable file, a missing or unexpected tensor, or a shape
    mismatch."""
    from engine.models import ModelRegistry

    model_config = config.model_config
    path = Path(model_config.model)
    loader = get_model_loader(model_config.load_format, path)
    if not model_config.hf_config:
        model_config.hf_config = loader.load_config(path)
    architectures = model_config.hf_config.get("architectures") or []
    if not architectures:
        raise ValueError(f"{path}: the model's config has no 'architectures' entry naming its class")
    model_cls, arch = ModelRegistry.load_model_cls(architectures)
    dtype = resolve_dtype(config)
    if isinstance(loader, SafetensorsLoader):
        check_config_against_checkpoint(path, model_config.hf_config)
    check_config_fits_memory(path, model_config.hf_config, model_config.max_model_len, dtype)
    device = torch.device(config.device_config.device)
    logger.info("building %s (%s) in %s on %s", arch, model_cls.__qualname__, dtype, device)
    with set_current_engine_config(config), _default_dtype(dtype), device:
        model = model_cls(config=config, prefix="")
    quantization = model_config.quantization
    if isinstance(loader, GGUFLoader):
        weights = loader.iter_weights(path, model_config.hf_config, quantization)
    else:
        weights = loader.iter_weights(path, model_config.hf_config)
    try:
        model.load_weights(iter(weights))
        finish_quantized_layers(model)
    except ValueError as e:
        current = getattr(weights, "current", None)
        finished = getattr(weights, "finished", True)
        where = path if finished or current is None else current
        raise ValueError(f"{where}: {e}") from None
    if quantization not in (None, NO_QUANTIZATION):
        method = get_quantization_method(quantization)
        load_format = _format_name(loader)
        if load_format not in method.checkpoint_formats:
            raise ValueError(f"quantization {quantization!r} does not serve {load_format} "
                             f"checkpoints (it serves: {', '.join(method.checkpoint_formats)})")
        count = quantize_model(model, method)
        if count == 0 and method.available():
            raise ValueError(f"quantization {quantization!r} stored no layer of this model "
                             "(its supports() refused every weight shape)")
        logger.info("quantized %d layers with %s", count, quantization)
    if model_config.dtype == "auto" and dtype == torch.float32:
        # float32 because this CPU lacks bfloat16 arithmetic, not because the user
        # asked for full precision: the quantized products may round the
        # activations to int8 as bfloat16 activations are (several times faster)
        allow_quantized_activations(model)
    return model.requires_grad_(False).eval()
