"""Streamed responses: engine snapshots in, OpenAI chunk objects out.

`batches` merges the snapshots of a request's streams (one per prompt); the two
builders turn them into ``text_completion`` chunks (`completion_chunks`) and
``chat.completion.chunk`` chunks (`chat_chunks`). Each builder owns its choice
format; what they share (which choices have new text, when a choice is done,
the chunk around the choices and the usage chunk) is `_chunks`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

from engine.entrypoints.async_engine import RequestStream
from engine.entrypoints.serving import (
    OBJECT_CHAT_CHUNK,
    OBJECT_COMPLETION,
    TokenTexts,
    chat_logprobs,
    choice_error,
    completion_logprobs,
    new_id,
    usage,
)


async def batches(streams: list[RequestStream]) -> AsyncIterator[list[tuple[int, Any]]]:
    """``(prompt index, snapshot)`` pairs of every stream as they come, grouped:
    whatever is already waiting is taken together, so a slow reader catches up in
    one chunk. Aborts the unfinished streams when the consumer stops early."""
    try:
        if len(streams) == 1:
            stream = streams[0]
            async for first in stream:
                yield [(0, first), *((0, out) for out in stream.take_ready())]
            return
        merged: asyncio.Queue = asyncio.Queue()

        async def pump(index: int, stream: RequestStream) -> None:
            try:
                async for out in stream:
                    merged.put_nowait((index, out))
            except BaseException as exc:
                merged.put_nowait((index, exc))
                raise
            merged.put_nowait((index, None))

        tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
        try:
            open_streams = len(streams)
            while open_streams:
                items = [await merged.get()]
                while not merged.empty():
                    items.append(merged.get_nowait())
                batch = []
                for index, item in items:
                    if item is None:
                        open_streams -= 1
                    elif isinstance(item, BaseException):
                        raise item
                    else:
                        batch.append((index, item))
                if batch:
                    yield batch
        finally:
            for task in tasks:
                task.cancel()
    finally:
        for stream in streams:
            stream.abort()


async def final_outputs(streams: list[RequestStream]) -> list[Any]:
    """The last snapshot of every stream, in prompt order."""
    last: dict[int, Any] = {}
    async for batch in batches(streams):
        for index, out in batch:
            last[index] = out
    return [last[i] for i in range(len(streams))]


class _ChoiceCursor:
    """What one choice has streamed so far."""

    __slots__ = ("tokens", "text_offset", "done", "started")

    def __init__(self) -> None:
        self.tokens = 0
        self.text_offset = 0  # characters of token text already streamed (logprobs)
        self.done = False
        self.started = False


class _StreamState:
    """The cursors and last snapshots of one streamed response."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.cursors: dict[int, _ChoiceCursor] = {}
        self.last: dict[int, Any] = {}

    def changed_choices(self, batch: list[tuple[int, Any]], *, emit_first: bool
                        ) -> Iterator[tuple[int, Any, str, _ChoiceCursor]]:
        """``(choice index, completion, new text, cursor)`` for every choice of
        `batch` with something to send: new text, its end, or (`emit_first`) its
        first chunk. The caller updates the cursor's `tokens` via `advance`."""
        deltas: dict[int, str] = {}
        latest: dict[int, Any] = {}
        for index, out in batch:
            self.last[index] = out
            for c in out.outputs:
                key = index * self.n + c.index
                deltas[key] = deltas.get(key, "") + c.text_delta
                latest[key] = c
        for key, c in latest.items():
            cursor = self.cursors.setdefault(key, _ChoiceCursor())
            if cursor.done:
                continue
            text = deltas[key]
            if not text and not c.finished and not (emit_first and not cursor.started):
                continue
            yield key, c, text, cursor

    @staticmethod
    def advance(cursor: _ChoiceCursor, c: Any) -> None:
        cursor.tokens = len(c.token_ids)
        cursor.started = True
        cursor.done = c.finished

    def usage(self) -> dict[str, int]:
        return usage([self.last[i] for i in sorted(self.last)])


async def _chunks(streams: list[RequestStream], base: dict[str, Any], n: int, *,
                  emit_first: bool, include_usage: bool,
                  choice: Callable[[int, Any, str, _ChoiceCursor], dict[str, Any]]
                  ) -> AsyncIterator[dict]:
    """`base` with the choices that changed in each batch of snapshots, then (with
    `include_usage`) the usage chunk. ``choice(index, completion, new text,
    cursor)`` builds a choice in the response's format from the cursor as it was
    before this batch; the finish reason is added here."""
    state = _StreamState(n)
    async for batch in batches(streams):
        choices = []
        for key, c, text, cursor in state.changed_choices(batch, emit_first=emit_first):
            built = choice(key, c, text, cursor)
            built["finish_reason"] = c.finish_reason
            built.update(choice_error(c))
            state.advance(cursor, c)
            choices.append(built)
        if choices:
            yield {**base, "choices": choices}
    if include_usage:
        yield {**base, "choices": [], "usage": state.usage()}


def completion_chunks(streams: list[RequestStream], *, model: str, n: int,
                      logprobs: int | None, texts: TokenTexts,
                      include_usage: bool) -> AsyncIterator[dict]:
    """The ``text_completion`` chunks of a streamed completion."""
    base = {"id": new_id("cmpl"), "object": OBJECT_COMPLETION, "created": int(time.time()),
            "model": model}

    def choice(key: int, c: Any, text: str, cursor: _ChoiceCursor) -> dict[str, Any]:
        built: dict[str, Any] = {"index": key, "text": text, "logprobs": None}
        new_tokens = c.token_ids[cursor.tokens:]
        if logprobs is not None and new_tokens:
            entries = (c.logprobs or [])[cursor.tokens:]
            built["logprobs"] = completion_logprobs(texts, new_tokens, entries, logprobs,
                                                    cursor.text_offset)
            cursor.text_offset += sum(len(t) for t in built["logprobs"]["tokens"])
        return built

    return _chunks(streams, base, n, emit_first=False, include_usage=include_usage,
                   choice=choice)


def chat_chunks(streams: list[RequestStream], *, model: str, n: int,
                top_logprobs: int | None, texts: TokenTexts,
                include_usage: bool) -> AsyncIterator[dict]:
    """The ``chat.completion.chunk`` chunks of a streamed chat completion: each
    choice's first chunk carries the assistant role."""
    base = {"id": new_id("chatcmpl"), "object": OBJECT_CHAT_CHUNK, "created": int(time.time()),
            "model": model}

    def choice(key: int, c: Any, text: str, cursor: _ChoiceCursor) -> dict[str, Any]:
        delta: dict[str, Any] = {"content": text} if text else {}
        if not cursor.started:
            delta = {"role": "assistant", "content": text}
        built: dict[str, Any] = {"index": key, "delta": delta, "logprobs": None}
        new_tokens = c.token_ids[cursor.tokens:]
        if top_logprobs is not None and new_tokens:
            entries = (c.logprobs or [])[cursor.tokens:]
            built["logprobs"] = chat_logprobs(texts, new_tokens, entries, top_logprobs)
        return built

    return _chunks(streams, base, n, emit_first=True, include_usage=include_usage,
                   choice=choice)
