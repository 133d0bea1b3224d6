"""`ModelRegistry`: model architecture name -> model class, eager or lazy.

Kept free of torch: a lazy ``"module:Class"`` entry is imported the first time its
architecture is resolved, so a plugin can register many models cheaply.
"""

from __future__ import annotations

import importlib
import logging
import re
from dataclasses import dataclass

logger = logging.getLogger(__name__)

_LAZY_VALUE = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")


@dataclass(frozen=True)
class _LazyModel:
    value: str  # "module:Class"

    def load(self, arch: str) -> type:
        module_name, _, attr_path = self.value.partition(":")
        try:
            obj = importlib.import_module(module_name)
            for attr in attr_path.split("."):
                obj = getattr(obj, attr)
        except (ImportError, AttributeError) as e:
            raise ImportError(
                f"model architecture {arch!r} is registered as {self.value!r}, "
                f"which cannot be imported: {e}"
            ) from e
        if not isinstance(obj, type):
            raise TypeError(f"model architecture {arch!r}: {self.value!r} is not a class")
        return obj


class _ModelRegistry:
    """Architecture names (``config.json``'s ``architectures``) mapped to model
    classes. Public as ``engine.ModelRegistry``."""

    def __init__(self) -> None:
        self._models: dict[str, type | _LazyModel] = {}

    def register_model(self, arch: str, model_cls: type | str) -> None:
        """Register `model_cls` for `arch`: a class, or a lazy ``"module:Class"``
        string imported on first use. Registering an architecture again replaces it
        (logged at INFO). Raises ValueError for a malformed string or empty name."""
        if not isinstance(arch, str) or not arch:
            raise ValueError(f"model architecture must be a non-empty string, not {arch!r}")
        if isinstance(model_cls, str):
            if not _LAZY_VALUE.match(model_cls):
                raise ValueError(
                    f"model class for {arch!r} must be a class or a 'module:Class' string, "
                    f"not {model_cls!r}"
                )
            entry: type | _LazyModel = _LazyModel(model_cls)
        elif isinstance(model_cls, type):
            entry = model_cls
        else:
            raise ValueError(
                f"model class for {arch!r} must be a class or a 'module:Class' string, "
                f"not {model_cls!r}"
            )
        previous = self._models.get(arch)
        if previous is not None and previous != entry:
            logger.info("model architecture %r: %s replaces %s", arch,
                        _describe(entry), _describe(previous))
        self._models[arch] = entry

    def get_supported_archs(self) -> list[str]:
        """Every registered architecture name, sorted."""
        return sorted(self._models)

    def is_registered(self, arch: str) -> bool:
        return arch in self._models

    def resolve(self, arch: str) -> type:
        """The model class of `arch`, importing a lazy entry now. Raises ValueError
        (``... are not supported ...``) for an unknown architecture and ImportError
        when a lazy entry cannot be imported."""
        entry = self._models.get(arch)
        if entry is None:
            raise self._unsupported([arch])
        if isinstance(entry, _LazyModel):
            return entry.load(arch)
        return entry

    def load_model_cls(self, architectures: list[str]) -> tuple[type, str]:
        """The class of the first registered name in `architectures` and that name.
        Raises ValueError (``are not supported``) when none is registered."""
        for arch in architectures:
            if arch in self._models:
                return self.resolve(arch), arch
        raise self._unsupported(list(architectures))

    def _unsupported(self, architectures: list[str]) -> ValueError:
        supported = ", ".join(self.get_supported_archs()) or "(none registered)"
        return ValueError(
            f"Model architectures {architectures} are not supported. "
            f"Supported architectures: {supported}. A plugin can add one with "
            f"ModelRegistry.register_model(arch, 'module:Class')."
        )


def _describe(entry: type | _LazyModel) -> str:
    if isinstance(entry, _LazyModel):
        return repr(entry.value)
    return f"{entry.__module__}.{entry.__qualname__}"


ModelRegistry = _ModelRegistry()
