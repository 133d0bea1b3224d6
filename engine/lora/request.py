"""`LoRARequest`: which adapter a request runs with."""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class LoRARequest:
    """A LoRA adapter in PEFT's format: `path` is a folder holding
    ``adapter_config.json`` and ``adapter_model.safetensors``.

    `name` is what users (and the server's ``model`` field) call it; `int_id`
    (>= 1) is how the engine tells adapters apart: one id always means one
    adapter, so reusing an id for another name or folder is refused.
    Plain data: it crosses to the worker processes as is.
    """

    name: str
    int_id: int
    path: str

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"LoRARequest.name must be a non-empty string, got {self.name!r}")
        if (not isinstance(self.int_id, int) or isinstance(self.int_id, bool)
                or self.int_id < 1):
            raise ValueError(f"LoRARequest.int_id must be an integer >= 1, got {self.int_id!r}")
        if not isinstance(self.path, (str, os.PathLike)):
            raise ValueError(f"LoRARequest.path must be a folder path, got {self.path!r}")
        object.__setattr__(self, "path", os.fspath(self.path))

    # vLLM's spellings, so code written for it reads the same fields
    @property
    def lora_name(self) -> str:
        return self.name

    @property
    def lora_int_id(self) -> int:
        return self.int_id

    @property
    def lora_path(self) -> str:
        return self.path

    @property
    def cache_salt(self) -> int:
        """What the prefix cache mixes into the first block's key, so that the KV
        blocks computed with one adapter are never taken by another (or by the
        base model)."""
        return hash(("lora", self.int_id, self.name, self.path))
