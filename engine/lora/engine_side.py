"""The engine's side of LoRA: which adapters are loaded, and the worker calls.

Every change goes to every rank through ``collective_rpc`` (the worker
interface's `add_lora` / `remove_lora` / `list_loras` / `pin_lora`); an adapter
that cannot be served raises before anything is queued, so one bad adapter
fails only the request that names it.
"""

from __future__ import annotations

import threading
from typing import Any

from engine.lora.config import LoRAConfig
from engine.lora.request import LoRARequest

# the worker methods the engine calls when LoRA is enabled
LORA_WORKER_METHODS = ("add_lora", "remove_lora", "list_loras", "pin_lora")


def missing_lora_methods(worker: Any) -> list[str]:
    """The LoRA methods `worker`'s class leaves to `WorkerBase` (run on each rank
    through ``collective_rpc``, so it must stay a module-level function)."""
    from engine.worker.worker_base import WorkerBase

    cls = type(worker)
    return [m for m in LORA_WORKER_METHODS
            if getattr(cls, m, None) in (None, getattr(WorkerBase, m, None))]


class EngineLoRAs:
    """The adapters an engine has loaded, by id and by name."""

    def __init__(self, executor: Any, config: LoRAConfig) -> None:
        self.executor = executor
        self.config = config
        self.by_id: dict[int, LoRARequest] = {}
        self._lock = threading.Lock()  # servers add adapters off the step thread

    def check_workers(self, worker_cls: str) -> None:
        """Raise ValueError, naming the platform and the method, when the workers
        cannot serve LoRA."""
        missing = self.executor.collective_rpc(missing_lora_methods)[0]
        if missing:
            from engine.platforms import current_platform

            raise ValueError(
                f"enable_lora=True: the platform {current_platform.device_name!r} runs the "
                f"worker class {worker_cls}, which does not implement {missing[0]}() "
                f"(LoRA needs {', '.join(m + '()' for m in LORA_WORKER_METHODS)})")

    def by_name(self, name: str) -> LoRARequest | None:
        return next((r for r in self.by_id.values() if r.name == name), None)

    def ensure(self, request: Any) -> LoRARequest:
        """`request`, checked and loaded on every rank (a no-op once loaded).
        Raises ValueError naming the adapter and the field for an adapter that
        cannot be served, or an id or name already used by another adapter."""
        if not isinstance(request, LoRARequest):
            raise TypeError(f"lora_request must be an engine.LoRARequest, got "
                            f"{type(request).__name__}")
        with self._lock:
            known = self.by_id.get(request.int_id)
            if known == request:
                return known
            if known is not None:
                raise ValueError(f"LoRA int_id {request.int_id} is already used by adapter "
                                 f"{known.name!r} ({known.path}); give {request.name!r} "
                                 "another id")
            same_name = self.by_name(request.name)
            if same_name is not None:
                raise ValueError(f"a LoRA adapter named {request.name!r} is already loaded "
                                 f"with int_id {same_name.int_id}")
            self.executor.collective_rpc("add_lora", (request,))
            self.by_id[request.int_id] = request
            return request

    def remove(self, int_id: int) -> bool:
        """Unload an adapter from every rank; False when it was not loaded.
        Requests already running with it finish with it."""
        with self._lock:
            request = self.by_id.pop(int_id, None)
            removed = self.executor.collective_rpc("remove_lora", (int_id,))[0]
            return request is not None or bool(removed)

    def pin(self, int_id: int) -> bool:
        with self._lock:
            if int_id not in self.by_id:
                raise ValueError(f"LoRA adapter {int_id} is not loaded: add it before pinning")
            return bool(self.executor.collective_rpc("pin_lora", (int_id,))[0])

    def next_id(self) -> int:
        """An id no loaded adapter uses (for adapters loaded by name, e.g. over HTTP)."""
        with self._lock:
            return max(self.by_id, default=0) + 1
