"""Entry points that serve the engine to other programs: the OpenAI-compatible
HTTP server (`engine serve`).

`AsyncEngine` runs one engine in a background thread for asyncio code;
`build_app` / `run_server` (in `engine.entrypoints.api_server`) make and run the
FastAPI app. Importing this package imports neither torch nor FastAPI.
"""

from __future__ import annotations

from engine._lazy import lazy_exports

_LAZY = {
    "AsyncEngine": "engine.entrypoints.async_engine",
    "RequestStream": "engine.entrypoints.async_engine",
    "EngineUnavailableError": "engine.entrypoints.async_engine",
    "ServerSettings": "engine.entrypoints.api_server",
    "build_app": "engine.entrypoints.api_server",
    "run_server": "engine.entrypoints.api_server",
}

__all__ = list(_LAZY)

__getattr__, __dir__ = lazy_exports(__name__, _LAZY, globals())
