"""`SimilarityIOProcessor`: ranks a built-in corpus by cosine similarity to a query."""

from __future__ import annotations

import math
import threading
from typing import Any

from engine.io_processors import IOProcessor
from engine.pooling_params import PoolingParams

CORPUS = (
    "A cat is sleeping on the warm windowsill.",
    "The dog chased the ball across the park.",
    "Stock markets fell sharply after the announcement.",
    "The central bank raised interest rates again.",
    "She baked fresh bread and a chocolate cake.",
    "This pasta recipe needs garlic, olive oil and basil.",
    "The football team won the championship final.",
    "The tennis match went to a fifth set.",
    "Python is a popular programming language.",
    "The compiler reported a syntax error on line 12.",
    "Heavy rain and strong winds are expected tomorrow.",
    "The telescope captured images of a distant galaxy.",
)
DEFAULT_TOP_K = 3


class SimilarityIOProcessor(IOProcessor):
    """Request data: a query string, or ``{"query": str, "top_k": int}``.
    Response: ``{"query": str, "results": [{"text": str, "score": float}, ...]}``,
    best first."""

    corpus: tuple[str, ...] = CORPUS

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        # request_id -> (query, top_k), kept from pre_process to post_process
        self._pending: dict[str, tuple[str, int]] = {}
        self._lock = threading.Lock()

    def parse_data(self, data: Any) -> dict[str, Any]:
        if isinstance(data, str):
            data = {"query": data}
        if not isinstance(data, dict):
            raise ValueError(f"similarity: data must be a string or an object, got {data!r}")
        unknown = set(data) - {"query", "top_k"}
        if unknown:
            raise ValueError(f"similarity: unknown field(s) {sorted(unknown)}")
        query = data.get("query")
        if not isinstance(query, str) or not query.strip():
            raise ValueError(f"similarity: 'query' must be a non-empty string, got {query!r}")
        top_k = data.get("top_k", DEFAULT_TOP_K)
        if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= len(self.corpus):
            raise ValueError(
                f"similarity: 'top_k' must be an int in 1..{len(self.corpus)}, got {top_k!r}"
            )
        return {"query": query, "top_k": top_k}

    def merge_pooling_params(self, params: PoolingParams | None = None) -> PoolingParams:
        # cosine similarity of unit vectors is their dot product
        return (params or PoolingParams()).replace(task="embed", normalize=True)

    def pre_process(self, prompt: dict[str, Any], request_id: str | None = None,
                    **kwargs: Any) -> list[str]:
        with self._lock:
            self._pending[request_id or ""] = (prompt["query"], prompt["top_k"])
        return [prompt["query"], *self.corpus]

    def post_process(self, model_output: Any, request_id: str | None = None,
                     **kwargs: Any) -> dict[str, Any]:
        with self._lock:
            query_text, top_k = self._pending.pop(request_id or "", (None, DEFAULT_TOP_K))
        rows = embedding_rows(model_output)
        if len(rows) != len(self.corpus) + 1:
            raise ValueError(
                f"similarity: expected {len(self.corpus) + 1} embeddings, got {len(rows)}"
            )
        query, *docs = rows
        scores = [_cosine(query, doc) for doc in docs]
        order = sorted(range(len(docs)), key=lambda i: scores[i], reverse=True)[:top_k]
        return {
            "query": query_text,
            "results": [{"text": self.corpus[i], "score": scores[i]} for i in order],
        }


def embedding_rows(model_output: Any) -> list[list[float]]:
    """Embeddings as lists of floats, from the engine's pooling outputs (objects with
    ``.outputs.embedding``), a 2-D tensor/array, or a list of vectors."""
    if hasattr(model_output, "tolist"):
        return model_output.tolist()
    rows = []
    for item in model_output:
        outputs = getattr(item, "outputs", None)
        vector = getattr(outputs, "embedding", None) if outputs is not None else None
        if vector is None:
            vector = getattr(item, "embedding", item)
        rows.append(vector.tolist() if hasattr(vector, "tolist") else list(vector))
    return rows


def _cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    norm = math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b))
    return dot / norm if norm else 0.0
