"""One IO-processor request, start to end: parse, pre-process, pool, post-process.

`LLM.encode(data, pooling_task="plugin")` and the server's pooling route both run
requests through here, so a plugin behaves the same in both.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from engine.io_processors.interface import IOProcessor, IOProcessorError
from engine.pooling_params import PoolingParams

# (prompts, pooling params) -> one pooling output per prompt, in order
PoolFn = Callable[[list[Any], PoolingParams], list[Any]]
AsyncPoolFn = Callable[[list[Any], PoolingParams], Awaitable[list[Any]]]


def process_request(
    processor: IOProcessor,
    data: Any,
    pool: PoolFn,
    pooling_params: PoolingParams | None = None,
    request_id: str | None = None,
) -> Any:
    """Run one request through `processor`, pooling its prompts with `pool`.

    Returns what the processor's `post_process` returned. An exception raised by the
    processor becomes `IOProcessorError` (its message included); exceptions from
    `pool` (the engine's own) pass through unchanged.
    """
    request_id = request_id or _new_request_id()
    parsed = _stage(processor, "parse_data", processor.parse_data, data)
    params = _stage(processor, "merge_pooling_params", processor.merge_pooling_params,
                    pooling_params)
    prompts = _stage(processor, "pre_process", processor.pre_process, parsed,
                     request_id=request_id)
    outputs = pool(_as_prompt_list(prompts), params)
    return _stage(processor, "post_process", processor.post_process, outputs,
                  request_id=request_id)


async def process_request_async(
    processor: IOProcessor,
    data: Any,
    pool: AsyncPoolFn,
    pooling_params: PoolingParams | None = None,
    request_id: str | None = None,
) -> Any:
    """`process_request` for the server: the processor's `*_async` methods and an
    async `pool`."""
    request_id = request_id or _new_request_id()
    parsed = _stage(processor, "parse_data", processor.parse_data, data)
    params = _stage(processor, "merge_pooling_params", processor.merge_pooling_params,
                    pooling_params)
    try:
        prompts = await processor.pre_process_async(parsed, request_id=request_id)
    except Exception as exc:
        raise _error(processor, "pre_process", exc) from exc
    outputs = await pool(_as_prompt_list(prompts), params)
    try:
        return await processor.post_process_async(outputs, request_id=request_id)
    except Exception as exc:
        raise _error(processor, "post_process", exc) from exc


def _stage(processor: IOProcessor, stage: str, method: Callable[..., Any], *args: Any,
           **kwargs: Any) -> Any:
    try:
        return method(*args, **kwargs)
    except Exception as exc:
        raise _error(processor, stage, exc) from exc


def _error(processor: IOProcessor, stage: str, exc: Exception) -> IOProcessorError:
    plugin = processor.plugin_name or type(processor).__qualname__
    return IOProcessorError(plugin, stage, exc)


def _as_prompt_list(prompts: Any) -> list[Any]:
    """One prompt (text, token ids, or a dict) or a sequence of them -> a list."""
    if isinstance(prompts, (str, dict)):
        return [prompts]
    prompts = list(prompts)
    if prompts and all(isinstance(p, int) for p in prompts):
        return [prompts]  # a single prompt given as token ids
    return prompts


def _new_request_id() -> str:
    return f"io-{uuid.uuid4().hex}"
