"""Who did what: registrations recorded with the plugin that made them, one
WARNING (strict: an error) when one plugin replaces another's, and the effects
in `registry.effects()`, `engine plugins doctor` and its --json."""

from __future__ import annotations

import json

import pytest
from conftest import subprocess_env
from plugin_fixtures.helpers import run_cli, run_python, write_manifest, write_module


@pytest.fixture
def env(tmp_path) -> dict[str, str]:
    pdir = tmp_path / "pdir"
    write_module(pdir, "eff_plugins", """
        def first():
            from engine.models import ModelRegistry
            from engine.attention.registry import register_backend
            ModelRegistry.register_model("EffArch", "eff_plugins:ModelA")
            register_backend("EFF_ATTN", "eff_plugins:BackendA")

        def second():
            from engine.models import ModelRegistry
            ModelRegistry.register_model("EffArch", "eff_plugins:ModelB")
            ModelRegistry.register_model("EffArch", "eff_plugins:ModelB")  # same again: no effect
        """)
    write_manifest(pdir, "eff.toml", [
        {"group": "general", "name": "a_first", "value": "eff_plugins:first"},
        {"group": "general", "name": "b_second", "value": "eff_plugins:second"},
    ], package='path = "."')
    return subprocess_env(ENGINE_PLUGIN_DIRS=str(pdir))


def test_effects_name_the_plugin_and_what_it_replaced(env):
    proc = run_python("""
        import json, registry
        registry.load_general_plugins()
        from engine.models import ModelRegistry
        ModelRegistry.register_model("UserArch", "user_models:ModelU")
        ModelRegistry.register_model("UserArch", "user_models:ModelV")
        mine = [e for e in registry.effects() if "Eff" in e["target"] or "EFF" in e["target"]
                or e["target"] == "UserArch"]
        print(json.dumps(mine))
        """, env)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == [
        {"plugin": "a_first", "group": "engine.general_plugins", "kind": "model",
         "target": "EffArch", "replaced": None},
        {"plugin": "a_first", "group": "engine.general_plugins", "kind": "attention_backend",
         "target": "EFF_ATTN", "replaced": None},
        {"plugin": "b_second", "group": "engine.general_plugins", "kind": "model",
         "target": "EffArch", "replaced": "a_first"},
        {"plugin": "user", "group": None, "kind": "model", "target": "UserArch", "replaced": None},
        {"plugin": "user", "group": None, "kind": "model", "target": "UserArch",
         "replaced": "user"},
    ]
    warnings = [line for line in proc.stderr.splitlines() if "replaces the registration" in line]
    assert warnings == ["model 'EffArch': plugin 'b_second' replaces the registration made by "
                        "plugin 'a_first'"]  # user code over user code stays below WARNING


def test_strict_mode_makes_a_replacement_an_error(env):
    proc = run_python("""
        import registry
        try:
            registry.load_general_plugins()
        except registry.RegistryError as exc:
            print("raised:", exc)
        """, {**env, "ENGINE_STRICT_PLUGINS": "1"})
    assert "raised: general plugin 'b_second'" in proc.stdout
    assert "plugin 'b_second' replaces the registration made by plugin 'a_first'" in proc.stdout


def test_doctor_shows_effects_in_text_and_json(env):
    text = run_cli("plugins", "doctor", env=env)
    assert "a_first: model EffArch" in text.stdout
    assert "WARNING  b_second: model EffArch (replaces a_first's)" in text.stdout
    proc = run_cli("plugins", "doctor", "--json", env=env)
    report = json.loads(proc.stdout)
    assert {"plugin": "b_second", "group": "engine.general_plugins", "kind": "model",
            "target": "EffArch", "replaced": "a_first"} in report["effects"]
    assert report["problems"] >= 1
