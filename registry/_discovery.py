"""Discovery: ask every source, then decide which plugins are enabled
(manifest flag, requires-engine, the ENGINE_PLUGINS allow-list, precedence)."""

from __future__ import annotations

import gc
import logging
import os
import threading
from dataclasses import dataclass, replace
from time import perf_counter

from registry._env import PluginFilter, autoload, config_dir, plugin_dirs, plugin_filter, strict_mode
from registry._errors import PluginLoadError
from registry._groups import api_problem, resolve_group
from registry._records import SOURCE_RANK, PluginRecord, record_discovery, record_event
from registry._sources import Problem, Scan, plugin_manager
from registry._state import read_disabled, state_path, state_stamp
from registry._version import __version__
from registry._versions import admits

logger = logging.getLogger("registry")

# the environment that decides what discovery finds; a change means a new scan
_ENV_KEYS = ("ENGINE_PLUGIN_DIRS", "ENGINE_PLUGINS", "ENGINE_CONFIG_DIR", "ENGINE_PLUGINS_AUTOLOAD",
             "ENGINE_STRICT_PLUGINS")


@dataclass(frozen=True)
class Discovery:
    """The outcome of one discovery pass."""

    records: tuple[PluginRecord, ...]
    problems: tuple[Problem, ...]
    seconds: float


_cache: tuple[tuple[object, ...], Discovery] | None = None
_lock = threading.Lock()


def clear_cache() -> None:
    """Forget the cached discovery; the next `discover` scans again."""
    global _cache
    with _lock:
        _cache = None


def _filter_verdict(record: PluginRecord, flt: PluginFilter, auto: bool,
                    disabled: frozenset[tuple[str | None, str]]) -> tuple[str, str] | None:
    """(disabled_by, reason) when the operator's choices keep `record` out, else None.
    A deny always wins; a positive ENGINE_PLUGINS entry overrides autoload and the
    persisted state; builtins are exempt from all of it."""
    if record.source == "builtin":
        return None
    if flt.denies(record.group, record.name):
        return "ENGINE_PLUGINS", "denied by ENGINE_PLUGINS"
    if flt.allows(record.group, record.name):
        return None
    if flt.is_allow_list:
        return "ENGINE_PLUGINS", "not in ENGINE_PLUGINS"
    if not auto and record.source in ("entry-point", "config-dir"):
        return "ENGINE_PLUGINS_AUTOLOAD", "ENGINE_PLUGINS_AUTOLOAD=0 (name it in ENGINE_PLUGINS to load it)"
    if (None, record.name) in disabled or (record.group, record.name) in disabled:
        return "state", "disabled with `engine plugins disable` (enable it with `engine plugins enable`)"
    return None


def _decide(found: list[PluginRecord], scan: Scan) -> list[tuple[PluginRecord, str]]:
    """Return each record with its final `enabled`/`disabled_reason`/`disabled_by`,
    plus the trace outcome."""
    flt = plugin_filter()
    auto = autoload()
    try:
        disabled = read_disabled()
    except ValueError as exc:
        scan.problem(logging.ERROR, f"{exc} (ignoring it)", "invalid", "config-dir", state_path())
        disabled = frozenset()
    for message in flt.problems:
        scan.problems.append(Problem(logging.WARNING, message, "missing"))
    decided: list[tuple[PluginRecord, str]] = []
    for record in found:
        outcome = "discovered"
        verdict = None if not record.enabled else _filter_verdict(record, flt, auto, disabled)
        api = None if record.api is None else api_problem(record.group, record.api,
                                                          record.describe())
        if not record.enabled:
            record = replace(record, disabled_by="manifest")
            outcome = "disabled"
        elif verdict is not None:
            record = replace(record, enabled=False, disabled_by=verdict[0],
                             disabled_reason=verdict[1])
            outcome = "filtered"
        elif api is not None and api[0]:
            record = replace(record, enabled=False, disabled_reason=api[1], disabled_by="api")
            scan.problems.append(Problem(logging.WARNING, f"skipping: {api[1]}", "", record))
            outcome = "incompatible"
        elif record.requires_engine and not admits(record.requires_engine):
            reason = f"requires engine {record.requires_engine}, this is engine {__version__}"
            record = replace(record, enabled=False, disabled_reason=reason,
                             disabled_by="requires-engine")
            scan.problems.append(
                Problem(logging.WARNING, f"skipping {record.describe()}: {reason}", "", record)
            )
            outcome = "incompatible"
        if api is not None and not api[0] and record.enabled:  # older, supported: warned
            scan.problems.append(Problem(logging.WARNING, api[1], "", record))
        decided.append((record, outcome))
    decided = _apply_precedence(decided, scan)
    if flt.allow:
        known = {(record.group, record.name) for record in found}
        names = {name for _, name in known}
        shown = sorted(names)[:20]
        listing = ", ".join(shown) + (", ..." if len(names) > len(shown) else "")
        for group, name in sorted(flt.allow, key=lambda p: (p[1], p[0] or "")):
            if (name in names) if group is None else ((group, name) in known):
                continue
            label = name if group is None else f"{group}:{name}"
            scan.problems.append(
                Problem(
                    logging.WARNING,
                    f"ENGINE_PLUGINS names {label!r}, but no plugin source provides a plugin "
                    f"of that name (known: {listing or 'none'})",
                    "missing",
                )
            )
    return decided


def _apply_precedence(
    decided: list[tuple[PluginRecord, str]], scan: Scan
) -> list[tuple[PluginRecord, str]]:
    """Among enabled records with the same (group, name) the highest-ranked source
    wins (plugin-dir > config-dir > entry-point > builtin; the first found on a tie)."""
    winners: dict[tuple[str, str], PluginRecord] = {}
    for record, _ in decided:
        key = (record.group, record.name)
        if record.enabled:
            best = winners.get(key)
            if best is None or SOURCE_RANK[record.source] > SOURCE_RANK[best.source]:
                winners[key] = record
    result = []
    for record, outcome in decided:
        winner = winners.get((record.group, record.name))
        if record.enabled and winner is not record:
            assert winner is not None
            reason = f"shadowed by {winner.source} {winner.origin}"
            scan.problems.append(
                Problem(
                    logging.WARNING,
                    f"plugin {record.name!r} ({record.group}) is provided twice: "
                    f"{winner.source} {winner.origin} wins over {record.source} "
                    f"{record.origin}, which is not loaded",
                    "",
                    record,
                )
            )
            record = replace(record, enabled=False, disabled_reason=reason, disabled_by="shadowed")
            outcome = "shadowed"
        result.append((record, outcome))
    return result


def _scan() -> Discovery:
    start = perf_counter()
    scan = Scan(plugin_dirs=plugin_dirs(), config_dir=config_dir())
    found = [r for batch in plugin_manager().hook.registry_find_plugins(scan=scan) for r in batch]
    found.sort(key=lambda r: SOURCE_RANK[r.source])  # stable: keeps each source's order
    seconds = {id(r): scan.seconds.get(id(r), 0.0) for r in found}
    decided = _decide(found, scan)
    record_discovery([
        (record, outcome, seconds[id(original)],
         record.disabled_reason if outcome not in ("discovered", "disabled") else None)
        for (record, outcome), original in zip(decided, found, strict=True)
    ])
    strict = strict_mode()  # then the problems are raised by `discover`, not logged
    for problem in scan.problems:
        if problem.record is None and problem.outcome:
            record_event(
                None, problem.outcome, error=problem.message,
                source=problem.source, origin=problem.origin,
            )
        if not strict:
            logger.log(problem.level, problem.message)
    records = tuple(record for record, _ in decided)
    seconds = perf_counter() - start
    logger.info("discovered %d plugins (%d enabled) in %.1f ms", len(records),
                sum(r.enabled for r in records), seconds * 1000)
    return Discovery(records, tuple(scan.problems), seconds)


def _scan_without_gc() -> Discovery:
    # a scan allocates thousands of objects that all live on and form no cycles
    # (records, models, events): collector passes during it are pure cost
    enabled = gc.isenabled()
    gc.disable()
    try:
        return _scan()
    finally:
        if enabled:
            gc.enable()


def current_discovery() -> Discovery:
    """The cached discovery for the current environment, scanning when it changed.
    Problems are logged once per scan (in strict mode `discover` raises them
    instead, and callers of this function report them); nothing here raises."""
    global _cache
    key = (*(os.environ.get(name) for name in _ENV_KEYS), state_stamp())
    with _lock:
        if _cache is None or _cache[0] != key:
            _cache = (key, _scan_without_gc())
        return _cache[1]


def raise_if_strict(problems: tuple[Problem, ...] | list[Problem]) -> None:
    """In strict mode, turn logged plugin problems into a PluginLoadError."""
    if problems and strict_mode():
        # one line however many problems: the CLI prints it as is
        more = f" (and {len(problems) - 1} more: see `engine plugins doctor`)" if len(problems) > 1 else ""
        raise PluginLoadError(
            f"{problems[0].message}{more} [strict plugin mode: ENGINE_STRICT_PLUGINS=1 / "
            "--strict-plugins]",
            problems[0].record,
        )


def discover(group: str | None = None) -> list[PluginRecord]:
    """Every discovered plugin (of `group`, an alias or full name; None: all groups),
    disabled ones included, in load order: builtin, entry-point, config-dir,
    plugin-dir, each in its own stable order.

    The result is cached per process for the current values of ``ENGINE_PLUGIN_DIRS``,
    ``ENGINE_PLUGINS`` and ``ENGINE_CONFIG_DIR``. Bad manifests and conflicts are
    logged (once per scan); in strict mode they raise PluginLoadError.
    """
    full = resolve_group(group) if group is not None else None
    discovery = current_discovery()
    raise_if_strict(discovery.problems)
    return [r for r in discovery.records if full is None or r.group == full]
