"""The manifest format (docs/reference.md, "Manifest format"): pydantic models, loading and validation.

A manifest is a TOML file declaring plugins::

    schema-version = 1
    [package]                    # optional: name, version, requires-engine, path
    [[plugin]]                   # one or more: group, name, value, enabled, description

Every problem is reported as one line naming the file and the place:
``path:line:col: message`` for TOML syntax, ``path: plugin[1].value: message``
for the schema.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    ValidationError,
    field_validator,
)

from registry._errors import ManifestError
from registry._groups import FULL_GROUP_NAME, GROUP_ALIASES, resolve_group
from registry._toml import TomlSyntaxError, parse_toml
from registry._versions import check_specifier

SCHEMA_VERSION = 1

NAME_PATTERN = r"^[A-Za-z0-9_.-]+$"
_IDENTIFIER = r"[A-Za-z_][A-Za-z0-9_]*"
VALUE_PATTERN = rf"^{_IDENTIFIER}(\.{_IDENTIFIER})*(:{_IDENTIFIER}(\.{_IDENTIFIER})*)?$"
_NAME_RE = re.compile(NAME_PATTERN)
_VALUE_RE = re.compile(VALUE_PATTERN)

GroupName = Literal[
    "general",
    "platform",
    "io_processor",
    "stat_logger",
    "logits_processor",
    "api_route",
    "graph_backend",
    "spec_proposer",
    "lora_resolver",
    "quantization",
    "engine.general_plugins",
    "engine.platform_plugins",
    "engine.io_processor_plugins",
    "engine.stat_logger_plugins",
    "engine.logits_processor_plugins",
    "engine.api_route_plugins",
    "engine.graph_backend_plugins",
    "engine.spec_proposer_plugins",
    "engine.lora_resolver_plugins",
    "engine.quantization_plugins",
]


def _drop_null(schema: dict[str, Any]) -> None:
    """TOML has no null: show an optional key in the JSON Schema as its plain type."""
    options = [o for o in schema.pop("anyOf", []) if o.get("type") != "null"]
    if len(options) == 1:
        schema.update(options[0])
    if schema.get("default", 0) is None:
        del schema["default"]


def check_name(name: str) -> str:
    """Validate a plugin name; raises ValueError saying what is allowed."""
    if not _NAME_RE.match(name):
        raise ValueError(
            f"invalid plugin name {name!r}: use only letters, digits, '_', '.' and '-'"
        )
    return name


def check_value(value: str) -> str:
    """Validate an entry-point value (``module`` or ``module:attr[.attr]``)."""
    if not _VALUE_RE.match(value):
        raise ValueError(
            f"invalid value {value!r}: expected 'module' or 'module:attr' "
            "(dotted Python identifiers, e.g. 'acme_npu.plugin:register')"
        )
    return value


class PackageInfo(BaseModel):
    """The optional ``[package]`` table."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=False)

    name: StrictStr | None = Field(
        None, description="Distribution-style name, for messages", json_schema_extra=_drop_null
    )
    version: StrictStr | None = Field(
        None, description="The package's version, for messages", json_schema_extra=_drop_null
    )
    requires_engine: StrictStr | None = Field(
        None,
        alias="requires-engine",
        description="PEP 440 specifier the running engine version must satisfy",
        json_schema_extra=_drop_null,
    )
    path: StrictStr | None = Field(
        None,
        description="Folder put on sys.path before loading, relative to the manifest",
        json_schema_extra=_drop_null,
    )

    @field_validator("requires_engine")
    @classmethod
    def _check_requires(cls, v: str | None) -> str | None:
        return None if v is None else check_specifier(v)


class PluginEntry(BaseModel):
    """One ``[[plugin]]`` table."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    group: GroupName = Field(description="Group alias or full entry-point group name")
    # patterns are checked natively by pydantic-core; _message() words the errors
    name: StrictStr = Field(description="Plugin name, unique per group", pattern=NAME_PATTERN)
    value: StrictStr = Field(
        description="Entry-point value: 'module' or 'module:attr[.attr]'", pattern=VALUE_PATTERN
    )
    enabled: StrictBool = Field(True, description="false: declared but never loaded")
    description: StrictStr = Field("", description="One line for `engine plugins list`")
    config: StrictStr | None = Field(
        None,
        description="The plugin's settings model, a pydantic BaseModel: 'module:Class'",
        pattern=VALUE_PATTERN,
        json_schema_extra=_drop_null,
    )
    api: StrictInt | None = Field(
        None,
        description="The interface version of its group the plugin is written for",
        ge=1,
        json_schema_extra=_drop_null,
    )

    @property
    def full_group(self) -> str:
        return FULL_GROUP_NAME[self.group]


class Manifest(BaseModel):
    """A plugin manifest, schema version 1."""

    model_config = ConfigDict(
        extra="forbid",
        frozen=True,
        title="engine plugin manifest",
        json_schema_extra={"$schema": "https://json-schema.org/draft/2020-12/schema"},
    )

    schema_version: StrictInt = Field(
        alias="schema-version",
        description="Manifest format version; this engine reads 1",
        json_schema_extra={"const": SCHEMA_VERSION},
    )
    package: PackageInfo | None = Field(None, json_schema_extra=_drop_null)
    plugin: list[PluginEntry] = Field(min_length=1, description="One or more plugins")

    @field_validator("schema_version")
    @classmethod
    def _supported_version(cls, v: int) -> int:
        if v != SCHEMA_VERSION:
            raise ValueError(_version_message(v))
        return v


def _version_message(version: Any) -> str:
    from registry._version import __version__

    if isinstance(version, int) and version > SCHEMA_VERSION:
        return (
            f"schema version {version} is newer than this engine ({__version__}) understands "
            f"(it reads version {SCHEMA_VERSION}); upgrade engine or write schema-version = 1"
        )
    return f"unsupported schema version {version!r}; this engine reads schema-version = 1"


_ALLOWED_KEYS = {
    (): ("schema-version", "package", "plugin"),
    ("package",): ("name", "version", "requires-engine", "path"),
    ("plugin",): ("group", "name", "value", "enabled", "description", "config", "api"),
}


def _format_loc(loc: tuple[Any, ...]) -> str:
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else str(part)
    return text or "(top level)"


def _message(error: Mapping[str, Any]) -> str:
    kind, loc = error["type"], error["loc"]
    if kind == "extra_forbidden":
        parent = tuple(p for p in loc[:-1] if not isinstance(p, int))
        allowed = ", ".join(_ALLOWED_KEYS.get(parent, ()))
        return f"unknown key; allowed keys here: {allowed}"
    if kind == "missing":
        return "required key is missing"
    if kind == "literal_error" and loc[-1] == "group":
        return f"unknown group {error['input']!r}; valid groups: " + ", ".join(
            f"{alias} ({full})" for alias, full in GROUP_ALIASES.items()
        )
    if kind == "string_pattern_mismatch" and loc[-1] in ("name", "value", "config"):
        try:
            (check_name if loc[-1] == "name" else check_value)(error["input"])
        except ValueError as exc:
            return str(exc)
    if loc == ("plugin",) and kind in ("list_type", "too_short"):
        return "expected one or more [[plugin]] tables (an array of tables)"
    message = error["msg"]
    return message.removeprefix("Value error, ")


def _schema_problems(path: str, data: dict[str, Any]) -> tuple[Manifest | None, list[str]]:
    version = data.get("schema-version")
    if type(version) is int and version != SCHEMA_VERSION:
        # a different schema version may have different keys: report only this
        return None, [f"{path}: schema-version: {_version_message(version)}"]
    try:
        manifest = Manifest.model_validate(data)
    except ValidationError as exc:
        return None, [
            f"{path}: {_format_loc(e['loc'])}: {_message(e)}"
            for e in exc.errors(include_url=False)
        ]
    return manifest, _duplicate_problems(path, manifest)


def _duplicate_problems(path: str, manifest: Manifest) -> list[str]:
    seen: dict[tuple[str, str], int] = {}
    problems = []
    for i, entry in enumerate(manifest.plugin):
        key = (entry.full_group, entry.name)
        if key in seen:
            problems.append(
                f"{path}: plugin[{i}].name: duplicate plugin name {entry.name!r} in group "
                f"{key[0]} (first declared at plugin[{seen[key]}])"
            )
        else:
            seen[key] = i
    return problems


def parse_manifest(path: str, data: bytes) -> Manifest:
    """Validate manifest bytes read from `path`. Raises ManifestError."""
    try:
        document = parse_toml(data)
    except TomlSyntaxError as exc:
        raise ManifestError(path, [f"{path}:{exc.line}:{exc.col}: {exc.message}"]) from None
    manifest, problems = _schema_problems(path, document)
    if problems:
        raise ManifestError(path, problems)
    assert manifest is not None
    return manifest


MAX_MANIFEST_BYTES = 1 << 20  # manifests are a few hundred bytes; 1 MiB is plenty

_KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISSOCK, "a socket"))


def _not_regular(path: str, mode: int) -> ManifestError:
    kind = next((name for test, name in _KINDS if test(mode)), "not a regular file")
    return ManifestError(path, [f"{path}: not a regular file ({kind}); a manifest must be "
                                "a plain file"])


def _too_large(path: str, size: int) -> ManifestError:
    return ManifestError(path, [f"{path}: too large ({size} bytes); a manifest may have at "
                                f"most {MAX_MANIFEST_BYTES} bytes"])


def read_file(path: str | Path, check: Callable[[os.stat_result], None] | None = None) -> bytes:
    """Read a manifest or ``pyproject.toml`` without ever blocking or reading without
    bound: it must be a regular file (checked before opening, so a FIFO never
    hangs, and again on the open descriptor) of at most MAX_MANIFEST_BYTES.
    `check` is called with the open file's stat and may raise to refuse it.

    OS errors, non-regular and oversized files raise a ManifestError naming the file.
    """
    path = str(path)
    try:
        st = os.stat(path)
        if not stat.S_ISREG(st.st_mode):
            raise _not_regular(path, st.st_mode)
        if st.st_size > MAX_MANIFEST_BYTES:
            raise _too_large(path, st.st_size)
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise ManifestError(path, [f"{path}: cannot read: {exc.strerror or exc}"]) from None
    try:
        st = os.fstat(fd)  # the file may have been swapped since os.stat
        if not stat.S_ISREG(st.st_mode):
            raise _not_regular(path, st.st_mode)
        if check is not None:
            check(st)
        chunks = []
        size = 0
        while chunk := os.read(fd, max(st.st_size + 1, 4096)):
            chunks.append(chunk)
            size += len(chunk)
            if size > MAX_MANIFEST_BYTES:  # it grew since fstat
                raise _too_large(path, size)
        return b"".join(chunks)
    except OSError as exc:
        raise ManifestError(path, [f"{path}: cannot read: {exc.strerror or exc}"]) from None
    finally:
        os.close(fd)


def load_manifest(path: str | Path) -> Manifest:
    """Read and validate the manifest at `path`.

    Returns the validated Manifest; raises ManifestError (with ``.path`` and
    ``.problems``) when the file cannot be read, is not TOML, or breaks the schema.
    """
    return parse_manifest(str(path), read_file(path))


def validate_manifest(path: str | Path) -> list[str]:
    """Return the problems of the manifest at `path`, one line each (empty: valid).

    A ``pyproject.toml`` is checked for its ``engine.*`` entry-point tables instead.
    """
    try:
        if Path(path).name == "pyproject.toml":
            load_pyproject_entry_points(path)
        else:
            load_manifest(path)
    except ManifestError as exc:
        return exc.problems
    return []


def load_pyproject_entry_points(
    path: str | Path, data: bytes | None = None
) -> dict[str, dict[str, str]]:
    """Return ``{full group: {name: value}}`` from a plugin project's
    ``[project.entry-points."engine.*"]`` tables (`data`: the file's bytes when
    already read). Raises ManifestError."""
    path = str(path)
    try:
        document = parse_toml(read_file(path) if data is None else data)
    except TomlSyntaxError as exc:
        raise ManifestError(path, [f"{path}:{exc.line}:{exc.col}: {exc.message}"]) from None
    project = document.get("project", {})
    tables = project.get("entry-points", {}) if isinstance(project, dict) else {}
    if not isinstance(tables, dict):
        raise ManifestError(path, [f"{path}: project.entry-points: expected a table"])
    groups: dict[str, dict[str, str]] = {}
    problems = []
    for group, table in tables.items():
        if not group.startswith("engine."):
            continue
        where = f'{path}: project.entry-points."{group}"'
        try:
            full = resolve_group(group)
        except ValueError as exc:
            problems.append(f"{where}: {exc}")
            continue
        if not isinstance(table, dict):
            problems.append(f"{where}: expected a table of name = \"module:attr\"")
            continue
        groups[full] = {}
        for name, value in table.items():
            try:
                check_name(name)
                if not isinstance(value, str):
                    raise ValueError(f"expected a string, got {type(value).__name__}")
                groups[full][name] = check_value(value.strip())
            except ValueError as exc:
                problems.append(f"{where}.{name}: {exc}")
    if problems:
        raise ManifestError(path, problems)
    return groups


def manifest_json_schema() -> dict[str, Any]:
    """The JSON Schema of manifest schema version 1 (what docs/manifest.schema.json holds)."""
    return Manifest.model_json_schema(by_alias=True)
