"""Where plugins come from (docs/reference.md, "Sources and precedence"). Each source is a pluggy plugin
implementing the one hook `registry_find_plugins`; all of them return the same
PluginRecord type, so one loader loads everything."""

from __future__ import annotations

import functools
import logging
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from time import perf_counter

import pluggy

from registry._errors import ManifestError
from registry._groups import FULL_GROUP_NAME, GROUPS
from registry._manifest import Manifest, load_pyproject_entry_points, parse_manifest, read_file
from registry._records import PluginRecord

PROJECT = "registry"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

_PACKAGE_DIR = Path(__file__).resolve().parent


@dataclass
class DiscoveryProblem:
    """Something discovery logs (at `level`, a logging level) and strict mode turns
    into an error: `message` says what; `outcome` is the load-trace outcome it was
    recorded as (empty: none); `record` the plugin it concerns, when one is known,
    else `source` and `origin` say where it was met."""

    level: int
    message: str
    outcome: str
    record: PluginRecord | None = None
    source: str = ""
    origin: str = ""


@dataclass
class Scan:
    """One discovery pass: its inputs (read from the environment once) and what
    the sources report back besides records."""

    plugin_dirs: list[str]
    config_dir: str
    problems: list[DiscoveryProblem] = field(default_factory=list)
    seconds: dict[int, float] = field(default_factory=dict)  # id(record) -> discovery time
    folder_reasons: dict[str, str | None] = field(default_factory=dict)  # trust, per folder

    def problem(self, level: int, message: str, outcome: str, source: str, origin: str) -> None:
        self.problems.append(DiscoveryProblem(level, message, outcome, None, source, origin))

    def timed(self, records: list[PluginRecord], seconds: float) -> list[PluginRecord]:
        for record in records:
            self.seconds[id(record)] = seconds
        return records


class SourceSpec:
    """The hook every plugin source implements."""

    @hookspec
    def registry_find_plugins(self, scan: Scan) -> list[PluginRecord]:
        """Return the plugins this source provides, in a stable order. Problems
        (bad manifests, unsafe folders) go to ``scan.problem``; never raise."""
        return []  # a specification: pluggy calls the sources' implementations


# ---------------------------------------------------------------------------
# manifests


def unsafe_reason(st: os.stat_result, what: str) -> str | None:
    """Why a manifest folder or file with this stat must not be trusted, or None.

    Manifests name code to run, so whoever can write them can run code here.
    """
    if os.name != "posix":
        return None
    uid = os.getuid()
    if st.st_uid not in (uid, 0):
        return f"{what} is owned by uid {st.st_uid}, neither you (uid {uid}) nor root"
    if st.st_mode & stat.S_IWOTH:
        return f"{what} is writable by all users (mode {stat.S_IMODE(st.st_mode):o})"
    if st.st_mode & stat.S_IWGRP and st.st_gid != os.getgid():
        return (
            f"{what} is writable by group {st.st_gid}, not your own group "
            f"(mode {stat.S_IMODE(st.st_mode):o})"
        )
    return None


class _Unsafe(Exception):
    """A manifest file that must not be trusted; the message says why."""


def _read_manifest_bytes(path: str, check_owner: bool) -> bytes:
    def check(st: os.stat_result) -> None:
        reason = unsafe_reason(st, "the file")
        if reason:
            raise _Unsafe(f"refusing manifest {path}: {reason}; fix its permissions")

    return read_file(path, check if check_owner else None)


def _folder_reason(folder: str, what: str, cache: dict[str, str | None] | None) -> str | None:
    if cache is not None and folder in cache:
        return cache[folder]
    try:
        reason = unsafe_reason(os.stat(folder), what)
    except OSError:  # missing: nothing can be imported from it
        reason = None
    if cache is not None:
        cache[folder] = reason
    return reason


def trust_problems(path: str, sys_path: str | None,
                   cache: dict[str, str | None] | None = None) -> list[str]:
    """Why the manifest at `path` must not be trusted beyond its own file: the real
    folder of a symlinked manifest, and the folder its code is imported from
    (``[package] path`` / a project's ``src``), under the same ownership and
    permission rule as manifest folders. Empty: nothing wrong."""
    problems = []
    if os.path.islink(path):
        real_folder = os.path.dirname(os.path.realpath(path))
        reason = _folder_reason(real_folder, f"its real folder {real_folder}", cache)
        if reason:
            problems.append(f"refusing manifest {path} (a symlink): {reason}; manifests run "
                            "code, so fix the folder's permissions")
    if sys_path is not None:
        reason = _folder_reason(sys_path, f"its code folder {sys_path}", cache)
        if reason:
            problems.append(f"refusing manifest {path}: {reason}; code imported from there "
                            "runs in the engine, so fix the folder's permissions")
    return problems


def manifest_code_path(path: str, manifest: Manifest) -> str | None:
    """The folder a manifest's plugin code is imported from: its ``[package] path``,
    relative to the manifest's folder; None when it names none (nothing is put on
    ``sys.path``)."""
    package = manifest.package
    if package is None or package.path is None:
        return None
    return os.path.normpath(os.path.join(os.path.dirname(path), package.path))


def project_code_path(pyproject: str) -> str:
    """The folder a plugin project's code is imported from: its ``src`` folder when
    it has one (the src layout), else the project's own folder."""
    folder = os.path.dirname(os.path.abspath(pyproject))
    src = os.path.join(folder, "src")
    return src if os.path.isdir(src) else folder


def records_from_manifest(path: str, manifest: Manifest, source: str) -> list[PluginRecord]:
    """One PluginRecord per ``[[plugin]]`` table of the validated `manifest` at `path`."""
    package = manifest.package
    requires = package.requires_engine if package is not None else None
    sys_path = manifest_code_path(path, manifest)
    return [
        PluginRecord(
            group=FULL_GROUP_NAME[entry.group],
            name=entry.name,
            value=entry.value,
            source=source,
            origin=path,
            enabled=entry.enabled,
            description=entry.description,
            path=sys_path,
            requires_engine=requires,
            disabled_reason=None if entry.enabled else "enabled = false in its manifest",
            config_model=entry.config,
            api=entry.api,
        )
        for entry in manifest.plugin
    ]


def records_from_project(path: str, groups: dict[str, dict[str, str]],
                         source: str = "plugin-dir") -> list[PluginRecord]:
    """One PluginRecord per entry point of a plugin project's ``pyproject.toml`` at
    `path` (`groups`: what `load_pyproject_entry_points` read from it)."""
    sys_path = project_code_path(path)
    return [
        PluginRecord(group, name, value, source, path, path=sys_path)
        for group, table in groups.items()
        for name, value in table.items()
    ]


def read_manifest_records(path: str, source: str, scan: Scan, check_owner: bool) -> list[PluginRecord]:
    """The plugins of one manifest; a bad or unsafe manifest becomes an ERROR problem."""
    start = perf_counter()
    try:
        manifest = parse_manifest(path, _read_manifest_bytes(path, check_owner))
    except ManifestError as exc:
        for line in exc.problems:
            scan.problem(logging.ERROR, f"{line} (manifest skipped)", "invalid", source, path)
        return []
    except _Unsafe as exc:
        scan.problem(logging.ERROR, str(exc), "refused", source, path)
        return []
    records = records_from_manifest(path, manifest, source)
    if check_owner:
        problems = trust_problems(path, records[0].path, scan.folder_reasons)
        for problem in problems:
            scan.problem(logging.ERROR, problem, "refused", source, path)
        if problems:
            return []
    return scan.timed(records, perf_counter() - start)


def manifest_files(folder: str) -> list[str]:
    """``folder/*.toml`` but ``pyproject.toml``, sorted by name."""
    try:
        names = os.listdir(folder)
    except OSError:
        return []
    names = [n for n in names if n.endswith(".toml") and n != "pyproject.toml"]
    return [os.path.join(folder, n) for n in sorted(names)]


def _folder_refused(folder: str, source: str, scan: Scan) -> bool:
    reason = _folder_reason(folder, "the folder", None)
    if reason:
        scan.problem(
            logging.ERROR,
            f"refusing plugin manifests in {folder}: {reason}; manifests run code, "
            "so fix the folder's permissions",
            "refused",
            source,
            folder,
        )
    return reason is not None


def builtin_manifest_dir() -> str:
    """`registry/_builtin_manifests` in an installed wheel, else `<repo>/manifests`."""
    inside = _PACKAGE_DIR / "_builtin_manifests"
    if inside.is_dir():
        return str(inside)
    return str(_PACKAGE_DIR.parent / "manifests")


class BuiltinSource:
    """The engine's own manifests, shipped inside the wheel."""

    @hookimpl
    def registry_find_plugins(self, scan: Scan) -> list[PluginRecord]:
        records = []
        for path in manifest_files(builtin_manifest_dir()):
            # part of the installed code itself: no ownership check
            records += read_manifest_records(path, "builtin", scan, check_owner=False)
        return records


class ConfigDirSource:
    """``<config dir>/plugins/*.toml``."""

    @hookimpl
    def registry_find_plugins(self, scan: Scan) -> list[PluginRecord]:
        folder = os.path.join(scan.config_dir, "plugins")
        files = manifest_files(folder)
        if not files or _folder_refused(folder, "config-dir", scan):
            return []
        records = []
        for path in files:
            records += read_manifest_records(path, "config-dir", scan, check_owner=True)
        return records


class PluginDirSource:
    """Every ``--plugin-dir`` / ``ENGINE_PLUGIN_DIRS`` folder: its ``*.toml``
    manifests and its ``pyproject.toml`` entry-point tables."""

    @hookimpl
    def registry_find_plugins(self, scan: Scan) -> list[PluginRecord]:
        records = []
        for folder in scan.plugin_dirs:
            if not os.path.isdir(folder):
                scan.problem(
                    logging.WARNING,
                    f"plugin dir {folder} (from --plugin-dir / ENGINE_PLUGIN_DIRS) "
                    "does not exist or is not a folder",
                    "missing",
                    "plugin-dir",
                    folder,
                )
                continue
            if _folder_refused(folder, "plugin-dir", scan):
                continue
            for path in manifest_files(folder):
                records += read_manifest_records(path, "plugin-dir", scan, check_owner=True)
            records += self._project_records(folder, scan)
        return records

    def _project_records(self, folder: str, scan: Scan) -> list[PluginRecord]:
        path = os.path.join(folder, "pyproject.toml")
        if not os.path.isfile(path):
            return []
        start = perf_counter()
        try:
            groups = load_pyproject_entry_points(path, _read_manifest_bytes(path, check_owner=True))
            refused = trust_problems(path, project_code_path(path), scan.folder_reasons)
            if refused:
                raise _Unsafe("\n".join(refused))
        except ManifestError as exc:
            for line in exc.problems:
                scan.problem(logging.ERROR, f"{line} (skipped)", "invalid", "plugin-dir", path)
            return []
        except _Unsafe as exc:
            for line in str(exc).splitlines():
                scan.problem(logging.ERROR, line, "refused", "plugin-dir", path)
            return []
        return scan.timed(records_from_project(path, groups), perf_counter() - start)


class EntryPointSource:
    """Entry points of installed distributions (``importlib.metadata``)."""

    @hookimpl
    def registry_find_plugins(self, scan: Scan) -> list[PluginRecord]:
        from importlib.metadata import entry_points

        start = perf_counter()
        # one scan for all groups: each entry_points(group=...) call rereads every distribution
        try:
            everything = entry_points()
        except Exception as exc:  # one broken distribution must not hide every plugin
            scan.problem(logging.ERROR, f"cannot read installed entry points: {exc!r}",
                         "invalid", "entry-point", "importlib.metadata")
            return []
        origins: dict[int, str] = {}
        records = []
        for group in GROUPS:
            for ep in everything.select(group=group):
                dist = getattr(ep, "dist", None)
                if id(dist) not in origins:
                    origins[id(dist)] = _distribution_label(dist)
                records.append(
                    PluginRecord(group, ep.name, ep.value, "entry-point", origins[id(dist)])
                )
        return scan.timed(records, perf_counter() - start)


def _distribution_label(dist: object) -> str:
    if dist is None:
        return "unknown distribution"
    try:
        metadata = dist.metadata  # type: ignore[attr-defined]  # parsed anew on each access
        return f"{metadata['Name']} {metadata['Version']}"
    except Exception:  # broken metadata must not stop discovery
        return "distribution with unreadable metadata"


@functools.lru_cache(maxsize=1)
def plugin_manager() -> pluggy.PluginManager:
    """The manager with the four built-in sources registered (made once: sources
    keep no state between scans, and registering costs more than a small scan)."""
    manager = pluggy.PluginManager(PROJECT)
    manager.add_hookspecs(SourceSpec)
    # pluggy calls the last registered first: register so that builtin runs first
    for source in (PluginDirSource(), ConfigDirSource(), EntryPointSource(), BuiltinSource()):
        manager.register(source, name=type(source).__name__)
    return manager
