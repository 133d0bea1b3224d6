"""The HTTP server's adapters: names clients send in ``model``, and where each
adapter's folder is (``--lora-modules``, ``POST /v1/load_lora_adapter``, or a
LoRA resolver plugin that knows the name).

Plain bookkeeping: the engine loads an adapter the first time a request names
it (or when it is loaded at run time, to answer errors at once).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterable
from typing import Any

from engine.lora.request import LoRARequest


def parse_lora_module(text: str) -> tuple[str, str]:
    """One ``--lora-modules`` value: ``name=path`` or a JSON object with
    ``name`` and ``path`` (vLLM's two spellings). Raises ValueError naming it."""
    text = text.strip()
    if text.startswith("{"):
        try:
            spec = json.loads(text)
            name, path = spec["name"], spec["path"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ValueError(f"--lora-modules {text!r}: a JSON value needs 'name' and 'path' "
                             f"({exc})") from None
    else:
        name, sep, path = text.partition("=")
        if not sep:
            raise ValueError(f"--lora-modules {text!r}: expected NAME=PATH")
    if not isinstance(name, str) or not name.strip() or not isinstance(path, str) or not path:
        raise ValueError(f"--lora-modules {text!r}: the name and the path must not be empty")
    return name.strip(), path


class ServerLoRAs:
    """The server's adapter names, each a `LoRARequest` with an id of its own."""

    def __init__(self, base_name: str, modules: Iterable[tuple[str, str]] = (),
                 resolvers: Any = None) -> None:
        self.base_name = base_name
        self.by_name: dict[str, LoRARequest] = {}
        self.resolvers = resolvers  # engine.lora.resolver.LoRAResolvers, or None
        self._ids = 0
        self._lock = threading.Lock()
        for name, path in modules:
            self.add(name, path)

    def add(self, name: str, path: str) -> LoRARequest:
        """Name a new adapter; ValueError when the name is taken (by an adapter or
        the base model)."""
        with self._lock:
            if name == self.base_name:
                raise ValueError(f"the adapter name {name!r} is the base model's name")
            if name in self.by_name:
                raise ValueError(f"a LoRA adapter named {name!r} is already loaded")
            self._ids += 1
            request = LoRARequest(name, self._ids, path)
            self.by_name[name] = request
            return request

    def remove(self, name: str) -> LoRARequest | None:
        with self._lock:
            return self.by_name.pop(name, None)

    def lookup(self, name: str) -> LoRARequest | None:
        """The adapter called `name`: a known one, else one a resolver plugin
        finds (remembered from then on), else None."""
        request = self.by_name.get(name)
        if request is not None or self.resolvers is None:
            return request
        path = self.resolvers.resolve(self.base_name, name)
        if path is None:
            return None
        try:
            return self.add(name, path)
        except ValueError:  # another request resolved it meanwhile
            return self.by_name.get(name)

    def model_cards(self, created: int) -> list[dict[str, Any]]:
        """``/v1/models`` entries: each adapter with the base model as its parent."""
        return [{"id": r.name, "object": "model", "created": created, "owned_by": "engine",
                 "root": r.path, "parent": self.base_name}
                for r in sorted(self.by_name.values(), key=lambda r: r.int_id)]
