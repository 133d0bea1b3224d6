"""Plugins and files that try to take the engine down or stall it: a plugin calling
sys.exit, a value that is os.abort, a plugin blocking at import, code imported from
a world-writable folder, a FIFO or /dev/zero posing as a manifest, and deep nesting.
Each runs in a real child process through the public API or the CLI."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import subprocess_env
from plugin_fixtures.helpers import run_cli, run_python, write_manifest, write_module

pytestmark = pytest.mark.skipif(os.name != "posix", reason="POSIX permissions and FIFOs")


@pytest.fixture
def plugin_dir(tmp_path) -> Path:
    folder = tmp_path / "pdir"
    folder.mkdir(mode=0o700)
    return folder


def _exiting_plugins(folder: Path) -> None:
    write_module(folder, "exiting_plugin", """
        import sys

        def bye():
            sys.exit(3)

        def fine():
            print("fine plugin ran")
        """)
    write_manifest(folder, "exiting.toml", [
        {"group": "general", "name": "a_exits", "value": "exiting_plugin:bye"},
        {"group": "general", "name": "b_fine", "value": "exiting_plugin:fine"},
    ], package='path = "."')


def test_general_plugin_calling_sys_exit_does_not_end_the_process(plugin_dir):
    _exiting_plugins(plugin_dir)
    env = subprocess_env(ENGINE_PLUGIN_DIRS=str(plugin_dir))
    proc = run_python("""
        import registry
        registry.load_general_plugins()
        print("still alive")
        """, env)
    assert proc.returncode == 0, proc.stderr
    assert "fine plugin ran" in proc.stdout and "still alive" in proc.stdout
    assert "plugin 'a_exits' (engine.general_plugins) from plugin-dir" in proc.stderr
    assert str(plugin_dir / "exiting.toml") in proc.stderr
    assert "SystemExit: 3" in proc.stderr


def test_strict_mode_names_the_exiting_plugin(plugin_dir):
    _exiting_plugins(plugin_dir)
    env = subprocess_env(ENGINE_PLUGIN_DIRS=str(plugin_dir), ENGINE_STRICT_PLUGINS="1")
    proc = run_python("""
        import registry
        try:
            registry.load_general_plugins()
        except registry.RegistryError as exc:
            print("raised:", exc)
        """, env)
    assert proc.returncode == 0, proc.stderr
    assert "raised: general plugin 'a_exits'" in proc.stdout
    assert "tried to end the process (SystemExit: 3)" in proc.stdout


def test_plugin_exiting_at_import_is_isolated(plugin_dir):
    write_module(plugin_dir, "exits_on_import", "import sys\nsys.exit(4)\n")
    write_manifest(plugin_dir, "imp.toml", [
        {"group": "io_processor", "name": "exits_on_import", "value": "exits_on_import:x"}],
        package='path = "."')
    env = subprocess_env(ENGINE_PLUGIN_DIRS=str(plugin_dir))
    proc = run_python("""
        import registry
        print(registry.load_plugins_by_group("io_processor"))
        """, env)
    assert proc.returncode == 0, proc.stderr
    assert "{}" in proc.stdout
    assert "cannot import plugin 'exits_on_import'" in proc.stderr
    assert "SystemExit: 4" in proc.stderr


@pytest.mark.parametrize("value", ["os:abort", "os:_exit", "sys:exit", "os:kill"])
def test_process_ending_builtin_as_value_is_refused(plugin_dir, value):
    write_manifest(plugin_dir, "abort.toml",
                   [{"group": "general", "name": "killer", "value": value}])
    env = subprocess_env(ENGINE_PLUGIN_DIRS=str(plugin_dir))
    proc = run_python("""
        import registry
        registry.load_general_plugins()
        print("still alive")
        """, env)
    assert proc.returncode == 0, proc.stderr
    assert "still alive" in proc.stdout
    name = value.replace(":", ".")
    assert f"its value {value!r} is {name}, which would end the engine's process" in proc.stderr
    validate = run_cli("plugins", "validate", "--import", str(plugin_dir / "abort.toml"), env=env)
    assert validate.returncode == 1
    assert f"is {name}, which would end the engine's process" in validate.stdout


def test_strict_failure_in_the_cli_is_one_line(plugin_dir):
    write_module(plugin_dir, "raising_plugin", "def boom():\n    raise RuntimeError('kaput')\n")
    write_manifest(plugin_dir, "boom.toml",
                   [{"group": "general", "name": "boom", "value": "raising_plugin:boom"}],
                   package='path = "."')
    env = subprocess_env()
    proc = run_cli("--strict-plugins", "--plugin-dir", str(plugin_dir), "generate", "--prompt", "hi",
                   "--max-tokens", "1", env=env)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    # the start-up line naming the out-of-tree plugins comes first; the error is one line
    lines = [line for line in proc.stderr.splitlines()
             if line.strip() and "out-of-tree plugins active" not in line]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("engine: plugin error: general plugin 'boom'")
    assert "RuntimeError: kaput" in lines[0]


def test_slow_import_names_the_plugin(plugin_dir):
    write_module(plugin_dir, "slow_plugin", "import time\ntime.sleep(1.5)\ndef f():\n    pass\n")
    write_manifest(plugin_dir, "slow.toml",
                   [{"group": "general", "name": "sleepy", "value": "slow_plugin:f"}],
                   package='path = "."')
    env = subprocess_env(ENGINE_PLUGIN_DIRS=str(plugin_dir),
                         ENGINE_PLUGIN_SLOW_IMPORT_SECONDS="0.2")
    proc = run_python("import registry\nregistry.load_general_plugins()\n", env)
    assert proc.returncode == 0, proc.stderr
    assert "still importing plugin 'sleepy' (engine.general_plugins) from plugin-dir" in proc.stderr


# ---------------------------------------------------------------------------
# files


def _code_folder_manifest(plugin_dir: Path, code: Path) -> Path:
    write_module(code, "wide_open_mod", "def register():\n    print('imported from 777')\n")
    return write_manifest(plugin_dir, "wide.toml",
                          [{"group": "general", "name": "wide", "value": "wide_open_mod:register"}],
                          package=f'path = "{code}"')


def test_world_writable_code_folder_is_refused(plugin_dir, tmp_path):
    code = tmp_path / "code777"
    manifest = _code_folder_manifest(plugin_dir, code)
    os.chmod(code, 0o777)
    env = subprocess_env(ENGINE_PLUGIN_DIRS=str(plugin_dir))
    proc = run_python("import registry\nregistry.load_general_plugins()\n", env)
    assert "imported from 777" not in proc.stdout
    assert f"its code folder {code} is writable by all users" in proc.stderr
    doctor = run_cli("plugins", "doctor", env=env)
    assert doctor.returncode == 1
    assert "no problems found" not in doctor.stdout
    assert f"its code folder {code} is writable by all users" in doctor.stdout
    validate = run_cli("plugins", "validate", str(manifest), env=env)
    assert validate.returncode == 1
    assert f"its code folder {code} is writable by all users" in validate.stdout
    os.chmod(code, 0o700)
    proc = run_python("import registry\nregistry.load_general_plugins()\n", env)
    assert "imported from 777" in proc.stdout


def test_symlinked_manifest_real_folder_is_checked(plugin_dir, tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    code = tmp_path / "code"
    real = _code_folder_manifest(shared, code)
    os.chmod(shared, 0o777)
    link = plugin_dir / "linked.toml"
    link.symlink_to(real)
    real.rename(shared / "real.toml")
    link.unlink()
    link.symlink_to(shared / "real.toml")
    env = subprocess_env(ENGINE_PLUGIN_DIRS=str(plugin_dir))
    proc = run_python("import registry\nregistry.load_general_plugins()\n", env)
    assert "imported from 777" not in proc.stdout
    assert f"refusing manifest {link} (a symlink): its real folder {shared} is writable" \
        in proc.stderr
    validate = run_cli("plugins", "validate", str(link), env=env)
    assert validate.returncode == 1
    assert f"its real folder {shared} is writable by all users" in validate.stdout


def test_world_writable_manifest_fails_validate(plugin_dir):
    path = write_manifest(plugin_dir, "ww.toml",
                          [{"group": "general", "name": "g", "value": "json:dumps"}])
    os.chmod(path, 0o666)
    proc = run_cli("plugins", "validate", str(path), env=subprocess_env())
    assert proc.returncode == 1
    assert proc.stdout.strip() == (f"{path}: refused: the file is writable by all users "
                                   "(mode 666); manifests run code, so fix the permissions")


def test_fifo_manifest_neither_hangs_list_nor_validate(plugin_dir):
    fifo = plugin_dir / "pipe.toml"
    os.mkfifo(fifo)
    env = subprocess_env(ENGINE_PLUGIN_DIRS=str(plugin_dir))
    validate = run_cli("plugins", "validate", str(fifo), env=env)  # run_cli has a timeout
    assert validate.returncode == 1
    assert validate.stdout.strip() == (f"{fifo}: not a regular file (a FIFO (named pipe)); "
                                       "a manifest must be a plain file")
    listing = run_cli("plugins", "list", env=env)
    assert listing.returncode == 0
    assert f"{fifo}: not a regular file" in listing.stderr


def test_symlink_to_dev_zero_and_huge_manifest_are_refused(plugin_dir):
    zero = plugin_dir / "zero.toml"
    zero.symlink_to("/dev/zero")
    huge = plugin_dir / "huge.toml"
    huge.write_bytes(b"schema-version = 1\n" + b"# padding\n" * 200_000)
    proc = run_cli("plugins", "validate", str(zero), str(huge), env=subprocess_env())
    assert proc.returncode == 1
    assert proc.stdout.splitlines() == [
        f"{zero}: not a regular file (a character device); a manifest must be a plain file",
        f"{huge}: too large ({huge.stat().st_size} bytes); a manifest may have at most "
        "1048576 bytes",
    ]


def test_nested_too_deeply_reports_the_real_position(plugin_dir):
    path = plugin_dir / "deep.toml"
    path.write_text("schema-version = 1\nx = " + "[" * 3000 + "]" * 3000 + "\n")
    proc = run_cli("plugins", "validate", str(path), env=subprocess_env())
    assert proc.returncode == 1
    assert proc.stdout.strip() == f"{path}:2:5: arrays or tables nested too deeply"


def test_engine_generate_survives_a_general_plugin_calling_sys_exit(plugin_dir):
    _exiting_plugins(plugin_dir)
    proc = run_cli("--plugin-dir", str(plugin_dir), "generate", "--prompt", "hi",
                   "--max-tokens", "2", "--json", env=subprocess_env())
    assert proc.returncode == 0, proc.stderr
    assert len(json.loads(proc.stdout.strip().splitlines()[-1])[0]["token_ids"]) == 2
    assert "plugin 'a_exits' (engine.general_plugins) from plugin-dir" in proc.stderr
    assert "tried to end the process (SystemExit: 3)" in proc.stderr


def test_platform_detector_calling_sys_exit_is_a_reported_problem(plugin_dir):
    write_module(plugin_dir, "exiting_platform", "import sys\ndef detect():\n    sys.exit(5)\n")
    write_manifest(plugin_dir, "plat.toml",
                   [{"group": "platform", "name": "quitter", "value": "exiting_platform:detect"}],
                   package='path = "."')
    proc = run_cli("--plugin-dir", str(plugin_dir), "plugins", "doctor", env=subprocess_env())
    assert proc.returncode == 1, proc.stderr  # a problem found, not the plugin's exit code 5
    assert "platform plugin 'quitter'" in proc.stdout
    assert "tried to end the process (SystemExit: 5)" in proc.stdout
    assert "would choose 'cpu'" in proc.stdout


def test_strict_discovery_problem_is_one_line_in_the_cli(plugin_dir):
    (plugin_dir / "bad.toml").write_text("schema-version = 1\n[[plugin]]\n")
    proc = run_cli("--strict-plugins", "--plugin-dir", str(plugin_dir), "generate",
                   "--prompt", "hi", "--max-tokens", "1", env=subprocess_env())
    assert proc.returncode == 1
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"engine: plugin error: {plugin_dir / 'bad.toml'}: plugin[0].group:")
    assert lines[0].endswith("[strict plugin mode: ENGINE_STRICT_PLUGINS=1 / --strict-plugins]")


def test_doctor_reports_a_general_plugin_that_raises_when_called(plugin_dir):
    write_module(plugin_dir, "raising_plugin", "def boom():\n    raise RuntimeError('kaput')\n")
    write_manifest(plugin_dir, "boom.toml",
                   [{"group": "general", "name": "boom", "value": "raising_plugin:boom"}],
                   package='path = "."')
    proc = run_cli("--plugin-dir", str(plugin_dir), "plugins", "doctor", env=subprocess_env())
    assert proc.returncode == 1
    assert (f"general plugin 'boom' (plugin-dir {plugin_dir / 'boom.toml'}) raised when called: "
            "RuntimeError: kaput") in proc.stdout
