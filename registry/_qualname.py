"""The one qualified-name resolver of the project: the registry, the platform
resolution, workers, attention backends and device communicators all turn
``"pkg.mod.Cls"`` / ``"pkg.mod:Outer.Inner"`` into objects through it. Imports only
`importlib`, so the engine can use it from anywhere."""

from __future__ import annotations

import importlib
from typing import Any


def resolve_qualname(qualname: str) -> Any:
    """Import and return the object a qualified name points at: ``"pkg.mod.Cls"``
    (the longest importable module prefix, then attributes, so nested classes such
    as ``"pkg.mod.Outer.Inner"`` work too) or ``"pkg.mod:Outer.Inner"``.

    Raises ValueError for an empty name and ImportError naming `qualname` when no
    prefix imports or an attribute is missing.
    """
    if not isinstance(qualname, str) or not qualname.strip():
        raise ValueError(f"expected a qualified name like 'pkg.mod.Cls', got {qualname!r}")
    module_part, _, attr_part = qualname.strip().partition(":")
    parts = module_part.split(".")
    attrs = attr_part.split(".") if attr_part else []
    for split in range(len(parts), 0, -1):
        module_name = ".".join(parts[:split])
        try:
            obj: object = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            missing = exc.name or ""
            if missing == module_name or module_name.startswith(missing + "."):
                continue
            raise
        for attr in parts[split:] + attrs:
            try:
                obj = getattr(obj, attr)
            except AttributeError:
                raise ImportError(
                    f"cannot resolve {qualname!r}: {module_name!r} has no attribute path "
                    f"{'.'.join(parts[split:] + attrs)!r}"
                ) from None
        return obj
    raise ImportError(f"cannot resolve {qualname!r}: no importable module in it")
