"""Parameters of a pooling (embedding) request."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

POOLING_TASKS = ("embed",)


@dataclass
class PoolingParams:
    """How to pool one request's hidden states.

    `normalize`: L2-normalize the embedding (None: what the model's own files say);
    `dimensions`: keep only the first N dimensions (Matryoshka-style), before
    normalization; `truncate_prompt_tokens`: keep only the last N prompt tokens.
    Bad values raise `ValueError` naming the field.
    """

    task: str = "embed"
    normalize: bool | None = None
    dimensions: int | None = None
    truncate_prompt_tokens: int | None = None

    def __post_init__(self) -> None:
        if self.task not in POOLING_TASKS:
            raise ValueError(
                f"PoolingParams.task must be one of {', '.join(POOLING_TASKS)}, got {self.task!r}"
            )
        if self.normalize is not None and not isinstance(self.normalize, bool):
            raise ValueError(f"PoolingParams.normalize must be a bool or None, got {self.normalize!r}")
        for name in ("dimensions", "truncate_prompt_tokens"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"PoolingParams.{name} must be a positive int or None, got {value!r}")

    def apply_to(self, embedding: list[float]) -> list[float]:
        """`embedding` cut to `dimensions` and, when `normalize` is True, L2-normalized
        (for engines whose pooling returns the model's own output)."""
        if self.dimensions is not None:
            embedding = embedding[: self.dimensions]
        if self.normalize:
            norm = math.sqrt(sum(x * x for x in embedding))
            if norm > 0:
                embedding = [x / norm for x in embedding]
        return list(embedding)

    def replace(self, **changes: Any) -> PoolingParams:
        """A copy with `changes` applied (validated again)."""
        return dataclasses.replace(self, **changes)
