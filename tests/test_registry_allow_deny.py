"""Allow, deny, persist: ENGINE_PLUGINS entries (name, group:name, -name,
-group:name), ENGINE_PLUGINS_AUTOLOAD=0, and `engine plugins disable|enable`,
through the CLI and the Python API in child processes, with a really installed
entry-point package, a config-dir manifest and a plugin dir."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import subprocess_env
from plugin_fixtures.helpers import (
    install_test_plugins,
    run_cli,
    run_python,
    write_manifest,
    write_module,
)


@pytest.fixture(scope="session")
def site(tmp_path_factory) -> Path:
    return install_test_plugins(tmp_path_factory.mktemp("ep-install"))


@pytest.fixture
def env(site, isolated_engine_env, tmp_path):
    code = tmp_path / "code"
    write_module(code, "ad_mod", "def register():\n    print('ad_mod ran')\n")
    write_manifest(isolated_engine_env / "plugins", "conf.toml",
                   [{"group": "general", "name": "from_config", "value": "ad_mod:register"}],
                   package=f'path = "{code}"')
    pdir = tmp_path / "pdir"
    write_manifest(pdir, "dir.toml",
                   [{"group": "general", "name": "from_dir", "value": "ad_mod:register"},
                    {"group": "io_processor", "name": "from_dir", "value": "ad_mod:register"}],
                   package=f'path = "{code}"')
    return subprocess_env(PYTHONPATH=str(site), ENGINE_PLUGIN_DIRS=str(pdir))


def states(env, **extra) -> dict[tuple[str, str, str], dict]:
    proc = run_cli("plugins", "list", "--json", env={**env, **extra})
    assert proc.returncode == 0, proc.stderr
    return {(r["group"].split(".")[1].removesuffix("_plugins"), r["name"], r["source"]): r
            for r in json.loads(proc.stdout)}


def enabled(rows) -> set[tuple[str, str]]:
    return {(g, n) for (g, n, _), r in rows.items() if r["enabled"]}


def test_deny_only_entries_load_everything_else(env):
    rows = states(env, ENGINE_PLUGINS="-ep_io, -general:from_dir")
    assert rows[("io_processor", "ep_io", "entry-point")]["disabled_by"] == "ENGINE_PLUGINS"
    assert rows[("general", "from_dir", "plugin-dir")]["enabled"] is False
    assert rows[("io_processor", "from_dir", "plugin-dir")]["enabled"] is True
    assert rows[("general", "from_config", "config-dir")]["enabled"] is True
    assert rows[("platform", "cpu", "builtin")]["enabled"] is True


def test_group_qualified_allow_and_deny_wins(env):
    rows = states(env, ENGINE_PLUGINS="io_processor:from_dir, ep_io, -ep_io")
    assert enabled(rows) - {(g, n) for (g, n, s) in rows if s == "builtin"} == {
        ("io_processor", "from_dir")}
    assert rows[("general", "from_dir", "plugin-dir")]["disabled_by"] == "ENGINE_PLUGINS"
    assert rows[("io_processor", "ep_io", "entry-point")]["disabled_reason"] == \
        "denied by ENGINE_PLUGINS"


def test_unknown_group_in_an_entry_is_a_warning(env):
    proc = run_cli("plugins", "list", env={**env, "ENGINE_PLUGINS": "gpu:x"})
    assert "ENGINE_PLUGINS entry 'gpu:x': unknown plugin group 'gpu'" in proc.stderr


def test_autoload_off_keeps_entry_points_and_config_dir_out(env):
    rows = states(env, ENGINE_PLUGINS_AUTOLOAD="0")
    assert rows[("io_processor", "ep_io", "entry-point")]["disabled_by"] == "ENGINE_PLUGINS_AUTOLOAD"
    assert rows[("general", "from_config", "config-dir")]["disabled_by"] == "ENGINE_PLUGINS_AUTOLOAD"
    assert rows[("general", "from_dir", "plugin-dir")]["enabled"] is True
    assert rows[("platform", "cpu", "builtin")]["enabled"] is True
    # a positive entry names one back in (the allow-list then applies to the rest)
    rows = states(env, ENGINE_PLUGINS_AUTOLOAD="0", ENGINE_PLUGINS="ep_io")
    assert rows[("io_processor", "ep_io", "entry-point")]["enabled"] is True
    proc = run_python("""
        import sys, registry
        registry.load_general_plugins()
        print(sorted(m for m in sys.modules if m.startswith("ep_plugins")))
        """, {**env, "ENGINE_PLUGINS_AUTOLOAD": "0"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]"  # nothing from the distribution imported


def test_disable_persists_for_every_source_and_enable_undoes_it(env):
    proc = run_cli("plugins", "disable", "ep_io", env=env)
    assert proc.returncode == 0, proc.stderr
    assert "disabled plugin 'ep_io'; saved in" in proc.stdout
    proc = run_cli("plugins", "disable", "from_dir", "--group", "general", env=env)
    assert proc.returncode == 0, proc.stderr
    rows = states(env)
    assert rows[("io_processor", "ep_io", "entry-point")]["enabled"] is False
    assert rows[("io_processor", "ep_io", "entry-point")]["disabled_by"] == "state"
    assert rows[("general", "from_dir", "plugin-dir")]["disabled_by"] == "state"
    assert rows[("io_processor", "from_dir", "plugin-dir")]["enabled"] is True
    # a disabled plugin is never imported
    proc = run_python("""
        import sys, registry
        print(sorted(registry.load_plugins_by_group("io_processor")))
        print("ep_plugins.io" in sys.modules)
        """, env)
    assert proc.stdout.split("\n")[:2] == ["['from_dir']", "False"], proc.stderr
    # a positive ENGINE_PLUGINS entry overrides the persisted choice
    assert states(env, ENGINE_PLUGINS="ep_io")[("io_processor", "ep_io", "entry-point")]["enabled"]
    proc = run_cli("plugins", "enable", "ep_io", env=env)
    assert proc.returncode == 0 and "enabled plugin 'ep_io'" in proc.stdout
    rows = states(env)
    assert rows[("io_processor", "ep_io", "entry-point")]["enabled"] is True
    assert rows[("general", "from_dir", "plugin-dir")]["enabled"] is False


def test_builtins_cannot_be_disabled(env):
    proc = run_cli("plugins", "disable", "cpu", env=env)
    assert proc.returncode == 2
    assert "plugin 'cpu' is built in, and builtin plugins cannot be disabled" in proc.stderr
    assert states(env)[("platform", "cpu", "builtin")]["enabled"] is True


def test_named_in_plugins_env_is_the_opt_in_for_off_by_default_plugins(monkeypatch):
    import registry

    monkeypatch.setenv("ENGINE_PLUGINS", "api_route:dash, stats, -stats")
    assert registry.named_in_plugins_env("api_route", "dash")
    assert registry.named_in_plugins_env("engine.api_route_plugins", "dash")
    assert not registry.named_in_plugins_env("general", "dash")
    assert not registry.named_in_plugins_env("api_route", "stats")  # a deny wins
    monkeypatch.setenv("ENGINE_PLUGINS", "-dash")
    assert not registry.named_in_plugins_env("api_route", "dash")
