"""What this process registered that worker processes must replay before they
build the model (model architectures, load formats): collected in the parent by
every executor that starts workers, applied in each worker."""

from __future__ import annotations

from typing import Any

from engine.model_loader import apply_loader_registrations, loader_registrations_for_workers
from engine.models.registry import ModelRegistry
from engine.utils import resolve_obj_by_qualname


def registrations_for_workers(architectures: list[str] | None = None, *,
                              script_classes_by_value: bool = False) -> dict[str, dict[str, Any]]:
    """What this process registered that worker processes must replay before
    building the model: model architectures and load formats. Executors that
    start workers pass it along and call `apply_worker_registrations` there.

    With `script_classes_by_value`, a class registered in the user's script
    (``"__main__:Class"``) travels as the class itself: for workers that do not
    re-import the script as ``__main__`` but receive classes pickled by value
    (Ray actors, whose ``__main__`` is Ray's own program).

    Raises ValueError naming the class and the fix when one of `architectures`
    (the model's) resolves to a class the workers cannot import.
    """
    ModelRegistry.check_reachable(list(architectures or []))
    models: dict[str, Any] = ModelRegistry.registrations_for_workers()
    loaders: dict[str, Any] = loader_registrations_for_workers()
    if script_classes_by_value:
        for arch, value in models.items():
            if isinstance(value, str) and value.startswith("__main__:"):
                models[arch] = ModelRegistry.resolve(arch)
        for name, value in loaders.items():
            if value.startswith("__main__:"):
                loaders[name] = resolve_obj_by_qualname(value)
    return {"models": models, "loaders": loaders}


def apply_worker_registrations(registrations: dict[str, dict[str, Any]] | None) -> None:
    """Replay `registrations_for_workers()` in a worker process (after its
    general plugins ran)."""
    registrations = registrations or {}
    ModelRegistry.apply_registrations(registrations.get("models", {}))
    apply_loader_registrations(registrations.get("loaders", {}))
