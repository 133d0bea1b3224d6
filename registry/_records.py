"""What the registry knows about one plugin (PluginRecord) and what happened to
it (LoadEvent, kept in the process's load trace)."""

from __future__ import annotations

import os
import threading
from collections import deque
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:  # importlib.metadata is slow to import; only loading needs it
    from importlib.metadata import EntryPoint

# source labels, lowest precedence first (docs/reference.md, "Sources and precedence")
SOURCES: tuple[str, ...] = ("builtin", "entry-point", "config-dir", "plugin-dir")
SOURCE_RANK = {source: rank for rank, source in enumerate(SOURCES)}


@dataclass(frozen=True)
class PluginRecord:
    """One discovered plugin, from any source.

    ``group`` is the full entry-point group name; ``source`` one of ``builtin``,
    ``entry-point``, ``config-dir``, ``plugin-dir``; ``origin`` the manifest or
    ``pyproject.toml`` path, or ``"<distribution> <version>"`` for an installed
    entry point. ``enabled`` is the final verdict after the manifest's own
    ``enabled``, ``requires-engine``, ``ENGINE_PLUGINS`` and precedence;
    ``disabled_reason`` says why when it is False, and ``disabled_by`` what decided
    it: ``manifest``, ``ENGINE_PLUGINS``, ``ENGINE_PLUGINS_AUTOLOAD``, ``state``
    (`engine plugins disable`), ``requires-engine``, ``api`` or ``shadowed``.
    ``config_model`` is the manifest's ``config`` (the settings model's
    ``module:Class``) and ``api`` its ``api`` (interface version), when given.
    ``path`` is the folder put on
    ``sys.path`` before the value is imported (None: nothing is added).
    """

    group: str
    name: str
    value: str
    source: str
    origin: str
    enabled: bool = True
    description: str = ""
    path: str | None = None
    requires_engine: str | None = None
    disabled_reason: str | None = None
    disabled_by: str | None = None
    config_model: str | None = None
    api: int | None = None

    def entry_point(self) -> EntryPoint:
        """This plugin as an ``importlib.metadata.EntryPoint`` (what the loader loads)."""
        from importlib.metadata import EntryPoint

        return EntryPoint(name=self.name, value=self.value, group=self.group)

    def describe(self) -> str:
        """``'name' (group) from source origin``, for log messages."""
        return f"plugin {self.name!r} ({self.group}) from {self.source} {self.origin}"

    def to_json(self) -> dict[str, Any]:
        """The keys of `engine plugins list --json` (docs/reference.md, "CLI")."""
        return asdict(self)


class LoadEvent(NamedTuple):
    """One step in a plugin's life in this process.

    ``outcome`` is one of: ``discovered``, ``disabled``, ``incompatible``,
    ``filtered``, ``shadowed``, ``invalid`` (bad manifest), ``refused`` (unsafe
    folder), ``missing`` (allow-listed name nobody provides), ``loaded``,
    ``import-failed``, ``called``, ``call-failed``. ``seconds`` is the time the
    step took (for discovery: reading and validating the plugin's manifest, or
    the entry-point scan); ``error`` the problem text, if any.
    """

    group: str
    name: str
    source: str
    origin: str
    pid: int
    outcome: str
    seconds: float = 0.0
    error: str | None = None


_TRACE: deque[LoadEvent] = deque(maxlen=100_000)
_TRACE_LOCK = threading.Lock()


def record_event(
    record: PluginRecord | None,
    outcome: str,
    seconds: float = 0.0,
    error: str | None = None,
    *,
    source: str = "",
    origin: str = "",
) -> None:
    """Append one event to this process's load trace."""
    if record is not None:
        group, name, source, origin = record.group, record.name, record.source, record.origin
    else:
        group = name = ""
    event = LoadEvent(group, name, source, origin, os.getpid(), outcome, seconds, error)
    with _TRACE_LOCK:
        _TRACE.append(event)


def record_discovery(events: list[tuple[PluginRecord, str, float, str | None]]) -> None:
    """Append one discovery event per (record, outcome, seconds, error), in one go."""
    pid = os.getpid()
    batch = [LoadEvent(r.group, r.name, r.source, r.origin, pid, outcome, seconds, error)
             for r, outcome, seconds, error in events]
    with _TRACE_LOCK:
        _TRACE.extend(batch)


def load_trace() -> list[LoadEvent]:
    """Every discovery and load event of this process so far, oldest first."""
    with _TRACE_LOCK:
        return list(_TRACE)
