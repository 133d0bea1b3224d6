"""`engine plugins list/validate/doctor/schema`, run as real child processes with
a really installed entry-point package on PYTHONPATH and a private config dir."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import subprocess_env
from plugin_fixtures.helpers import REPO, install_test_plugins, run_cli, run_python, write_manifest


@pytest.fixture(scope="session")
def site(tmp_path_factory) -> Path:
    return install_test_plugins(tmp_path_factory.mktemp("ep-install"))


@pytest.fixture
def sources(isolated_engine_env, tmp_path):
    """A config-dir manifest and a plugin dir, both with working plugins."""
    code = tmp_path / "code"
    code.mkdir()
    (code / "cli_test_mod.py").write_text("def register():\n    pass\nVALUE = 1\n")
    config = write_manifest(isolated_engine_env / "plugins", "conf.toml",
                            [{"group": "general", "name": "from_config",
                              "value": "cli_test_mod:register"}],
                            package=f'path = "{code}"')
    pdir = tmp_path / "pdir"
    plugin_dir = write_manifest(pdir, "dir.toml",
                                [{"group": "io_processor", "name": "from_dir",
                                  "value": "cli_test_mod:register", "description": "hi"},
                                 {"group": "general", "name": "ep_hello",
                                  "value": "cli_test_mod:register"}],
                                package=f'path = "{code}"')
    return {"config": config, "pdir": pdir, "plugin_dir": plugin_dir}


def list_json(*args: str, env) -> list[dict]:
    proc = run_cli(*args, env=env)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)  # pure JSON on stdout


@pytest.mark.parametrize("placement", ["before", "after"])
def test_list_json_shows_every_source(site, sources, placement):
    plugin_dir = ["--plugin-dir", str(sources["pdir"])]
    args = (plugin_dir + ["plugins", "list", "--json"] if placement == "before"
            else ["plugins", "list", "--json"] + plugin_dir)
    rows = list_json(*args, env=subprocess_env(PYTHONPATH=str(site)))
    assert all({"group", "name", "value", "source", "origin", "enabled"} <= set(r) for r in rows)
    by_name = {(r["name"], r["source"]): r for r in rows}
    assert by_name[("cpu", "builtin")]["group"] == "engine.platform_plugins"
    assert by_name[("from_config", "config-dir")]["origin"] == str(sources["config"])
    assert by_name[("from_dir", "plugin-dir")]["origin"] == str(sources["plugin_dir"])
    assert by_name[("ep_io", "entry-point")]["origin"] == "engine-test-plugins 1.2.3"
    # the plugin dir's ep_hello shadows the installed one
    assert by_name[("ep_hello", "plugin-dir")]["enabled"] is True
    assert by_name[("ep_hello", "entry-point")]["enabled"] is False


def test_list_group_filter_and_allow_list(site, sources):
    env = subprocess_env(PYTHONPATH=str(site), ENGINE_PLUGINS="ep_platform",
                         ENGINE_PLUGIN_DIRS=str(sources["pdir"]))
    rows = list_json("plugins", "list", "--group", "platform", "--json", env=env)
    assert {r["group"] for r in rows} == {"engine.platform_plugins"}
    assert {(r["name"], r["enabled"]) for r in rows} >= {("cpu", True), ("ep_platform", True)}
    rows = list_json("plugins", "list", "--json", env=env)
    assert {r["name"]: r["enabled"] for r in rows}["from_dir"] is False


def test_list_table_and_bad_group(sources):
    env = subprocess_env(ENGINE_PLUGIN_DIRS=str(sources["pdir"]))
    proc = run_cli("plugins", "list", env=env)
    assert proc.returncode == 0, proc.stderr
    header, *rows = proc.stdout.splitlines()
    assert header.split() == ["GROUP", "NAME", "SOURCE", "ENABLED", "VALUE", "ORIGIN", "NOTE"]
    assert any(row.split()[:4] == ["io_processor", "from_dir", "plugin-dir", "yes"] for row in rows)
    proc = run_cli("plugins", "list", "--group", "gpu", env=env)
    assert proc.returncode == 2 and "valid groups are" in proc.stderr


def _run_on_a_terminal(*args: str, env: dict[str, str]) -> tuple[int, str]:
    """`python ARGS` (`-m engine ...` or `-c CODE`) with stdout and stderr on a
    pseudo-terminal (a real tty: `isatty()` is true); returns the exit status and
    what the terminal received."""
    import os
    import pty
    import subprocess
    import sys

    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, *args], env=env, stdout=slave,
                            stderr=slave, stdin=subprocess.DEVNULL)
    os.close(slave)
    received = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        received += chunk
    os.close(master)
    return proc.wait(timeout=120), received.decode(errors="replace")


def test_plugin_text_is_shown_not_obeyed_on_a_terminal(isolated_engine_env, tmp_path):
    """A manifest's path (the ORIGIN column), a validation problem and a logged
    error with an escape sequence in them reach a terminal as \\xNN text: an
    `ESC ]` would hide the rest of the listing."""
    code = tmp_path / "code"
    code.mkdir()
    (code / "cli_test_mod.py").write_text("def register():\n    pass\n")
    pdir = tmp_path / "plugins\x1b]0;hidden"
    manifest = write_manifest(pdir, "dir.toml", [{"group": "general", "name": "esc_origin",
                                                  "value": "cli_test_mod:register"}],
                              package=f'path = "{code}"')
    env = subprocess_env(ENGINE_PLUGIN_DIRS=str(pdir))
    status, screen = _run_on_a_terminal("-m", "engine", "plugins", "list", env=env)
    assert status == 0
    assert "\x1b" not in screen and "plugins\\x1b]0;hidden" in screen
    assert "esc_origin" in screen
    # piped, the exact path
    proc = run_cli("plugins", "list", env=env)
    assert proc.returncode == 0 and str(manifest) in proc.stdout
    bad = write_manifest(pdir, "bad.toml", [{"group": "general", "name": "x"}])  # no value
    status, screen = _run_on_a_terminal("-m", "engine", "plugins", "validate", str(bad), env=env)
    assert status == 1 and "\x1b" not in screen and "plugins\\x1b]0;hidden" in screen
    # the list logs the bad manifest on stderr, the same terminal
    status, screen = _run_on_a_terminal("-m", "engine", "plugins", "list", env=env)
    assert status == 0 and "\x1b" not in screen and "ERROR registry: " in screen
    assert "hidden/bad.toml: plugin[0].value: required key is missing" in screen


def test_json_on_a_terminal_escapes_the_controls_json_leaves_raw():
    """`generate --json` / `embed --json` keep non-ASCII text; on a terminal DEL and
    the C1 controls (raw in JSON) are written as \\u escapes of the same value."""
    value = [{"text": "a\x1b b\x7f c\x9b d\u00e9 \u4e2d"}]
    code = ("from engine.cli.common import json_for_stdout; "
            f"print(json_for_stdout({value!r}))")
    status, screen = _run_on_a_terminal("-c", code, env=subprocess_env())
    assert status == 0 and json.loads(screen) == value
    assert "\\u001b" in screen and "\\u007f" in screen and "\\u009b" in screen
    assert "\x9b" not in screen and "\u00e9 \u4e2d" in screen  # letters stay letters
    piped = run_python(code, env=subprocess_env())
    assert json.loads(piped.stdout) == value and "\x9b" in piped.stdout  # exact when piped


def test_list_and_help_do_not_import_torch(site, sources):
    env = subprocess_env(PYTHONPATH=str(site), ENGINE_PLUGIN_DIRS=str(sources["pdir"]))
    proc = run_python("""
        import contextlib, io, sys
        from engine.cli.main import main
        with contextlib.redirect_stdout(io.StringIO()):
            assert main(["plugins", "list"]) == 0
            assert main(["plugins", "list", "--json"]) == 0
            try:
                main(["--help"])
            except SystemExit:
                pass
        print(sorted(m for m in sys.modules if m == "torch" or m.startswith("torch.")))
    """, env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_strict_list_fails_on_a_bad_manifest(isolated_engine_env):
    bad = isolated_engine_env / "plugins" / "bad.toml"
    bad.parent.mkdir()
    bad.write_text("schema-version = 1\n[[plugin]]\ngroup = 'general'\nname = 'x'\n")
    env = subprocess_env()
    proc = run_cli("plugins", "list", env=env)
    assert proc.returncode == 0
    assert f"ERROR registry: {bad}: plugin[0].value: required key is missing" in proc.stderr
    assert run_cli("--strict-plugins", "plugins", "list", env=env).returncode == 1


# ---------------------------------------------------------------------------
# validate


def test_validate_reports_one_line_per_problem(tmp_path):
    good = write_manifest(tmp_path, "good.toml", [{"group": "general", "name": "g",
                                                  "value": "json:dumps"}])
    syntax = tmp_path / "syntax.toml"
    syntax.write_text("schema-version = 1\n[[plugin]\n")
    schema = tmp_path / "schema.toml"
    schema.write_text('schema-version = 1\n[[plugin]]\ngroup = "general"\nname = "a"\n'
                      'value = "m"\n[[plugin]]\ngroup = "nope"\nname = "b"\nvalue = "bad value"\n')
    proc = run_cli("plugins", "validate", str(good), str(syntax), str(schema),
                   str(tmp_path / "missing.toml"), env=subprocess_env())
    assert proc.returncode == 1
    assert proc.stdout.splitlines() == [
        f"{good}: ok",
        f"{syntax}:2:9: Expected ']]' at the end of an array declaration",
        f"{schema}: plugin[1].group: unknown group 'nope'; valid groups: general "
        "(engine.general_plugins), platform (engine.platform_plugins), io_processor "
        "(engine.io_processor_plugins), stat_logger (engine.stat_logger_plugins), "
        "logits_processor (engine.logits_processor_plugins), api_route "
        "(engine.api_route_plugins), graph_backend (engine.graph_backend_plugins), "
        "spec_proposer (engine.spec_proposer_plugins), lora_resolver "
        "(engine.lora_resolver_plugins), quantization (engine.quantization_plugins)",
        f"{schema}: plugin[1].value: invalid value 'bad value': expected 'module' or "
        "'module:attr' (dotted Python identifiers, e.g. 'acme_npu.plugin:register')",
        f"{tmp_path / 'missing.toml'}: no such file or folder",
    ]
    proc = run_cli("plugins", "validate", str(good), str(REPO / "manifests"), env=subprocess_env())
    assert proc.returncode == 0, proc.stdout


def test_validate_import_and_pyproject(tmp_path):
    manifest = write_manifest(tmp_path / "m", "p.toml", [
        {"group": "general", "name": "ok", "value": "json:dumps"},
        {"group": "general", "name": "gone", "value": "no_such_mod_xyz:f"},
    ])
    project = tmp_path / "proj"
    project.mkdir()
    (project / "pyproject.toml").write_text(
        '[project]\nname = "p"\n[project.entry-points."engine.general_plugins"]\n'
        'fine = "json:loads"\n[project.entry-points."engine.gpu_plugins"]\nx = "m:f"\n')
    proc = run_cli("plugins", "validate", str(manifest), env=subprocess_env())
    assert proc.returncode == 0 and proc.stdout.strip() == f"{manifest}: ok"
    proc = run_cli("plugins", "validate", "--import", str(manifest), str(project),
                   env=subprocess_env())
    assert proc.returncode == 1
    lines = proc.stdout.splitlines()
    assert lines[0] == (f"{manifest}: plugin[1].value: cannot import 'no_such_mod_xyz:f': "
                        "ModuleNotFoundError: No module named 'no_such_mod_xyz'")
    assert lines[1].startswith(f'{project / "pyproject.toml"}: project.entry-points."engine.gpu_plugins": '
                               "unknown plugin group 'engine.gpu_plugins'")


# ---------------------------------------------------------------------------
# doctor and schema


def test_doctor_reports_import_failures_conflicts_and_platform(site, sources):
    env = subprocess_env(PYTHONPATH=str(site), ENGINE_PLUGIN_DIRS=str(sources["pdir"]))
    proc = run_cli("plugins", "doctor", env=env)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    out = proc.stdout
    assert "PROBLEM" in out and "stat_logger/ep_broken" in out and "ModuleNotFoundError" in out
    assert "ok       io_processor/from_dir" in out
    assert "ep_hello (engine.general_plugins): entry-point engine-test-plugins 1.2.3 is " \
           f"shadowed by plugin-dir {sources['plugin_dir']}" in out
    assert "\nPlatform\n" in out
    assert "would choose 'cpu' (engine.platforms.cpu.CpuPlatform)" in out, out
    assert "problem(s) found" in out


def test_doctor_is_clean_without_plugin_problems():
    proc = run_cli("plugins", "doctor", env=subprocess_env())
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.rstrip().endswith("no problems found")


def test_schema_command_prints_the_published_schema():
    proc = run_cli("plugins", "schema", env=subprocess_env())
    assert proc.returncode == 0
    assert json.loads(proc.stdout) == json.loads((REPO / "docs" / "manifest.schema.json").read_text())


def test_list_says_route_plugins_are_mounted_only_by_name(isolated_engine_env, tmp_path):
    """An enabled api_route plugin is not served until named: the NOTE column and
    the JSON ``note`` say so, and say it differently once ENGINE_PLUGINS names it."""
    pdir = tmp_path / "routes"
    write_manifest(pdir, "routes.toml",
                   [{"group": "api_route", "name": "my_routes",
                     "value": "no_such_mod:router", "description": "extra endpoints"}])
    env = subprocess_env(ENGINE_PLUGIN_DIRS=str(pdir))
    proc = run_cli("plugins", "list", "--group", "api_route", env=env)
    assert proc.returncode == 0, proc.stderr
    row = next(line for line in proc.stdout.splitlines() if "my_routes" in line)
    assert row.split()[:4] == ["api_route", "my_routes", "plugin-dir", "yes"]
    assert row.endswith("mounted only when enabled by name (--enable-route-plugin / "
                        "ENGINE_PLUGINS); extra endpoints")
    rows = list_json("plugins", "list", "--json", env=env)
    route = next(r for r in rows if r["name"] == "my_routes")
    assert route["enabled"] is True and route["group"] == "engine.api_route_plugins"
    assert route["note"].startswith("mounted only when enabled by name")
    # other groups' notes are their description (or why they are disabled)
    assert all(r["note"] == (r["disabled_reason"] or r["description"])
               for r in rows if r["group"] != "engine.api_route_plugins")
    named = subprocess_env(ENGINE_PLUGIN_DIRS=str(pdir), ENGINE_PLUGINS="api_route:my_routes")
    rows = list_json("plugins", "list", "--group", "api_route", "--json", env=named)
    assert rows[0]["note"] == "mounted by engine serve (named in ENGINE_PLUGINS); extra endpoints"
