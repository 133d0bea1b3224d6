"""Small helpers shared by the engine's processes."""

from __future__ import annotations

import importlib
import random
from typing import Any


def set_random_seed(seed: int) -> None:
    """Seed Python's, NumPy's (when installed) and torch's global generators.

    Per-request seeds (``SamplingParams.seed``) use their own generators and are
    not affected; this makes unseeded sampling and random weight init repeatable.
    """
    import torch

    random.seed(seed)
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy is a dependency, but optional here
        pass
    else:
        np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_obj_by_qualname(qualname: str) -> Any:
    """Import ``"package.module.Name"`` (or ``"package.module:Name.attr"``) and
    return the object.

    Raises ValueError for a malformed name and ImportError / AttributeError naming
    the qualified name when the module or attribute does not exist.
    """
    if not isinstance(qualname, str) or not qualname.strip():
        raise ValueError(f"expected a qualified name like 'package.module.Class', got {qualname!r}")
    if ":" in qualname:
        module_name, _, attr_path = qualname.partition(":")
    else:
        module_name, _, attr_path = qualname.rpartition(".")
    if not module_name or not attr_path:
        raise ValueError(f"expected a qualified name like 'package.module.Class', got {qualname!r}")
    module = importlib.import_module(module_name)
    obj: Any = module
    for part in attr_path.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise AttributeError(
                f"cannot resolve {qualname!r}: {module_name!r} has no attribute {attr_path!r}"
            ) from None
    return obj
