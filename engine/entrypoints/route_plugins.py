"""Route plugins: ``api_route`` plugins mounted under ``/plugins/NAME/``.

A plugin's value is a `fastapi.APIRouter`, or a callable returning one. Route
plugins are off unless the operator names them: in a positive ``ENGINE_PLUGINS``
entry (``NAME`` or ``api_route:NAME``) or with ``engine serve
--enable-route-plugin NAME``; a negative entry (``-NAME``) always wins. Mounted
routes sit behind the same middleware as the built-in ones (``--api-key``, the
body limit). A plugin whose routes would land on a path the server already
serves, or whose name cannot be a URL segment, is refused.

Handlers reach the engine through ``request.app.state.engine``, an
`engine.entrypoints.async_engine.AsyncEngine` (its public methods are listed in
docs/extension-points.md and docs/reference.md).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from typing import Any

from fastapi import APIRouter, FastAPI

logger = logging.getLogger("engine.serve")

PREFIX = "/plugins"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class RoutePluginError(ValueError):
    """A route plugin cannot be mounted: the message names it and says why."""


def selected_route_plugins(enabled: Sequence[str] = ()) -> list[Any]:
    """The discovered ``api_route`` records to mount: named by `enabled`
    (``--enable-route-plugin``) or by a positive ``ENGINE_PLUGINS`` entry, and
    not denied. Raises RoutePluginError for a name in `enabled` that no source
    provides."""
    import registry

    group = registry.API_ROUTE_PLUGINS
    records = registry.discover(group)
    known = {r.name for r in records}
    missing = [name for name in enabled if name not in known]
    if missing:
        raise RoutePluginError(
            f"--enable-route-plugin {', '.join(missing)}: no api_route plugin of that name "
            f"(discovered: {', '.join(sorted(known)) or 'none'})"
        )
    chosen = []
    for record in records:
        if registry.denied_in_plugins_env(group, record.name):
            continue
        if not (record.name in enabled or registry.named_in_plugins_env(group, record.name)):
            continue
        # --enable-route-plugin also admits a plugin that an allow-list of other
        # names left out; any other reason to disable it (its manifest, `engine
        # plugins disable`, a version mismatch, precedence) still holds
        if record.enabled or (record.name in enabled and record.disabled_by == "ENGINE_PLUGINS"):
            chosen.append(record)
    return chosen


def mount_route_plugins(app: FastAPI, enabled: Sequence[str] = ()) -> list[str]:
    """Mount the selected route plugins on `app` (after its built-in routes).
    Returns the mounted plugins' names.

    A plugin that fails to import, returns no `APIRouter`, has a name that is not
    a URL segment, or would shadow a route the app already has is logged at
    ERROR naming it and left out (strict mode: RoutePluginError); the others
    are mounted.
    """
    import registry

    mounted = []
    for record in selected_route_plugins(enabled):
        try:
            router = _router_of(record)
            _check_clashes(app, record.name, router)
        except Exception as exc:
            message = f"route plugin {record.name!r} ({record.origin}) is not mounted: {exc}"
            if registry.strict_mode():
                raise RoutePluginError(message) from exc
            logger.error("%s", message)
            continue
        prefix = f"{PREFIX}/{record.name}"
        app.include_router(router, prefix=prefix)
        registry.record_effect("api_route", prefix + "/", plugin=record)
        logger.info("mounted route plugin %r under %s/", record.name, prefix)
        mounted.append(record.name)
    return mounted


def _router_of(record: Any) -> APIRouter:
    import registry

    if not _NAME.match(record.name):
        raise RoutePluginError(f"its name {record.name!r} cannot be a URL path segment")
    value = registry.import_plugin(record)
    router = value
    if not isinstance(value, APIRouter):
        if not callable(value):
            raise RoutePluginError(f"its value {record.value!r} is neither an APIRouter nor callable")
        router = registry.call_as(record, value)
    if not isinstance(router, APIRouter):
        raise RoutePluginError(
            f"its value {record.value!r} returned {type(router).__name__}, not a fastapi.APIRouter"
        )
    return router


def served_routes(app_or_router: Any) -> set[tuple[str, str]]:
    """Every ``(method, path)`` an app or router serves (``"*"`` for a route
    without methods, such as a mount), included routers walked with their
    prefixes."""
    router = getattr(app_or_router, "router", app_or_router)
    return _route_keys(router.routes)


def _route_keys(routes: Sequence[Any], prefix: str = "") -> set[tuple[str, str]]:
    keys: set[tuple[str, str]] = set()
    for route in routes:
        included = getattr(route, "original_router", None)  # fastapi's lazily included router
        if included is not None:
            context = getattr(route, "include_context", None)
            keys |= _route_keys(included.routes, prefix + getattr(context, "prefix", ""))
            continue
        path = prefix + getattr(route, "path", "")
        for method in getattr(route, "methods", None) or {"*"}:
            keys.add((method, path))
    return keys


def _check_clashes(app: FastAPI, name: str, router: APIRouter) -> None:
    prefix = f"{PREFIX}/{name}"
    taken = served_routes(app)
    for method, path in sorted(_route_keys(router.routes, prefix)):
        if any(part in (".", "..") for part in path.split("/")):
            raise RoutePluginError(f"its route {path!r} has a '.' or '..' segment")
        if (method, path) in taken or ("*", path) in taken or (method == "*" and any(
                p == path for _, p in taken)):
            raise RoutePluginError(f"its route {method} {path} would shadow a route the server has")
