"""Interface versions (registry.API_VERSIONS, `api = N` in a manifest,
`engine_api = N` on a plugin's object) and engine.utils.deprecated, warning once
per calling plugin."""

from __future__ import annotations

import json

import pytest
from conftest import subprocess_env
from plugin_fixtures.helpers import run_cli, run_python, write_manifest, write_module


def test_api_versions_cover_every_group():
    import registry

    assert registry.API_VERSIONS == {alias: 1 for alias in registry.GROUP_ALIASES}


@pytest.fixture
def pdir(tmp_path):
    folder = tmp_path / "pdir"
    write_module(folder, "api_plugins", """
        def current():
            print("current ran")

        def old():
            print("old ran")

        def future_obj():
            print("future_obj ran")

        future_obj.engine_api = 5
        """)
    return folder


def test_newer_manifest_api_is_refused_naming_both_versions(pdir):
    write_manifest(pdir, "api.toml", [
        {"group": "general", "name": "now", "value": "api_plugins:current"},
        {"group": "general", "name": "later", "value": "api_plugins:current"},
    ], package='path = "."')
    text = (pdir / "api.toml").read_text().replace(
        'name = "later"', 'name = "later"\napi = 2')
    (pdir / "api.toml").write_text(text)
    env = subprocess_env(ENGINE_PLUGIN_DIRS=str(pdir))
    proc = run_cli("plugins", "list", "--json", env=env)
    rows = {r["name"]: r for r in json.loads(proc.stdout)}
    assert rows["now"]["enabled"] is True
    assert rows["later"]["enabled"] is False and rows["later"]["disabled_by"] == "api"
    assert rows["later"]["api"] == 2
    assert ("is written for general interface version 2, newer than this engine's 1 (it "
            "supports 1); upgrade the engine or use an older release of the plugin"
            ) in rows["later"]["disabled_reason"]
    assert "plugin 'later' (engine.general_plugins)" in proc.stderr


def test_engine_api_attribute_newer_than_the_engine_is_refused(pdir):
    write_manifest(pdir, "api.toml", [
        {"group": "general", "name": "future", "value": "api_plugins:future_obj"}],
        package='path = "."')
    env = subprocess_env(ENGINE_PLUGIN_DIRS=str(pdir))
    proc = run_python("import registry\nregistry.load_general_plugins()\n", env)
    assert "future_obj ran" not in proc.stdout
    assert ("plugin 'future' (engine.general_plugins) from plugin-dir "
            f"{pdir / 'api.toml'} is written for general interface version 5, newer than "
            "this engine's 1") in proc.stderr


def test_older_supported_version_loads_with_a_warning_and_too_old_is_refused(pdir):
    write_manifest(pdir, "api.toml", [
        {"group": "general", "name": "old_ok", "value": "api_plugins:old"},
        {"group": "general", "name": "too_old", "value": "api_plugins:old"}],
        package='path = "."')
    text = (pdir / "api.toml").read_text()
    text = text.replace('name = "old_ok"', 'name = "old_ok"\napi = 2')
    text = text.replace('name = "too_old"', 'name = "too_old"\napi = 1')
    (pdir / "api.toml").write_text(text)
    env = subprocess_env(ENGINE_PLUGIN_DIRS=str(pdir))
    # an engine whose general interface is at version 3 and still supports 2
    proc = run_python("""
        import registry, registry._groups as groups
        groups.API_VERSIONS["general"] = 3
        groups.OLDEST_API_VERSIONS["general"] = 2
        registry.load_general_plugins()
        """, env)
    assert proc.stdout.count("old ran") == 1
    assert ("plugin 'old_ok' (engine.general_plugins) from plugin-dir "
            f"{pdir / 'api.toml'} is written for general interface version 2; this engine's "
            "is 3 and version 2 is deprecated") in proc.stderr
    assert ("'too_old' (engine.general_plugins) from plugin-dir "
            f"{pdir / 'api.toml'} is written for general interface version 1, older than this "
            "engine supports (2 to 3); upgrade the plugin") in proc.stderr


def test_deprecated_warns_once_per_calling_plugin(tmp_path):
    pdir = tmp_path / "pdir"
    write_module(pdir, "dep_api", """
        from engine.utils import deprecated

        @deprecated(since="0.1", instead="dep_api.new_helper")
        def old_helper():
            return 42
        """)
    write_module(pdir, "dep_callers", """
        from dep_api import old_helper

        def first():
            old_helper(); old_helper()

        def second():
            old_helper()
        """)
    write_manifest(pdir, "dep.toml", [
        {"group": "general", "name": "caller_one", "value": "dep_callers:first"},
        {"group": "general", "name": "caller_two", "value": "dep_callers:second"}],
        package='path = "."')
    env = subprocess_env(ENGINE_PLUGIN_DIRS=str(pdir), PYTHONWARNINGS="ignore")
    proc = run_python("""
        import registry
        registry.load_general_plugins()
        from dep_api import old_helper
        assert old_helper() == 42 and old_helper() == 42
        """, env)
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if "is deprecated" in line]
    base = "dep_api.old_helper is deprecated since engine 0.1; use dep_api.new_helper instead"
    assert lines == [f"{base} (called by plugin 'caller_one')",
                     f"{base} (called by plugin 'caller_two')",
                     f"{base} (called by user code)"]
