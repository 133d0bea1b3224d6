"""What `LLM.generate` and `LLM.embed` return: plain dataclasses, no tensors."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class CompletionOutput:
    """One of a request's ``n`` samples."""

    index: int  # which sample, 0..n-1
    text: str  # the text so far (the whole completion once finished)
    token_ids: list[int]
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error" | None while running
    stop_reason: int | str | None = None  # the stop string or token id that ended it
    logprobs: list[dict[int, float]] | None = None  # per generated token, when asked for
    text_delta: str = ""  # text added since the previous snapshot (streaming)
    error: str | None = None  # why it ended with finish_reason "error"

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    """A generation request's state: a snapshot while streaming, final when ``finished``."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = False
    num_cached_tokens: int = 0  # prompt tokens taken from the prefix cache
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class EmbeddingOutput:
    embedding: list[float]

    @property
    def hidden_size(self) -> int:
        return len(self.embedding)


@dataclass
class EmbeddingRequestOutput:
    """The pooled (and, when the model says so, normalized) embedding of one text."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: EmbeddingOutput
    finished: bool = True
