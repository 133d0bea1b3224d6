"""The public surface (names and signatures) plugins and users build on, checked
against the snapshot in tests/public_surface.json: any change the snapshot does not
record fails, so every change of the public surface is a deliberate, reviewed
edit (see docs/compatibility.md).

After an intended change, record it:
    ENGINE_UPDATE_PUBLIC_SURFACE=1 python -m pytest -q tests/test_public_surface.py
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
from pathlib import Path
from typing import Any

SNAPSHOT = Path(__file__).resolve().parent / "public_surface.json"

# module -> the public names in it (None: the module's __all__)
SURFACE: dict[str, list[str] | None] = {
    "registry": None,
    "engine": None,
    "engine.platforms": ["Platform", "PlatformEnum", "current_platform",
                         "dry_run_resolution", "PlatformResolutionError"],
    "engine.io_processors": ["IOProcessor", "IOProcessorError"],
    "engine.metrics": ["StatLoggerBase", "LoggingStatLogger", "PrometheusStatLogger",
                       "SchedulerStats", "IterationStats"],
    "engine.sample": ["LogitsProcessor", "BatchUpdate", "AddedRequest"],
    "engine.ops.custom_op": ["CustomOp"],
    "engine.attention.registry": ["AttentionBackendEnum", "register_backend"],
    "engine.model_loader": ["register_model_loader"],
    "engine.engine_args": ["EngineArgs"],
    "engine.step": None,
    "engine.worker": ["WorkerBase", "KVCacheSpec"],
    "engine.utils": ["deprecated", "set_random_seed"],
}


def _signature(obj: Any) -> str:
    try:
        return str(inspect.signature(obj))
    except (TypeError, ValueError):
        return "(...)"


def _describe(obj: Any) -> Any:
    if inspect.isclass(obj):
        members: dict[str, str] = {}
        for name, value in sorted(vars(obj).items()):
            if name.startswith("_") and name != "__init__":
                continue
            if isinstance(value, property):
                members[name] = "property"
            elif isinstance(value, (classmethod, staticmethod)):
                members[name] = f"{type(value).__name__}{_signature(value.__func__)}"
            elif callable(value):
                members[name] = f"def{_signature(value)}"
            else:
                members[name] = f"attribute: {type(value).__name__}"
        bases = [f"{b.__module__}.{b.__qualname__}" for b in obj.__bases__]
        return {"class": bases, "members": members}
    if callable(obj):
        return f"def{_signature(obj)}"
    if type(obj).__module__.startswith(("engine", "registry")):
        return {"instance of": _describe(type(obj))}  # e.g. ModelRegistry
    return f"value: {type(obj).__name__}"


def current_surface() -> dict[str, Any]:
    """The public surface of this checkout, as JSON-ready data."""
    surface = {}
    for module_name, names in SURFACE.items():
        module = importlib.import_module(module_name)
        names = list(module.__all__) if names is None else names
        surface[module_name] = {name: _describe(getattr(module, name))
                                for name in sorted(names) if name != "__version__"}
    return surface


def _differences(old: Any, new: Any, where: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        lines = []
        for key in sorted(set(old) | set(new)):
            place = f"{where}.{key}" if where else key
            if key not in new:
                lines.append(f"removed: {place}")
            elif key not in old:
                lines.append(f"added: {place} = {json.dumps(new[key])}")
            else:
                lines += _differences(old[key], new[key], place)
        return lines
    return [] if old == new else [f"changed: {where}: {json.dumps(old)} -> {json.dumps(new)}"]


def test_public_surface_matches_the_snapshot():
    surface = current_surface()
    if os.environ.get("ENGINE_UPDATE_PUBLIC_SURFACE") == "1":
        SNAPSHOT.write_text(json.dumps(surface, indent=1, sort_keys=True) + "\n")
    recorded = json.loads(SNAPSHOT.read_text())
    differences = _differences(recorded, surface)
    assert not differences, (
        "the public surface changed without being recorded in tests/public_surface.json:\n  "
        + "\n  ".join(differences)
        + "\nIf intended: ENGINE_UPDATE_PUBLIC_SURFACE=1 python -m pytest -q "
          "tests/test_public_surface.py, and follow docs/compatibility.md (deprecate, "
          "don't remove)."
    )


def test_an_unrecorded_change_is_caught():
    surface = current_surface()
    changed = json.loads(json.dumps(surface))
    changed["registry"]["discover"] = "def(group=None, extra=1)"
    del changed["engine.platforms"]["Platform"]["members"]["get_attn_backend_cls"]
    assert _differences(surface, changed) == [
        'removed: engine.platforms.Platform.members.get_attn_backend_cls',
        'changed: registry.discover: ' + json.dumps(surface["registry"]["discover"])
        + ' -> "def(group=None, extra=1)"',
    ]
