"""The model-architecture example (examples/my-model-plugin): found through
--plugin-dir (its pyproject.toml's entry-point table) or pip-installed (a real
entry point), the new architecture loads, its module is imported only when the
model is built, tensor parallelism reaches it in every worker process, and its
greedy tokens equal the Llama it extends (logit_scale 1.0)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import subprocess_env
from test_example_platform import pip_install_example

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "my-model-plugin"

SCRIPT = """
import json, sys
from engine import LLM, SamplingParams
import registry
registry.load_general_plugins()
imported_before = "my_model_plugin.model" in sys.modules
llm = LLM(sys.argv[1], tensor_parallel_size=int(sys.argv[2]), dtype="float32",
          kv_cache_memory=1 << 22)
outs = llm.generate(["def add(a, b):", "import os"],
                    SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
print(json.dumps({"imported_before": imported_before,
                  "imported_after": "my_model_plugin.model" in sys.modules,
                  "tokens": [o.outputs[0].token_ids for o in outs]}))
llm.shutdown()
"""


def run(model: Path, tp: int = 1, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", SCRIPT, str(model), str(tp)],
                          capture_output=True, text=True, timeout=180,
                          env=subprocess_env(OMP_NUM_THREADS="1", **env))


def report(proc: subprocess.CompletedProcess) -> dict:
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def models(tmp_path_factory, make_hf_model) -> tuple[Path, Path]:
    """(a tiny Llama, the same weights under the plugin's architecture name)."""
    llama = make_hf_model("llama")
    mine = tmp_path_factory.mktemp("my-model") / "model"
    shutil.copytree(llama, mine)
    config = json.loads((mine / "config.json").read_text())
    config["architectures"] = ["MyLlamaForCausalLM"]
    (mine / "config.json").write_text(json.dumps(config))
    return llama, mine


@pytest.fixture(scope="module")
def llama_tokens(models) -> list[list[int]]:
    return report(run(models[0]))["tokens"]


def test_architecture_from_the_plugin_dir_loads_lazily_and_matches_llama(models, llama_tokens):
    got = report(run(models[1], ENGINE_PLUGIN_DIRS=str(EXAMPLE)))
    assert got["imported_before"] is False and got["imported_after"] is True
    assert got["tokens"] == llama_tokens


@pytest.mark.slow
def test_plugin_dir_flag_reaches_two_tensor_parallel_ranks(models, llama_tokens):
    # the real CLI flag, no ENGINE_PLUGIN_DIRS in the environment: the worker
    # processes find the architecture only because --plugin-dir reaches them
    env = subprocess_env(OMP_NUM_THREADS="1")
    assert "ENGINE_PLUGIN_DIRS" not in env
    proc = subprocess.run(
        [sys.executable, "-m", "engine", "generate", "--plugin-dir", str(EXAMPLE),
         "--model", str(models[1]), "--tensor-parallel-size", "2",
         "--kv-cache-memory", str(1 << 22), "--temperature", "0", "--max-tokens", "8",
         "--ignore-eos", "--json", "--prompt", "def add(a, b):", "--prompt", "import os"],
        capture_output=True, text=True, timeout=180, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(proc.stdout)
    assert [row["prompt"] for row in rows] == ["def add(a, b):", "import os"]
    assert [row["token_ids"] for row in rows] == llama_tokens


def test_installed_model_plugin_registers_its_architecture(models, llama_tokens, tmp_path):
    target = pip_install_example(EXAMPLE, tmp_path)
    got = report(run(models[1], PYTHONPATH=str(target)))
    assert got["imported_after"] is True
    assert got["tokens"] == llama_tokens


def test_architecture_is_unsupported_when_the_plugin_is_filtered_out(models):
    proc = run(models[1], ENGINE_PLUGIN_DIRS=str(EXAMPLE), ENGINE_PLUGINS="")
    assert proc.returncode != 0
    assert "are not supported" in proc.stderr and "MyLlamaForCausalLM" in proc.stderr
