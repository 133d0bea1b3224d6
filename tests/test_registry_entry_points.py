"""The registry with real installed entry points, in child processes: the tiny
`engine-test-plugins` package is `pip install --no-deps --target`-ed once and put
on PYTHONPATH; every child has a private ENGINE_CONFIG_DIR (conftest)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

import pytest
from conftest import subprocess_env
from plugin_fixtures.helpers import REPO, install_test_plugins, run_python, write_manifest


@pytest.fixture(scope="session")
def site(tmp_path_factory) -> Path:
    return install_test_plugins(tmp_path_factory.mktemp("ep-install"))


def test_entry_points_are_discovered_with_distribution_origin(site):
    proc = run_python("""
        import json, registry
        print(json.dumps([r.to_json() for r in registry.discover() if r.source == "entry-point"]))
    """, subprocess_env(PYTHONPATH=str(site)))
    assert proc.returncode == 0, proc.stderr
    records = {(r["group"], r["name"]): r for r in json.loads(proc.stdout)}
    assert set(records) == {
        ("engine.general_plugins", "ep_hello"), ("engine.general_plugins", "ep_raises"),
        ("engine.general_plugins", "ep_filtered"), ("engine.platform_plugins", "ep_platform"),
        ("engine.io_processor_plugins", "ep_io"), ("engine.stat_logger_plugins", "ep_broken"),
    }
    hello = records[("engine.general_plugins", "ep_hello")]
    assert hello["origin"] == "engine-test-plugins 1.2.3"
    assert hello["value"] == "ep_plugins.general:hello" and hello["enabled"]


def test_general_plugins_once_per_process_filtered_never_imported(site, tmp_path):
    log = tmp_path / "log.txt"
    env = subprocess_env(PYTHONPATH=str(site), EP_TEST_LOG=str(log),
                         ENGINE_PLUGINS="ep_hello, ep_raises,ep_platform")
    proc = run_python("""
        import json, logging, os, sys, registry
        logging.basicConfig(level=logging.WARNING)
        registry.load_general_plugins()
        registry.load_general_plugins()          # same process: nothing runs again
        pid = os.fork()
        if pid == 0:                             # a forked child runs them again
            registry.load_general_plugins()
            os._exit(0)
        os.waitpid(pid, 0)
        platforms = registry.load_plugins_by_group("platform")
        print(json.dumps({
            "filtered_imported": "ep_plugins.filtered" in sys.modules,
            "platforms": sorted(platforms),
            "trace": sorted({(e.name, e.outcome) for e in registry.load_trace()
                             if e.name.startswith("ep_")}),
        }))
    """, env)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["filtered_imported"] is False
    assert {"ep_platform", "cpu", "cuda"} <= set(result["platforms"])
    trace = {tuple(t) for t in result["trace"]}
    assert {("ep_filtered", "filtered"), ("ep_hello", "called"),
            ("ep_raises", "call-failed")} <= trace
    lines = log.read_text().splitlines()
    assert not any("filtered" in line for line in lines)
    calls = [line.split()[-1] for line in lines if line.startswith("call ep_hello")]
    assert len(calls) == 2 and calls[0] != calls[1]  # parent once, forked child once
    # the raising plugin: ERROR with traceback naming the plugin and its distribution
    assert "ERROR" in proc.stderr and "'ep_raises'" in proc.stderr
    assert "engine-test-plugins 1.2.3" in proc.stderr
    assert "Traceback" in proc.stderr and "RuntimeError: ep_raises fails on purpose" in proc.stderr


def test_plugin_dir_shadows_entry_point_with_warning(site, tmp_path):
    manifest = write_manifest(tmp_path / "pdir", "override.toml",
                              [{"group": "general", "name": "ep_hello", "value": "json:dumps"}])
    env = subprocess_env(PYTHONPATH=str(site), ENGINE_PLUGINS="ep_hello")
    proc = run_python(f"""
        import json, registry
        registry.add_plugin_dirs([{str(tmp_path / 'pdir')!r}])
        loaded = registry.load_plugins_by_group("general")
        print(loaded["ep_hello"] is json.dumps)
    """, env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "True"
    assert (f"plugin 'ep_hello' (engine.general_plugins) is provided twice: plugin-dir "
            f"{manifest} wins over entry-point engine-test-plugins 1.2.3, which is not loaded"
            ) in proc.stderr


def test_registry_never_imports_torch_or_engine(site):
    proc = run_python("""
        import sys, registry
        registry.discover()
        registry.load_plugins_by_group("stat_logger")
        registry.load_plugins_by_group("io_processor")
        bad = [m for m in sys.modules if m == "torch" or m == "engine" or m.startswith("engine.")]
        print(bad)
    """, subprocess_env(PYTHONPATH=str(site)))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
    assert "ep_broken" in proc.stderr  # its import error is logged, the rest loads


def test_importing_registry_and_engine_is_cheap():
    proc = run_python("""
        import sys, engine, registry
        registry.strict_mode(), registry.resolve_group("general"), registry.GROUPS
        print(sorted(m for m in sys.modules
                     if m.split(".")[0] in ("pydantic", "pluggy", "torch", "importlib_metadata")))
    """, subprocess_env())
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_strict_mode_in_a_child_process(site):
    proc = run_python("""
        import registry
        try:
            registry.load_plugins_by_group("stat_logger")
        except registry.PluginLoadError as exc:
            print("raised:", exc.plugin.name)
    """, subprocess_env(PYTHONPATH=str(site), ENGINE_STRICT_PLUGINS="1"))
    assert proc.stdout.strip() == "raised: ep_broken", proc.stderr


@pytest.mark.slow
def test_wheel_ships_builtin_manifests_and_installed_copy_finds_them(tmp_path):
    wheels = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
         "--disable-pip-version-check", "-w", str(wheels), str(REPO)],
        check=True, capture_output=True, timeout=300,
    )
    [wheel] = wheels.glob("engine-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        assert "registry/_builtin_manifests/builtin.toml" in zf.namelist()
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index",
         "--disable-pip-version-check", "--target", str(tmp_path / "installed"), str(wheel)],
        check=True, capture_output=True, timeout=300,
    )
    env = subprocess_env()
    env["PYTHONPATH"] = str(tmp_path / "installed")
    proc = run_python("""
        import registry
        print(registry.__file__)
        for r in registry.discover():
            if r.source == "builtin":
                print(r.name, r.origin)
    """, env, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith(str(tmp_path / "installed"))
    expected = os.path.join(str(tmp_path / "installed"), "registry", "_builtin_manifests",
                            "builtin.toml")
    shipped = tomllib.loads((REPO / "manifests" / "builtin.toml").read_text())["plugin"]
    assert {"cpu", "cuda", "builtin_models"} <= {p["name"] for p in shipped}
    assert sorted(lines[1:]) == sorted(f"{p['name']} {expected}" for p in shipped)
