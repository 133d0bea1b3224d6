"""The server's built-in routes, one module per endpoint family.

Each module has a `router` (a FastAPI `APIRouter`); its handlers reach the server
through `request.app.state.server` (`ServerState`: settings, the `AsyncEngine`,
the IO processor). `include_builtin_routes` mounts them all; `build_app` calls it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fastapi import FastAPI

ROUTE_MODULES = ("info", "completions", "chat", "embeddings", "pooling", "tokenize")


def include_builtin_routes(app: FastAPI) -> None:
    """Mount every built-in router on `app`."""
    import importlib

    for name in ROUTE_MODULES:
        app.include_router(importlib.import_module(f"{__name__}.{name}").router)
