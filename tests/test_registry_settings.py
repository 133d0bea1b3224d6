"""Typed plugin settings: a pydantic model declared in the manifest (`config =`)
or on the plugin (`engine_config_model`), values from engine.toml,
ENGINE_PLUGIN_CONFIG, --plugin-config and LLM(plugin_config=...), validated with
errors naming plugin and field, secrets masked, and the same values in every
tensor-parallel worker process."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from conftest import subprocess_env
from plugin_fixtures.helpers import run_cli, run_python, write_manifest, write_module

SETTINGS_MODULE = """
    import json, os
    from typing import Literal
    from pydantic import BaseModel, Field, SecretStr

    class Settings(BaseModel):
        model_config = {"extra": "forbid"}
        threshold: int = 3
        mode: Literal["fast", "exact"] = "fast"
        token: SecretStr = SecretStr("default-secret")
        ratio: float = Field(0.5, ge=0, le=1)

    class OtherSettings(BaseModel):
        greeting: str = "hello"

    def register():
        import registry
        out = os.environ.get("CFG_REPORT_DIR")
        if out:
            s = registry.get_plugin_config("cfgp")
            with open(os.path.join(out, f"{os.getpid()}.json"), "w") as f:
                json.dump({"threshold": s.threshold, "mode": s.mode,
                           "token": s.token.get_secret_value()}, f)

    def other():
        pass

    other.engine_config_model = OtherSettings
    """


@pytest.fixture
def env(isolated_engine_env, tmp_path) -> dict[str, str]:
    pdir = tmp_path / "pdir"
    write_module(pdir, "cfg_plugin", SETTINGS_MODULE)
    write_manifest(pdir, "cfg.toml", [
        {"group": "general", "name": "cfgp", "value": "cfg_plugin:register",
         "config": "cfg_plugin:Settings"},
        {"group": "general", "name": "otherp", "value": "cfg_plugin:other"},
    ], package='path = "."')
    (isolated_engine_env / "engine.toml").write_text(
        '[plugins.cfgp]\nthreshold = 5\nmode = "exact"\n')
    return subprocess_env(ENGINE_PLUGIN_DIRS=str(pdir))


def config_of(rows: list[dict], name: str):
    return next(r["config"] for r in rows if r["name"] == name)


def test_layers_merge_in_precedence_order_and_secrets_are_masked(env):
    proc = run_cli("plugins", "list", "--json", env=env)
    assert proc.returncode == 0, proc.stderr
    assert config_of(json.loads(proc.stdout), "cfgp") == {
        "threshold": 5, "mode": "exact", "token": "**********", "ratio": 0.5}
    env = {**env, "ENGINE_PLUGIN_CONFIG": json.dumps({"cfgp": {"threshold": 6, "ratio": 0.25}})}
    proc = run_cli("--plugin-config", "cfgp.threshold=7", "--plugin-config", "cfgp.token=s3cret",
                   "plugins", "list", "--json", env=env)
    assert proc.returncode == 0, proc.stderr
    assert config_of(json.loads(proc.stdout), "cfgp") == {
        "threshold": 7, "mode": "exact", "token": "**********", "ratio": 0.25}
    assert "s3cret" not in proc.stdout
    proc = run_python("""
        import registry
        from engine.engine_args import EngineArgs
        EngineArgs(plugin_config={"cfgp": {"threshold": 9}}).apply_process_settings()
        s = registry.get_plugin_config("cfgp")
        print(s.threshold, s.mode, s.ratio, s.token.get_secret_value())
        print(registry.get_plugin_config("otherp").greeting)
        """, {**env, "ENGINE_PLUGIN_CONFIG": json.dumps({"cfgp": {"ratio": 0.75, "token": "t"}})})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split("\n")[:2] == ["9 exact 0.75 t", "hello"]


def test_invalid_settings_name_plugin_and_field(env):
    bad = {**env, "ENGINE_PLUGIN_CONFIG": json.dumps({"cfgp": {"threshold": "many"},
                                                      "otherp": {"greeting": 3}})}
    doctor = run_cli("plugins", "doctor", env=bad)
    assert doctor.returncode == 1
    assert ("plugin cfgp config: threshold: Input should be a valid integer, unable to parse "
            "string as an integer") in doctor.stdout
    assert "plugin otherp config: greeting: Input should be a valid string" in doctor.stdout
    proc = run_python("""
        import registry
        try:
            registry.check_plugin_configs()
        except registry.PluginConfigError as exc:
            print(exc)
        """, bad)
    assert proc.stdout.splitlines() == [
        "plugin cfgp config: threshold: Input should be a valid integer, unable to parse "
        "string as an integer",
        "plugin otherp config: greeting: Input should be a valid string"]
    typo = run_cli("--plugin-config", "cfgp.treshold=1", "plugins", "doctor", env=env)
    assert "plugin cfgp config: treshold: Extra inputs are not permitted" in typo.stdout
    unknown = run_cli("--plugin-config", "nobody.x=1", "plugins", "doctor", env=env)
    assert "plugin nobody config: (settings): no plugin named 'nobody' is discovered" \
        in unknown.stdout
    toml = Path(env["ENGINE_CONFIG_DIR"]) / "engine.toml"
    toml.write_text("[plugins.cfgp]\nratio = 2\n")
    doctor = run_cli("plugins", "doctor", env=env)
    assert "plugin cfgp config: ratio: Input should be less than or equal to 1" in doctor.stdout


def test_invalid_settings_fail_the_engine_start(env):
    proc = run_cli("--plugin-config", "cfgp.mode=slow", "generate", "--prompt", "hi",
                   "--max-tokens", "1", env=env)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert "plugin cfgp config: mode: Input should be 'fast' or 'exact'" in proc.stderr


@pytest.mark.slow
def test_settings_reach_tensor_parallel_workers(env, tmp_path, make_hf_model):
    model = make_hf_model("llama")
    report = tmp_path / "report"
    report.mkdir()
    script = tmp_path / "run.py"
    script.write_text(
        "import os, sys\n"
        "from engine import LLM, SamplingParams\n"
        "if __name__ == '__main__':\n"
        "    llm = LLM(sys.argv[1], tensor_parallel_size=2, dtype='float32',\n"
        "              kv_cache_memory=1 << 22,\n"
        "              plugin_config={'cfgp': {'threshold': 11, 'token': 'tp-secret'}})\n"
        "    llm.generate(['hi'], SamplingParams(max_tokens=1))\n"
        "    llm.shutdown()\n"
        "    print('main', os.getpid())\n")
    import subprocess

    proc = subprocess.run([sys.executable, str(script), str(model)], capture_output=True,
                          text=True, timeout=240,
                          env={**env, "CFG_REPORT_DIR": str(report), "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    main_pid = int(proc.stdout.split()[-1])
    reports = {int(p.stem): json.loads(p.read_text()) for p in report.glob("*.json")}
    assert main_pid in reports and len(reports) == 3, reports  # the script and two workers
    assert all(r == {"threshold": 11, "mode": "exact", "token": "tp-secret"}
               for r in reports.values())
