"""`SpeculativeConfig`: what ``speculative_config={...}`` asks for, checked once."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from engine.utils import json_object_setting

# the proposer a config without "method" gets: a draft model when it names one
DRAFT_MODEL_METHOD = "draft_model"
NGRAM_METHOD = "ngram"
_KEYS = ("method", "num_speculative_tokens", "prompt_lookup_min", "prompt_lookup_max", "model")


@dataclass
class SpeculativeConfig:
    """Speculative decoding settings (``LLM(speculative_config={...})``).

    ``method`` names a ``spec_proposer`` plugin: ``"ngram"`` (prompt lookup) and
    ``"draft_model"`` are built in; a dict with ``"model"`` and no ``"method"``
    means ``"draft_model"``.
    """

    method: str
    num_speculative_tokens: int
    prompt_lookup_min: int = 1  # n-gram: the shortest suffix looked up
    prompt_lookup_max: int = 4  # n-gram: the longest suffix looked up (tried first)
    model: str | None = None  # draft model folder (or Hugging Face cache name)
    options: dict[str, Any] | None = None  # the other keys, for a plugin proposer

    @classmethod
    def from_user(cls, value: dict[str, Any] | str) -> SpeculativeConfig:
        """Parse ``speculative_config`` (a dict, or its JSON text as the CLI gives
        it). Raises ValueError naming the bad key."""
        value = json_object_setting("speculative_config", value)
        method = value.get("method")
        if method is None:
            if value.get("model") is None:
                raise ValueError('speculative_config needs "method" (e.g. "ngram") or "model" '
                                 "(a draft model)")
            method = DRAFT_MODEL_METHOD
        if not isinstance(method, str) or not method:
            raise ValueError(f"speculative_config.method must be a plugin name, got {method!r}")
        k = value.get("num_speculative_tokens")
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise ValueError("speculative_config.num_speculative_tokens must be an integer >= 1, "
                             f"got {k!r}")
        lo = value.get("prompt_lookup_min", 1)
        hi = value.get("prompt_lookup_max", max(4, lo) if isinstance(lo, int) else 4)
        for name, n in (("prompt_lookup_min", lo), ("prompt_lookup_max", hi)):
            if not isinstance(n, int) or isinstance(n, bool) or n < 1:
                raise ValueError(f"speculative_config.{name} must be an integer >= 1, got {n!r}")
        if lo > hi:
            raise ValueError(f"speculative_config.prompt_lookup_min ({lo}) must be <= "
                             f"prompt_lookup_max ({hi})")
        model = value.get("model")
        if model is not None and not isinstance(model, str):
            raise ValueError(f"speculative_config.model must be a path or name, got {model!r}")
        if method == DRAFT_MODEL_METHOD and model is None:
            raise ValueError('speculative_config: method "draft_model" needs "model"')
        options = {key: v for key, v in value.items() if key not in _KEYS}
        return cls(method=method, num_speculative_tokens=k, prompt_lookup_min=lo,
                   prompt_lookup_max=hi, model=model, options=options or None)
