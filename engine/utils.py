"""Small helpers shared by the engine's processes."""

from __future__ import annotations

import functools
import json
import logging
import random
import sys
import threading
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import registry

if TYPE_CHECKING:  # annotations only: this module stays importable without torch
    import torch

# Start-up decisions a user should see once (KV-cache size, a kernel build starting,
# active out-of-tree plugins): logged at INFO on this logger, which the `engine` CLI
# shows at its default verbosity while other INFO records need -v.
STARTUP_LOGGER = "engine.startup"


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
resolve_obj_by_qualname = registry.resolve_qualname


_F = TypeVar("_F", bound=Callable[..., Any])
_deprecation_logger = logging.getLogger("engine.deprecation")


def _calling_plugin(depth: int) -> str | None:
    """The plugin whose code made the call `depth` frames up: the running plugin
    when the registry is calling one, else the plugin loaded from the caller's
    package; None for user code."""
    running = registry.current_plugin()
    if running is not None:
        return running.name
    try:
        module = sys._getframe(depth + 1).f_globals.get("__name__")
    except ValueError:  # not that many frames
        return None
    owner = registry.plugin_of_module(module)
    return owner.name if owner is not None else None


def deprecated(*, since: str, instead: str | None = None) -> Callable[[_F], _F]:
    """Mark a public function or class as deprecated since engine version `since`
    (`instead`: what to use now).

    Each call (for a class: each instantiation) logs one WARNING per calling plugin
    (or once for user code), naming the deprecated name, the version, the
    replacement and the caller; a ``DeprecationWarning`` is issued on every call.
    How long a deprecated name lives is in docs/compatibility.md.
    """

    def decorate(obj: _F) -> _F:
        name = f"{obj.__module__}.{obj.__qualname__}"
        advice = f"; use {instead} instead" if instead else ""
        warned: set[str | None] = set()
        lock = threading.Lock()

        def warn() -> None:
            caller = _calling_plugin(2)  # frames: warn <- wrapper <- the caller
            message = (f"{name} is deprecated since engine {since}{advice} (called by "
                       f"{'plugin ' + repr(caller) if caller else 'user code'})")
            warnings.warn(message, DeprecationWarning, stacklevel=3)
            with lock:
                if caller in warned:
                    return
                warned.add(caller)
            _deprecation_logger.warning("%s", message)

        if isinstance(obj, type):
            original_init = obj.__init__

            @functools.wraps(original_init)
            def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
                warn()
                original_init(self, *args, **kwargs)

            obj.__init__ = __init__  # type: ignore[misc]
            obj.__deprecated__ = f"deprecated since engine {since}{advice}"  # type: ignore[attr-defined]
            return obj

        @functools.wraps(obj)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            warn()
            return obj(*args, **kwargs)

        wrapper.__deprecated__ = f"deprecated since engine {since}{advice}"  # type: ignore[attr-defined]
        return wrapper  # type: ignore[return-value]

    return decorate


def short_repr(value: Any, limit: int = 60) -> str:
    """``repr(value)``, cut to `limit` characters with "..." (for error messages
    that quote what a user sent)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def first_line(message: str, limit: int = 500) -> str:
    """The first line of `message`, at most `limit` characters: what reaches a
    client of an error whose full text (a native backtrace, a parser dump)
    belongs in the server log."""
    line = message.strip().split("\n", 1)[0].strip()
    return line if len(line) <= limit else line[: limit - 3] + "..."


def shape_bucket(rows: int) -> int:
    """`rows` rounded up to one of 8 steps per power of two (at most 1/8 more):
    the lengths oneDNN and torch's bf16 CPU kernels see for prompt chunks. Those
    build and keep a kernel per shape, so unpadded, every new prompt length
    grows memory; from 33 to 4096 rows there are 56 buckets."""
    step = 1 << max(0, rows.bit_length() - 4)
    return -(-rows // step) * step


def pad_rows_to_bucket(x: torch.Tensor, above: int = 0) -> torch.Tensor:
    """`x` [rows, in] zero-padded to ``shape_bucket(rows)`` rows when it has more
    than `above` rows (else `x` itself): the shapes a dense product (oneDNN) sees
    for prompt chunks, so that it builds and keeps a few dozen kernels, not one per
    prompt length. Callers slice the first `rows` rows of the result back."""
    rows = x.shape[0]
    bucket = shape_bucket(rows)
    if rows <= above or bucket == rows:
        return x
    padded = x.new_empty((bucket, x.shape[1]))
    padded[:rows] = x
    padded[rows:].zero_()  # one pass over the memory, not a zero fill and then a copy
    return padded


def json_object_setting(name: str, value: dict[str, Any] | str) -> dict[str, Any]:
    """A setting given as a dict or as its JSON text (how the CLI passes it), as a
    dict. Raises ValueError naming the setting `name` when the text is not JSON
    or the value is not an object."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{name} is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{name} must be a JSON object, got {short_repr(value)}")
    return value


def read_json_file(path: Path, expect: type[dict] | type[list] = dict) -> Any:
    """The JSON value in the file `path`: an object (`expect` dict, the default)
    or an array (`expect` list), the one way model, tokenizer and pooling files
    are read. Raises ValueError naming the file when it cannot be read, is not
    JSON, or holds another kind of value."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read it as JSON: {e}") from None
    if not isinstance(data, expect):
        kind = "a JSON object" if expect is dict else "a JSON array"
        raise ValueError(f"{path}: expected {kind}, found {type(data).__name__}")
    return data


def worker_importable_name(cls: type, what: str) -> str:
    """``"module:Qualname"`` under which a spawned worker process imports `cls`.

    Raises ValueError naming `what`, the class and the fix when workers cannot
    import it: a class defined inside a function, or in ``__main__`` when the
    main program is not a file a worker can re-import (``python -c``, a REPL,
    a notebook).
    """
    module, qualname = cls.__module__, cls.__qualname__
    fix = (f"move {qualname} into a module on sys.path (for example my_models.py) and "
           f"pass 'my_models:{qualname.split('.')[-1]}'")
    if "<locals>" in qualname:
        raise ValueError(
            f"{what}: class {module}.{qualname} is defined inside a function, so the "
            f"engine's worker processes cannot import it; {fix}"
        )
    if module == "__main__":
        main_file = getattr(sys.modules.get("__main__"), "__file__", None)
        if not main_file or not str(main_file).endswith(".py"):
            raise ValueError(
                f"{what}: class {qualname} is defined in __main__ of an interactive "
                "session or `python -c`, which the engine's worker processes cannot "
                f"re-import; {fix}"
            )
    return f"{module}:{qualname}"
