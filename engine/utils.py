"""Small helpers shared by the engine's processes."""

from __future__ import annotations

import random

from registry._qualname import resolve_qualname


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


# the project's one qualified-name resolver (torch-free, shared with the plugin
# registry): "pkg.mod.Cls", "pkg.mod.Outer.Inner" and "pkg.mod:Outer.Inner" all work
resolve_obj_by_qualname = resolve_qualname
