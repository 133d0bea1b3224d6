"""The plugin doctor (`engine plugins doctor`): discovery, conflicts, imports,
settings and effects checked in one pass, as findings grouped in sections. The
caller decides how to show them and may add sections of its own."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

from registry._discovery import current_discovery
from registry._env import config_dir, plugin_dirs
from registry._groups import (
    API_ROUTE_PLUGINS,
    LOGITS_PROCESSOR_PLUGINS,
    QUANTIZATION_PLUGINS,
    STAT_LOGGER_PLUGINS,
    group_alias,
)
from registry._loading import import_plugin, load_general_plugins
from registry._records import PluginRecord, load_trace
from registry._running import effects
from registry._settings import (
    PluginConfigError,
    model_of,
    raw_plugin_config,
    redacted,
    validate_settings,
)


class DoctorReport:
    """The doctor's findings: ``sections`` maps each title to its lines
    (``{"status": ..., "text": ...}``; status ``ok``, ``info``, ``PROBLEM``, or a
    logging level name such as ``WARNING``), ``problems`` counts the lines that are
    neither ok nor info, ``effects`` holds `registry.effects()` as the Effects
    section saw it.

    `on_section(title)` and `on_line(status, text)`, when given, see each finding
    as it is made (to print a report while plugin code runs).
    """

    def __init__(self, on_section: Callable[[str], None] | None = None,
                 on_line: Callable[[str, str], None] | None = None) -> None:
        self.problems = 0
        self.sections: dict[str, list[dict[str, str]]] = {}
        self.effects: list[dict[str, Any]] = []
        self._current: list[dict[str, str]] = []
        self._on_section = on_section
        self._on_line = on_line

    def section(self, title: str) -> None:
        """Start section `title`; the next findings belong to it."""
        self._current = self.sections.setdefault(title, [])
        if self._on_section is not None:
            self._on_section(title)

    def _add(self, status: str, text: str) -> None:
        self._current.append({"status": status, "text": text})
        if self._on_line is not None:
            self._on_line(status, text)

    def ok(self, text: str) -> None:
        """A check that passed."""
        self._add("ok", text)

    def info(self, text: str) -> None:
        """Something worth knowing that is not a problem."""
        self._add("info", text)

    def problem(self, text: str, label: str = "PROBLEM") -> None:
        """A problem (`label`: ``PROBLEM``, or the logging level it was logged at)."""
        self.problems += 1
        self._add(label, text)


def _check_shape(group: str, value: object) -> str | None:
    """What is wrong with a loaded plugin value's shape for its group, or None."""
    if group == QUANTIZATION_PLUGINS:
        return None if isinstance(value, type) else "value should be a QuantizationMethod subclass"
    if group == STAT_LOGGER_PLUGINS:
        return None if isinstance(value, type) else "value should be a StatLoggerBase subclass"
    if group == LOGITS_PROCESSOR_PLUGINS:
        return None if isinstance(value, type) else "value should be a LogitsProcessor subclass"
    if group == API_ROUTE_PLUGINS:  # an APIRouter itself, or a callable returning one
        return None
    return None if callable(value) else "value should be callable"


def _discovery(report: DoctorReport) -> list[PluginRecord]:
    discovery = current_discovery()
    report.section("Discovery")
    report.info(f"config dir: {os.path.join(config_dir(), 'plugins')}")
    report.info(f"plugin dirs: {', '.join(plugin_dirs()) or '(none)'}")
    allowed = os.environ.get("ENGINE_PLUGINS")
    shown = "(unset: everything allowed)" if allowed is None else repr(allowed)
    report.info(f"ENGINE_PLUGINS: {shown}")
    if os.environ.get("ENGINE_PLUGINS_AUTOLOAD") is not None:
        report.info(f"ENGINE_PLUGINS_AUTOLOAD: {os.environ['ENGINE_PLUGINS_AUTOLOAD']!r}")
    by_state = sorted({r.name for r in discovery.records if r.disabled_by == "state"})
    if by_state:
        report.info(f"disabled with `engine plugins disable`: {', '.join(by_state)}")
    enabled = sum(r.enabled for r in discovery.records)
    report.info(f"{len(discovery.records)} plugins found, {enabled} enabled, "
                f"in {discovery.seconds * 1000:.1f} ms")
    for problem in discovery.problems:
        report.problem(problem.message, logging.getLevelName(problem.level))
    report.section("Conflicts")
    shadowed = [r for r in discovery.records if r.disabled_by == "shadowed"]
    for r in shadowed:
        report.info(f"{r.name} ({r.group}): {r.source} {r.origin} is {r.disabled_reason}")
    if not shadowed:
        report.ok("no plugin is provided twice")
    return list(discovery.records)


def _imports(report: DoctorReport, records: list[PluginRecord]) -> None:
    report.section("Imports")
    for r in records:
        label = f"{group_alias(r.group)}/{r.name} = {r.value} ({r.source} {r.origin})"
        if not r.enabled:
            report.info(f"{label}: not loaded: {r.disabled_reason}")
            continue
        try:
            value = import_plugin(r)
        except Exception as exc:
            report.problem(f"{label}: cannot import: {type(exc).__name__}: {exc}")
            continue
        shape = _check_shape(r.group, value)
        if shape:
            report.problem(f"{label}: {shape}")
        else:
            report.ok(label)


def _settings(report: DoctorReport, records: list[PluginRecord]) -> None:
    """Validate the settings of every enabled plugin that declares a model (manifest
    ``config`` or ``engine_config_model``) or was given values."""
    report.section("Settings")
    try:
        given = raw_plugin_config()
    except PluginConfigError as exc:
        for line in exc.problems:
            report.problem(line)
        given = {}
    known = {r.name for r in records}
    for name in sorted(set(given) - known):
        report.problem(f"plugin {name} config: (settings): no plugin named {name!r} is discovered")
    checked = 0
    for r in records:
        if not r.enabled:
            continue
        try:
            model = model_of(r)
        except Exception as exc:
            if r.config_model or r.name in given:
                report.problem(f"plugin {r.name} config: (settings): cannot load its settings "
                               f"model: {type(exc).__name__}: {exc}")
            continue
        if model is None:
            if r.name in given:
                report.problem(f"plugin {r.name} config: (settings): values were given, but "
                               "the plugin declares no settings model")
            continue
        checked += 1
        try:
            settings = validate_settings(r.name, model, given.get(r.name, {}))
        except PluginConfigError as exc:
            for line in exc.problems:
                report.problem(line)
            continue
        report.ok(f"{r.name}: {json.dumps(redacted(settings))}")
    if not checked and not given:
        report.info("no plugin declares settings")


def _effects(report: DoctorReport) -> None:
    """Run the general plugins (as an engine start does) and list every registration
    made so far in this process, naming the plugin that made it."""
    report.section("Effects")
    try:
        load_general_plugins()
    except Exception as exc:  # strict mode: the failure is the report
        report.problem(f"general plugins: {exc}")
    for event in load_trace():
        if event.outcome == "call-failed" and event.pid == os.getpid():
            report.problem(f"general plugin {event.name!r} ({event.source} {event.origin}) "
                           f"raised when called: {event.error}")
    report.effects = effects()
    for effect in report.effects:
        replaced = f" (replaces {effect['replaced']}'s)" if effect["replaced"] else ""
        text = f"{effect['plugin']}: {effect['kind']} {effect['target']}{replaced}"
        if effect["replaced"] and effect["replaced"] != effect["plugin"]:
            report.problem(text, "WARNING")
        else:
            report.info(text)
    if not report.effects:
        report.info("no registrations recorded")


def doctor(report: DoctorReport,
           extra_sections: Sequence[Callable[[DoctorReport], None]] = ()) -> DoctorReport:
    """Check everything discovered, filling `report` section by section: Discovery
    (where plugins come from, every discovery problem), Conflicts (plugins provided
    twice), Imports (every enabled plugin's value imported and its shape checked),
    Settings (every declared settings model validated); then `extra_sections`, the
    caller's own checks (the engine adds its platform choice); last Effects, which
    runs the general plugins and lists every registration made in this process,
    the extra sections' included. Plugin code runs. Returns `report`."""
    records = _discovery(report)
    _imports(report, records)
    _settings(report, records)
    for section in extra_sections:
        section(report)
    _effects(report)
    return report
