"""Names a package exports but imports on first use.

Packages whose modules import torch still have to be importable without it
(`engine --help` and `engine plugins list` stay fast): their `__init__` maps each
public name to the module that defines it and lets Python's module-level
`__getattr__` (PEP 562) import that module when the name is first read.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, MutableMapping
from typing import Any


def lazy_exports(
    package: str, names: Mapping[str, str], namespace: MutableMapping[str, Any]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """`(__getattr__, __dir__)` for `package`, whose public `names` map to modules.

    A name read once is stored in the package's `namespace`, so later reads are
    plain attribute lookups.
    """

    def __getattr__(name: str) -> Any:
        module = names.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(names))

    return __getattr__, __dir__
