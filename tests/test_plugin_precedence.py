"""Source precedence, every pair: plugin-dir > config-dir > entry-point > builtin.

For each pair of sources exactly those two provide one plugin name (a real
pip-installed entry point, real manifests in a plugin dir and in the config dir,
the engine's own built-in `cpu` platform); a child process discovers and loads it.
The higher source's object is the one loaded; the lower one is reported as
shadowed by the winner, naming where the winner came from."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import subprocess_env
from plugin_fixtures.helpers import run_python, write_manifest, write_module

ORDER = ("plugin-dir", "config-dir", "entry-point", "builtin")  # highest first
PAIRS = list(itertools.combinations(ORDER, 2))  # (higher, lower), all six

# what each source provides under the contested name
VALUES = {"plugin-dir": "json:loads", "config-dir": "json:dumps",
          "entry-point": "prec_ep_plugins:provide"}


@pytest.fixture(scope="module")
def ep_site(tmp_path_factory) -> Path:
    """A package with the contested names as entry points, pip-installed with --target."""
    root = tmp_path_factory.mktemp("precedence")
    source = root / "pkg"
    write_module(source, "prec_ep_plugins", "def provide():\n    return None\n")
    (source / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["hatchling"]\nbuild-backend = "hatchling.build"\n'
        '[project]\nname = "engine-precedence-plugins"\nversion = "0.0.1"\n'
        '[project.entry-points."engine.platform_plugins"]\ncpu = "prec_ep_plugins:provide"\n'
        '[project.entry-points."engine.general_plugins"]\n'
        'contested = "prec_ep_plugins:provide"\n'
        '[tool.hatch.build.targets.wheel]\nonly-include = ["prec_ep_plugins.py"]\n'
    )
    target = root / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
         "--disable-pip-version-check", "--no-index", "--target", str(target), str(source)],
        check=True, capture_output=True,
    )
    return target


@pytest.mark.parametrize("higher, lower", PAIRS, ids=[f"{h}>{lo}" for h, lo in PAIRS])
def test_higher_source_wins_and_the_lower_one_is_shadowed(higher, lower, ep_site, tmp_path,
                                                         isolated_engine_env):
    # the built-in platform `cpu` is the contested name when the builtin source takes part
    group, name = ("platform", "cpu") if "builtin" in (higher, lower) else ("general",
                                                                             "contested")
    env: dict[str, str] = {}
    if "plugin-dir" in (higher, lower):
        write_manifest(tmp_path / "pdir", "p.toml",
                       [{"group": group, "name": name, "value": VALUES["plugin-dir"]}])
        env["ENGINE_PLUGIN_DIRS"] = str(tmp_path / "pdir")
    if "config-dir" in (higher, lower):
        write_manifest(isolated_engine_env / "plugins", "c.toml",
                       [{"group": group, "name": name, "value": VALUES["config-dir"]}])
    if "entry-point" in (higher, lower):
        env["PYTHONPATH"] = str(ep_site)
    proc = run_python(f"""
        import json, registry
        records = [r.to_json() for r in registry.discover({group!r}) if r.name == {name!r}]
        obj = registry.load_plugins_by_group({group!r})[{name!r}]
        print(json.dumps({{"records": records,
                           "loaded": f"{{obj.__module__}}:{{obj.__qualname__}}"}}))
    """, subprocess_env(**env))
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    by_source = {r["source"]: r for r in result["records"]}
    assert set(by_source) == {higher, lower}, result["records"]
    winner, loser = by_source[higher], by_source[lower]
    assert winner["enabled"] is True and winner["disabled_reason"] is None
    assert loser["enabled"] is False
    assert loser["disabled_reason"] == f"shadowed by {higher} {winner['origin']}"
    if higher in VALUES:
        assert winner["value"] == VALUES[higher]
        assert result["loaded"] == VALUES[higher]
    if higher == "entry-point":
        assert winner["origin"] == "engine-precedence-plugins 0.0.1"
    # the loser's object is never imported or returned
    if lower in VALUES:
        assert result["loaded"] != VALUES[lower]
