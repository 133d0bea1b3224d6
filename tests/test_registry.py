"""The plugin registry in-process: manifests, sources, precedence, filtering,
loading, strict mode, the load trace. Child-process tests with a really
installed entry-point package are in test_registry_entry_points.py."""

from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import sys
import uuid
from pathlib import Path

import pytest
from plugin_fixtures.helpers import REPO, write_manifest, write_module

import registry
from registry import _loading


@pytest.fixture(autouse=True)
def fresh_registry(monkeypatch):
    """No discovery cache, general plugins not yet run, sys.path restored afterwards."""
    registry.clear_discovery_cache()
    monkeypatch.setattr(_loading, "_general_done_pid", None)
    monkeypatch.setattr(sys, "path", list(sys.path))
    yield
    registry.clear_discovery_cache()


def unique(prefix: str = "plug") -> str:
    return f"{prefix}_{uuid.uuid4().hex[:10]}"


def config_plugins(config_dir: Path) -> Path:
    folder = config_dir / "plugins"
    folder.mkdir(exist_ok=True)
    return folder


def by_key(records, source=None):
    return {(r.group, r.name): r for r in records if source is None or r.source == source}


# ---------------------------------------------------------------------------
# groups


def test_resolve_group_accepts_alias_and_full_name():
    assert registry.resolve_group("general") == registry.GENERAL_PLUGINS == "engine.general_plugins"
    assert registry.resolve_group("engine.platform_plugins") == registry.PLATFORM_PLUGINS
    assert registry.resolve_group("io_processor") == registry.IO_PROCESSOR_PLUGINS
    assert registry.resolve_group("stat_logger") == registry.STAT_LOGGER_PLUGINS


def test_resolve_group_unknown_lists_valid_groups():
    with pytest.raises(ValueError, match="unknown plugin group 'gpu'.*platform.*stat_logger"):
        registry.resolve_group("gpu")


# ---------------------------------------------------------------------------
# built-in manifest


def test_builtin_manifest_declares_exactly_the_builtin_plugins():
    manifest = registry.load_manifest(REPO / "manifests" / "builtin.toml")
    got = {(p.full_group, p.name, p.value) for p in manifest.plugin}
    assert got == {
        (registry.PLATFORM_PLUGINS, "cpu", "engine.platforms:cpu_platform_plugin"),
        (registry.PLATFORM_PLUGINS, "cuda", "engine.platforms:cuda_platform_plugin"),
        (registry.GENERAL_PLUGINS, "builtin_models", "engine.models:register_builtin_models"),
        (registry.GRAPH_BACKEND_PLUGINS, "inductor", "engine.compilation:inductor_backend"),
        (registry.GRAPH_BACKEND_PLUGINS, "eager", "engine.compilation:eager_backend"),
        (registry.SPEC_PROPOSER_PLUGINS, "ngram", "engine.spec_decode.ngram:NgramProposer"),
        (registry.SPEC_PROPOSER_PLUGINS, "draft_model",
         "engine.spec_decode.draft_model:DraftModelProposer"),
        (registry.LORA_RESOLVER_PLUGINS, "lora_folder", "engine.lora.resolver:LoRAFolderResolver"),
        *((registry.QUANTIZATION_PLUGINS, t.lower(), f"engine.quantization.ggml:{t}")
          for t in ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K")),
    }


def test_discover_reports_builtins_with_source_builtin():
    builtins = by_key(registry.discover(), "builtin")
    assert set(builtins) >= {(registry.PLATFORM_PLUGINS, "cpu"), (registry.PLATFORM_PLUGINS, "cuda")}
    cpu = builtins[(registry.PLATFORM_PLUGINS, "cpu")]
    assert cpu.enabled and cpu.origin.endswith("builtin.toml")
    assert [r.name for r in registry.discover("platform") if r.source == "builtin"] == ["cpu", "cuda"]


def test_record_adapts_to_importlib_entry_point():
    record = registry.discover("platform")[0]
    ep = record.entry_point()
    assert isinstance(ep, importlib.metadata.EntryPoint)
    assert (ep.name, ep.value, ep.group) == (record.name, record.value, record.group)


# ---------------------------------------------------------------------------
# manifest validation: one line per problem, naming the file and the place

GOOD = """\
schema-version = 1

[package]
name = "acme-npu"
version = "0.3.1"
requires-engine = ">=0.1"
path = "src"

[[plugin]]
group = "platform"
name = "acme_npu"
value = "acme_npu:register"
enabled = true
description = "Acme NPU backend"
"""

BAD_MANIFESTS = {
    "syntax": ('schema-version = 1\n[[plugin]]\ngroup = "general\n',
               ["{p}:3:17: Illegal character '\\n'"]),
    "syntax_value": ("schema-version = 1\n\n[[plugin]]\nname = = 3\n",
                     ["{p}:4:8: Invalid value"]),
    "not_utf8": (b"schema-version = 1\n# \xff\n", ["{p}:2:3: not valid UTF-8 (byte 0xff)"]),
    "unknown_key": (
        'schema-version = 1\n[[plugin]]\ngroup = "general"\nname = "a"\nvalue = "m:f"\nenable = true\n',
        ["{p}: plugin[0].enable: unknown key; allowed keys here: "
         "group, name, value, enabled, description, config, api"],
    ),
    "unknown_top_key": (
        'schema-version = 1\nplugins = 1\n[[plugin]]\ngroup = "general"\nname = "a"\nvalue = "m"\n',
        ["{p}: plugins: unknown key; allowed keys here: schema-version, package, plugin"],
    ),
    "bad_name": (
        'schema-version = 1\n[[plugin]]\ngroup = "general"\nname = "a b"\nvalue = "m:f"\n',
        ["{p}: plugin[0].name: invalid plugin name 'a b': "
         "use only letters, digits, '_', '.' and '-'"],
    ),
    "bad_value": (
        'schema-version = 1\n[[plugin]]\ngroup = "general"\nname = "a"\nvalue = "m:f"\n'
        '[[plugin]]\ngroup = "general"\nname = "b"\nvalue = "my-mod:f"\n',
        ["{p}: plugin[1].value: invalid value 'my-mod:f': expected 'module' or 'module:attr' "
         "(dotted Python identifiers, e.g. 'acme_npu.plugin:register')"],
    ),
    "unknown_group": (
        'schema-version = 1\n[[plugin]]\ngroup = "gpu"\nname = "a"\nvalue = "m"\n',
        ["{p}: plugin[0].group: unknown group 'gpu'; valid groups: general "
         "(engine.general_plugins), platform (engine.platform_plugins), io_processor "
         "(engine.io_processor_plugins), stat_logger (engine.stat_logger_plugins), "
         "logits_processor (engine.logits_processor_plugins), api_route "
         "(engine.api_route_plugins), graph_backend (engine.graph_backend_plugins), "
         "spec_proposer (engine.spec_proposer_plugins), lora_resolver "
         "(engine.lora_resolver_plugins), quantization (engine.quantization_plugins)"],
    ),
    "duplicate": (
        'schema-version = 1\n[[plugin]]\ngroup = "general"\nname = "a"\nvalue = "m"\n'
        '[[plugin]]\ngroup = "engine.general_plugins"\nname = "a"\nvalue = "n"\n',
        ["{p}: plugin[1].name: duplicate plugin name 'a' in group engine.general_plugins "
         "(first declared at plugin[0])"],
    ),
    "newer_schema": (
        'schema-version = 2\n[[plugin]]\nkind = "new"\n',
        ["{p}: schema-version: schema version 2 is newer than this engine (0.1.0) understands "
         "(it reads version 1); upgrade engine or write schema-version = 1"],
    ),
    "string_schema": (
        'schema-version = "1"\n[[plugin]]\ngroup = "general"\nname = "a"\nvalue = "m"\n',
        ["{p}: schema-version: Input should be a valid integer"],
    ),
    "missing_everything": ("", ["{p}: schema-version: required key is missing",
                                "{p}: plugin: required key is missing"]),
    "single_table": (
        'schema-version = 1\n[plugin]\ngroup = "general"\nname = "a"\nvalue = "m"\n',
        ["{p}: plugin: expected one or more [[plugin]] tables (an array of tables)"],
    ),
    "wrong_types": (
        'schema-version = 1\n[[plugin]]\ngroup = "general"\nname = "a"\nvalue = "m"\n'
        'enabled = "yes"\n',
        ["{p}: plugin[0].enabled: Input should be a valid boolean"],
    ),
    "bad_specifier": (
        'schema-version = 1\n[package]\nrequires-engine = "0.1+"\n'
        '[[plugin]]\ngroup = "general"\nname = "a"\nvalue = "m"\n',
        ["{p}: package.requires-engine: invalid version specifier '0.1+': "
         "expected PEP 440, e.g. '>=0.1,<0.3'"],
    ),
}


def test_good_manifest_is_valid(tmp_path):
    path = tmp_path / "good.toml"
    path.write_text(GOOD)
    assert registry.validate_manifest(path) == []
    manifest = registry.load_manifest(path)
    assert manifest.package.requires_engine == ">=0.1"
    assert manifest.plugin[0].full_group == registry.PLATFORM_PLUGINS


@pytest.mark.parametrize("case", sorted(BAD_MANIFESTS))
def test_bad_manifest_gives_one_line_per_problem(tmp_path, case):
    body, expected = BAD_MANIFESTS[case]
    path = tmp_path / f"{case}.toml"
    path.write_bytes(body if isinstance(body, bytes) else body.encode())
    expected = [line.format(p=path) for line in expected]
    assert registry.validate_manifest(path) == expected
    with pytest.raises(registry.ManifestError) as info:
        registry.load_manifest(path)
    assert info.value.path == str(path)
    assert info.value.problems == expected
    assert isinstance(info.value, registry.RegistryError)


def test_unreadable_manifest_names_the_file(tmp_path):
    missing = tmp_path / "nope.toml"
    assert registry.validate_manifest(missing) == [f"{missing}: cannot read: No such file or directory"]


def test_published_json_schema_is_current():
    published = json.loads((REPO / "docs" / "manifest.schema.json").read_text())
    assert published == registry.manifest_json_schema()


def test_json_schema_accepts_good_and_rejects_bad_manifests():
    import jsonschema

    from registry._toml import tomllib

    schema = registry.manifest_json_schema()
    jsonschema.validate(tomllib.loads(GOOD), schema)
    for case in ("unknown_key", "bad_name", "bad_value", "unknown_group", "newer_schema"):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(tomllib.loads(BAD_MANIFESTS[case][0]), schema)


# ---------------------------------------------------------------------------
# sources and precedence


def test_config_dir_manifest_is_discovered_and_loaded(isolated_engine_env, tmp_path):
    mod = unique()
    write_module(tmp_path / "code", mod, "def register():\n    return 'hi'\n")
    write_manifest(
        config_plugins(isolated_engine_env), "mine.toml",
        [{"group": "general", "name": "mine", "value": f"{mod}:register"}],
        package=f'path = "{tmp_path / "code"}"',
    )
    record = by_key(registry.discover())[(registry.GENERAL_PLUGINS, "mine")]
    assert record.source == "config-dir" and record.enabled
    assert record.origin == str(isolated_engine_env / "plugins" / "mine.toml")
    assert mod not in sys.modules  # discovery never imports
    loaded = registry.load_plugins_by_group("general")
    assert loaded["mine"]() == "hi"
    assert str(tmp_path / "code") in sys.path


@pytest.mark.skipif(sys.platform != "linux", reason="XDG config dir layout")
def test_default_config_dir_is_the_platformdirs_one(tmp_path, monkeypatch):
    monkeypatch.delenv("ENGINE_CONFIG_DIR")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    path = write_manifest(tmp_path / "xdg" / "engine" / "plugins", "p.toml",
                          [{"group": "general", "name": "xdg_plugin", "value": "json"}])
    record = by_key(registry.discover())[(registry.GENERAL_PLUGINS, "xdg_plugin")]
    assert (record.source, record.origin) == ("config-dir", str(path))


def test_manifest_path_is_relative_to_the_manifest(tmp_path, monkeypatch):
    mod = unique()
    plugin_dir = tmp_path / "pdir"
    write_module(plugin_dir / "src", mod, "VALUE = 42\n")
    write_manifest(plugin_dir, "p.toml", [{"group": "io_processor", "name": "rel",
                                          "value": f"{mod}:VALUE"}], package='path = "src"')
    monkeypatch.setenv("ENGINE_PLUGIN_DIRS", str(plugin_dir))
    record = by_key(registry.discover())[(registry.IO_PROCESSOR_PLUGINS, "rel")]
    assert record.source == "plugin-dir" and record.path == str(plugin_dir / "src")
    assert registry.load_plugins_by_group("io_processor") == {"rel": 42}


def test_plugin_dir_pyproject_entry_points(tmp_path, monkeypatch):
    mod = unique()
    project = tmp_path / "proj"
    write_module(project / "src", mod, "def detect():\n    return None\n")
    (project / "pyproject.toml").write_text(
        '[project]\nname = "proj"\nversion = "0.1"\n'
        f'[project.entry-points."engine.platform_plugins"]\nproj_npu = "{mod}:detect"\n'
        '[project.entry-points."console_scripts"]\nproj = "x:y"\n'
    )
    monkeypatch.setenv("ENGINE_PLUGIN_DIRS", str(project))
    record = by_key(registry.discover())[(registry.PLATFORM_PLUGINS, "proj_npu")]
    assert record.source == "plugin-dir"
    assert record.origin == str(project / "pyproject.toml")
    assert record.path == str(project / "src")
    assert registry.load_plugins_by_group("platform")["proj_npu"]() is None


def test_plugin_dir_beats_config_dir_with_a_warning(isolated_engine_env, tmp_path, monkeypatch,
                                                     caplog):
    plugin = {"group": "general", "name": "dup", "value": "json:dumps"}
    low = write_manifest(config_plugins(isolated_engine_env), "a.toml", [plugin])
    high = write_manifest(tmp_path / "pdir", "b.toml", [dict(plugin, value="json:loads")])
    monkeypatch.setenv("ENGINE_PLUGIN_DIRS", str(tmp_path / "pdir"))
    with caplog.at_level(logging.WARNING, logger="registry"):
        records = [r for r in registry.discover("general") if r.name == "dup"]
    assert [(r.source, r.enabled) for r in records] == [("config-dir", False), ("plugin-dir", True)]
    assert records[0].disabled_reason == f"shadowed by plugin-dir {high}"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(str(low) in w and str(high) in w and "'dup'" in w for w in warnings)
    assert registry.load_plugins_by_group("general")["dup"] is json.loads


def test_builtin_loses_to_any_other_source(isolated_engine_env):
    write_manifest(config_plugins(isolated_engine_env), "cpu.toml",
                   [{"group": "platform", "name": "cpu", "value": "json:dumps"}])
    cpu = [r for r in registry.discover("platform") if r.name == "cpu"]
    assert [(r.source, r.enabled) for r in cpu] == [("builtin", False), ("config-dir", True)]


def test_first_plugin_dir_wins_and_add_plugin_dirs_prepends(tmp_path, monkeypatch):
    for name, value in (("one", "json:dumps"), ("two", "json:loads")):
        write_manifest(tmp_path / name, "p.toml", [{"group": "general", "name": "same",
                                                  "value": value}])
    monkeypatch.setenv("ENGINE_PLUGIN_DIRS", str(tmp_path / "one"))
    assert [r.value for r in registry.discover("general") if r.enabled and r.name == "same"] == [
        "json:dumps"]
    registry.add_plugin_dirs([tmp_path / "two"])
    assert os.environ["ENGINE_PLUGIN_DIRS"].split(os.pathsep) == [
        str(tmp_path / "two"), str(tmp_path / "one")]
    assert [r.value for r in registry.discover("general") if r.enabled and r.name == "same"] == [
        "json:loads"]


def test_discovery_cache_follows_the_environment(tmp_path, monkeypatch):
    write_manifest(tmp_path / "pdir", "p.toml", [{"group": "general", "name": "later",
                                                "value": "json"}])
    assert "later" not in {r.name for r in registry.discover()}
    first = registry.discover()
    assert registry.discover() == first  # cached: same answer, no rescan
    monkeypatch.setenv("ENGINE_PLUGIN_DIRS", str(tmp_path / "pdir"))
    assert "later" in {r.name for r in registry.discover()}


def test_missing_plugin_dir_is_a_warning(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("ENGINE_PLUGIN_DIRS", str(tmp_path / "absent"))
    with caplog.at_level(logging.WARNING, logger="registry"):
        registry.discover()
    assert f"plugin dir {tmp_path / 'absent'}" in caplog.text


# ---------------------------------------------------------------------------
# bad input at engine start: ERROR with the validate text, the rest still loads


def test_bad_manifest_is_logged_and_skipped(isolated_engine_env, caplog):
    folder = config_plugins(isolated_engine_env)
    bad = folder / "bad.toml"
    bad.write_text(BAD_MANIFESTS["bad_value"][0])
    write_manifest(folder, "good.toml", [{"group": "general", "name": "good", "value": "json"}])
    with caplog.at_level(logging.ERROR, logger="registry"):
        loaded = registry.load_plugins_by_group("general")
    assert "good" in loaded
    line = BAD_MANIFESTS["bad_value"][1][0].format(p=bad)
    assert any(r.levelno == logging.ERROR and line in r.getMessage() for r in caplog.records)
    assert registry.validate_manifest(bad) == [line]


def test_import_error_is_isolated_with_origin_and_traceback(isolated_engine_env, caplog):
    folder = config_plugins(isolated_engine_env)
    manifest = write_manifest(folder, "p.toml", [
        {"group": "stat_logger", "name": "broken", "value": f"{unique('missing')}:Logger"},
        {"group": "stat_logger", "name": "fine", "value": "logging:Handler"},
    ])
    with caplog.at_level(logging.ERROR, logger="registry"):
        loaded = registry.load_plugins_by_group("stat_logger")
    assert loaded == {"fine": logging.Handler}
    [error] = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert "'broken'" in error.getMessage() and str(manifest) in error.getMessage()
    assert error.exc_info and error.exc_info[0] is ModuleNotFoundError


def test_requires_engine_mismatch_is_skipped_with_both_versions(isolated_engine_env, caplog):
    write_manifest(config_plugins(isolated_engine_env), "future.toml",
                   [{"group": "general", "name": "future", "value": "json"}],
                   package='requires-engine = ">=9.0"')
    with caplog.at_level(logging.WARNING, logger="registry"):
        [record] = [r for r in registry.discover() if r.name == "future"]
    assert not record.enabled
    assert "'future'" in caplog.text and ">=9.0" in caplog.text
    assert f"engine {registry.__version__}" in caplog.text
    assert "future" not in registry.load_plugins_by_group("general")


def test_manifest_disabled_plugin_is_listed_but_not_loaded(isolated_engine_env):
    write_manifest(config_plugins(isolated_engine_env), "off.toml",
                   [{"group": "general", "name": "off", "value": "json", "enabled": False}])
    [record] = [r for r in registry.discover() if r.name == "off"]
    assert not record.enabled and "enabled = false" in record.disabled_reason
    assert "off" not in registry.load_plugins_by_group("general")


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
def test_world_writable_folder_is_refused(isolated_engine_env, caplog):
    folder = config_plugins(isolated_engine_env)
    write_manifest(folder, "p.toml", [{"group": "general", "name": "risky", "value": "json"}])
    folder.chmod(0o777)
    with caplog.at_level(logging.ERROR, logger="registry"):
        names = {r.name for r in registry.discover()}
    assert "risky" not in names
    assert f"refusing plugin manifests in {folder}" in caplog.text
    assert "writable by all users" in caplog.text


@pytest.mark.skipif(os.name != "posix" or os.getuid() != 0, reason="needs root to chown")
def test_manifest_owned_by_someone_else_is_refused(isolated_engine_env, caplog):
    folder = config_plugins(isolated_engine_env)
    path = write_manifest(folder, "p.toml", [{"group": "general", "name": "theirs",
                                             "value": "json"}])
    os.chown(path, 65534, -1)
    with caplog.at_level(logging.ERROR, logger="registry"):
        assert "theirs" not in {r.name for r in registry.discover()}
    assert f"refusing manifest {path}" in caplog.text and "uid 65534" in caplog.text


# ---------------------------------------------------------------------------
# ENGINE_PLUGINS


def _two_plugins(config_dir: Path) -> None:
    write_manifest(config_plugins(config_dir), "p.toml", [
        {"group": "general", "name": "alpha", "value": f"{unique('never')}:f"},
        {"group": "general", "name": "beta", "value": "json:dumps"},
    ])


def test_allow_list_filters_before_import(isolated_engine_env, monkeypatch, caplog):
    _two_plugins(isolated_engine_env)
    monkeypatch.setenv("ENGINE_PLUGINS", " beta , ghost ")
    with caplog.at_level(logging.WARNING, logger="registry"):
        records = by_key(registry.discover())
        loaded = registry.load_plugins_by_group("general")
    alpha = records[(registry.GENERAL_PLUGINS, "alpha")]
    assert not alpha.enabled and alpha.disabled_reason == "not in ENGINE_PLUGINS"
    assert "beta" in loaded and "alpha" not in loaded  # alpha's module does not exist: not tried
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert "ENGINE_PLUGINS names 'ghost'" in caplog.text
    assert records[(registry.PLATFORM_PLUGINS, "cpu")].enabled  # builtins are exempt


def test_empty_allow_list_keeps_only_builtins(isolated_engine_env, monkeypatch):
    _two_plugins(isolated_engine_env)
    monkeypatch.setenv("ENGINE_PLUGINS", "")
    enabled = {(r.source, r.name) for r in registry.discover() if r.enabled}
    assert enabled and all(source == "builtin" for source, _ in enabled)


# ---------------------------------------------------------------------------
# general plugins, strict mode, trace


@pytest.fixture
def no_builtins(tmp_path, monkeypatch):
    """Point the builtin source at an empty folder, so calling general plugins
    in-process does not run the engine's own (which import torch)."""
    empty = tmp_path / "no-builtins"
    empty.mkdir()
    monkeypatch.setattr(registry._sources, "builtin_manifest_dir", lambda: str(empty))


def test_general_plugins_run_once_per_process_and_failures_are_isolated(
        isolated_engine_env, tmp_path, caplog, no_builtins):
    mod = unique()
    log = tmp_path / "calls.txt"
    write_module(tmp_path / "code", mod, f"""
        def ok():
            with open({str(log)!r}, "a") as f:
                f.write("ok\\n")

        def bad():
            raise RuntimeError("bad plugin")
    """)
    manifest = write_manifest(config_plugins(isolated_engine_env), "g.toml", [
        {"group": "general", "name": "bad", "value": f"{mod}:bad"},
        {"group": "general", "name": "ok", "value": f"{mod}:ok"},
    ], package=f'path = "{tmp_path / "code"}"')
    with caplog.at_level(logging.ERROR, logger="registry"):
        registry.load_general_plugins()
        registry.load_general_plugins()
    assert log.read_text() == "ok\n"
    errors = [r for r in caplog.records if r.levelno == logging.ERROR and "'bad'" in r.getMessage()]
    assert len(errors) == 1 and str(manifest) in errors[0].getMessage()
    assert errors[0].exc_info[0] is RuntimeError
    outcomes = {(e.name, e.outcome) for e in registry.load_trace() if e.pid == os.getpid()}
    assert {("bad", "call-failed"), ("ok", "called"), ("ok", "loaded")} <= outcomes


def test_strict_mode_raises_on_bad_manifest(isolated_engine_env, monkeypatch):
    (config_plugins(isolated_engine_env) / "bad.toml").write_text("schema-version = [")
    monkeypatch.setenv("ENGINE_STRICT_PLUGINS", "1")
    assert registry.strict_mode()
    with pytest.raises(registry.PluginLoadError, match="bad.toml:1:19: Invalid value"):
        registry.load_plugins_by_group("general")


def test_strict_mode_raises_on_import_error(isolated_engine_env, monkeypatch):
    write_manifest(config_plugins(isolated_engine_env), "p.toml",
                   [{"group": "io_processor", "name": "gone", "value": f"{unique()}:f"}])
    monkeypatch.setenv("ENGINE_STRICT_PLUGINS", "true")
    with pytest.raises(registry.PluginLoadError, match="cannot import plugin 'gone'") as info:
        registry.load_plugins_by_group("io_processor")
    assert info.value.plugin.name == "gone"


def test_load_trace_records_discovery_and_loads(isolated_engine_env):
    path = config_plugins(isolated_engine_env) / "bad.toml"
    path.write_text("nonsense")
    registry.load_plugins_by_group("platform")
    events = [e for e in registry.load_trace() if e.pid == os.getpid()]
    assert any(e.name == "cpu" and e.outcome == "discovered" and e.source == "builtin"
               for e in events)
    assert any(e.name == "cpu" and e.outcome == "loaded" and e.seconds >= 0 for e in events)
    assert any(e.outcome == "invalid" and e.origin == str(path) and "bad.toml:1" in e.error
               for e in events)


def test_resolve_qualname():
    assert registry.resolve_qualname("logging.handlers.RotatingFileHandler").__name__ == (
        "RotatingFileHandler")
    assert registry.resolve_qualname("os.path:join") is os.path.join
    assert registry.resolve_qualname("json") is json
    with pytest.raises(ImportError, match="no_such_thing"):
        registry.resolve_qualname("json.no_such_thing")
    with pytest.raises(ImportError, match="cannot resolve"):
        registry.resolve_qualname("nopkg_xyz.mod.Cls")
    with pytest.raises(ValueError):
        registry.resolve_qualname("")
