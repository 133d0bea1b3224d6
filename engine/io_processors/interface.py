"""The `IOProcessor` base class that io_processor plugins subclass."""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from typing import Any

from engine.config import EngineConfig
from engine.pooling_params import PoolingParams


class IOProcessor(ABC):
    """Turns a request's data into prompts to pool, and pooling outputs into a response.

    `LLM.encode(data, pooling_task="plugin")` runs, for one request::

        parsed  = processor.parse_data(data)
        params  = processor.merge_pooling_params(pooling_params)
        prompts = processor.pre_process(parsed, request_id=request_id)
        outputs = <the engine pools `prompts` with `params`>
        result  = processor.post_process(outputs, request_id=request_id)

    `prompts` is one prompt or a list of them (text, or token-id lists). `outputs`
    is a list with one pooling output per prompt, in prompt order; each has
    ``.outputs.embedding`` (a list of floats), like `LLM.embed`'s results.
    `result` is returned to the caller as it is. An exception raised by any of these
    fails that request only (`IOProcessorError`, with the plugin's message).

    One instance serves many requests, possibly concurrently in the server: keep
    per-request state keyed by `request_id` (unique per request).
    """

    #: the plugin name it was selected by; set by `get_io_processor`
    plugin_name: str | None = None

    def __init__(self, config: EngineConfig) -> None:
        """`config` is the engine's `EngineConfig`."""
        self.config = config

    @abstractmethod
    def parse_data(self, data: Any) -> Any:
        """Validate the request's raw data (a Python object, or the JSON body's ``data``
        in the server) and return the plugin's own input type. Raise `ValueError`
        naming the bad field."""

    def merge_pooling_params(self, params: PoolingParams | None = None) -> PoolingParams:
        """The pooling parameters to use, given the caller's (None when not given).
        By default the caller's, else the defaults."""
        return params if params is not None else PoolingParams()

    @abstractmethod
    def pre_process(self, prompt: Any, request_id: str | None = None, **kwargs: Any) -> Any:
        """Turn parsed data into the prompt, or list of prompts, to pool."""

    @abstractmethod
    def post_process(self, model_output: Any, request_id: str | None = None, **kwargs: Any) -> Any:
        """Turn the pooling outputs (one per prompt, in order) into the response."""

    async def pre_process_async(
        self, prompt: Any, request_id: str | None = None, **kwargs: Any
    ) -> Any:
        """Async `pre_process`, used by the server; defaults to the sync one run in
        a worker thread (a slow `pre_process` never blocks the event loop)."""
        return await asyncio.to_thread(self.pre_process, prompt, request_id=request_id, **kwargs)

    async def post_process_async(
        self, model_output: Any, request_id: str | None = None, **kwargs: Any
    ) -> Any:
        """Async `post_process`, used by the server; defaults to the sync one run in
        a worker thread."""
        return await asyncio.to_thread(self.post_process, model_output, request_id=request_id,
                                       **kwargs)


class IOProcessorError(RuntimeError):
    """An IO processor raised while handling one request.

    `.plugin` is the plugin name (or class name), `.stage` the method that raised
    (``parse_data``, ``merge_pooling_params``, ``pre_process``, ``post_process``),
    and ``__cause__`` the original exception, whose message this one repeats.
    """

    def __init__(self, plugin: str, stage: str, cause: BaseException) -> None:
        super().__init__(f"IO processor plugin {plugin!r} failed in {stage}: {cause}")
        self.plugin = plugin
        self.stage = stage
