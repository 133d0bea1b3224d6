"""LoRA resolver plugins: an adapter name the server does not know, mapped to an
adapter folder at request time.

A plugin of the ``lora_resolver`` group (``engine.lora_resolver_plugins``) is a
`LoRAResolver` subclass (built with no arguments) or a callable
``(base_model_name, lora_name) -> path | None``. The server asks each enabled
resolver, in name order, when a request's ``model`` names no loaded adapter;
the first folder returned is loaded under that name and kept. A resolver that
raises is logged and skipped: one broken plugin never stops the others.

Built in: ``lora_folder``, which serves the sub-folders of a folder by name
(``--plugin-config lora_folder.dir=/adapters`` serves ``/adapters/NAME`` as
``model: NAME``); it is inactive until ``dir`` is set.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel

logger = logging.getLogger(__name__)

# an adapter name a resolver may see: no path separators, no "..", nothing hidden
_SAFE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*")


class LoRAResolver:
    """Base of resolver plugins: override `resolve`."""

    def resolve(self, base_model_name: str, lora_name: str) -> str | os.PathLike[str] | None:
        """The folder (``adapter_config.json`` + ``adapter_model.safetensors``) of
        the adapter `lora_name` for the served model `base_model_name`, or None
        when this resolver does not know it."""
        raise NotImplementedError


class LoRAFolderSettings(BaseModel):
    """Settings of the built-in ``lora_folder`` resolver."""

    model_config = {"extra": "forbid"}
    dir: str | None = None  # the folder whose sub-folders are adapters; None: inactive


class LoRAFolderResolver(LoRAResolver):
    """Serves ``<dir>/<lora_name>`` when that folder holds an ``adapter_config.json``."""

    def __init__(self, folder: str | os.PathLike[str] | None = None) -> None:
        if folder is None:
            import registry

            settings = registry.get_plugin_config("lora_folder")
            folder = settings.dir if settings is not None else None
        self.folder = Path(folder) if folder else None

    def resolve(self, base_model_name: str, lora_name: str) -> str | None:
        if self.folder is None:
            return None
        candidate = self.folder / lora_name
        return str(candidate) if (candidate / "adapter_config.json").is_file() else None


class LoRAResolvers:
    """The enabled resolver plugins, built once (the server holds one)."""

    def __init__(self, resolvers: Sequence[tuple[str, Callable[[str, str], Any]]]) -> None:
        self.resolvers = list(resolvers)

    @classmethod
    def from_plugins(cls) -> LoRAResolvers:
        """Every enabled ``lora_resolver`` plugin, by name. A plugin whose value is
        neither a `LoRAResolver` subclass nor a callable, or whose constructor
        raises, is logged and left out."""
        import registry

        resolvers = []
        for name, value in sorted(registry.load_plugins_by_group("lora_resolver").items()):
            try:
                if isinstance(value, type) and issubclass(value, LoRAResolver):
                    resolvers.append((name, value().resolve))
                elif callable(value):
                    resolvers.append((name, value))
                else:
                    raise TypeError(f"expected a LoRAResolver subclass or a callable, got "
                                    f"{type(value).__name__}")
            except Exception:  # noqa: BLE001 - one broken plugin never stops the others
                logger.exception("lora_resolver plugin %r cannot be used; skipped", name)
        return cls(resolvers)

    def resolve(self, base_model_name: str, lora_name: str) -> str | None:
        """The first folder a resolver gives for `lora_name`, or None."""
        if not _SAFE_NAME.fullmatch(lora_name) or ".." in lora_name:
            return None
        for name, resolve in self.resolvers:
            try:
                path = resolve(base_model_name, lora_name)
            except Exception:  # noqa: BLE001 - a resolver's bug is not the request's
                logger.exception("lora_resolver plugin %r raised for %r", name, lora_name)
                continue
            if path is not None:
                return os.fspath(path)
        return None
