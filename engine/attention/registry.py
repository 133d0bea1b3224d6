"""`AttentionBackendEnum`: the named attention backends, extensible by plugins.

Kept free of torch so platforms can name backends cheaply.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any, ClassVar

logger = logging.getLogger(__name__)


class _BackendEnumMeta(type):
    """Makes the class behave like an Enum whose members can be added later."""

    _members: dict[str, AttentionBackendEnum]

    def __getitem__(cls, name: str) -> AttentionBackendEnum:
        member = cls._members.get(str(name).upper())
        if member is None:
            raise ValueError(
                f"Unknown attention backend: {name!r}. "
                f"Valid options are: {', '.join(cls._members)}"
            )
        return member

    def __iter__(cls) -> Iterator[AttentionBackendEnum]:
        return iter(list(cls._members.values()))

    def __len__(cls) -> int:
        return len(cls._members)

    def __contains__(cls, item: object) -> bool:
        if isinstance(item, str):
            return item.upper() in cls._members
        return item in cls._members.values()


class AttentionBackendEnum(metaclass=_BackendEnumMeta):
    """A named attention backend: ``AttentionBackendEnum["TORCH_SDPA"]`` or
    ``AttentionBackendEnum.TORCH_SDPA``; ``.name``, ``.get_path()`` (qualified class
    name) and ``.get_class()``. An unknown name raises ValueError listing the valid
    ones. Built-ins: TORCH_SDPA (the default) and NAIVE (pure-torch reference)."""

    _members: ClassVar[dict[str, AttentionBackendEnum]] = {}
    TORCH_SDPA: ClassVar[AttentionBackendEnum]
    NAIVE: ClassVar[AttentionBackendEnum]

    def __init__(self, name: str, path: str) -> None:
        self.name = name
        self._path = path

    @property
    def value(self) -> str:
        return self._path

    def get_path(self) -> str:
        """Qualified name of the backend class, e.g. ``"pkg.mod.MyBackend"``."""
        return self._path

    def get_class(self) -> type:
        """The backend class (imported on first use)."""
        from engine.utils import resolve_obj_by_qualname

        return resolve_obj_by_qualname(self._path)

    def __repr__(self) -> str:
        return f"<AttentionBackendEnum.{self.name}: {self._path!r}>"

    def __reduce__(self) -> tuple:
        return (AttentionBackendEnum.__getitem__, (self.name,))

    @classmethod
    def _add(cls, name: str, path: str) -> AttentionBackendEnum:
        key = name.upper()
        member = cls._members.get(key)
        if member is None:
            member = cls(key, path)
            cls._members[key] = member
            setattr(cls, key, member)  # AttentionBackendEnum.MY_ATTN
        elif member._path != path:
            logger.info("attention backend %s: %s replaces %s", key, path, member._path)
            member._path = path  # overriding keeps the member object, so references see it
        return member


AttentionBackendEnum._add("TORCH_SDPA", "engine.attention.backends.torch_sdpa.TorchSDPABackend")
AttentionBackendEnum._add("NAIVE", "engine.attention.backends.naive.NaiveAttentionBackend")


def register_backend(name: str, class_path: str | None = None) -> Any:
    """Add an attention backend under `name`, or point an existing name (built-ins
    included) at another class.

    As a call: ``register_backend("MY_ATTN", "pkg.mod.MyBackend")`` returns the
    member. As a class decorator: ``@register_backend("MY_ATTN")`` registers the
    decorated class and returns it unchanged."""
    if not name or not str(name).replace("_", "").isalnum():
        raise ValueError(f"attention backend name must be letters, digits and '_', not {name!r}")
    if class_path is not None:
        _record_registration(name, class_path, class_path.partition(":")[0])
        return AttentionBackendEnum._add(name, class_path)

    def decorator(cls: type) -> type:
        path = f"{cls.__module__}.{cls.__qualname__}"
        _record_registration(name, path, cls.__module__)
        AttentionBackendEnum._add(name, path)
        return cls

    return decorator


def _record_registration(name: str, path: str, module: str) -> None:
    """Tell the registry which plugin (or user code) points `name` at `path`."""
    member = AttentionBackendEnum._members.get(name.upper())
    if member is None or member._path != path:
        import registry

        registry.record_effect("attention_backend", name.upper(), module=module)
