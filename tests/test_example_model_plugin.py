"""The model-architecture example (examples/my-model-plugin), found only through
--plugin-dir (its pyproject.toml's entry-point table): the new architecture loads,
its module is imported only when the model is built, and its greedy tokens equal
the Llama it extends (logit_scale 1.0)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import subprocess_env

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "my-model-plugin"

SCRIPT = """
import json, sys
from engine import LLM, SamplingParams
import registry
registry.load_general_plugins()
imported_before = "my_model_plugin.model" in sys.modules
llm = LLM(sys.argv[1], kv_cache_memory=1 << 22)
out = llm.generate(["def add(a, b):"], SamplingParams(temperature=0, max_tokens=8,
                                                      ignore_eos=True))[0]
print(json.dumps({"imported_before": imported_before,
                  "imported_after": "my_model_plugin.model" in sys.modules,
                  "tokens": out.outputs[0].token_ids}))
llm.shutdown()
"""


def _run(model: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", SCRIPT, str(model)], capture_output=True,
                          text=True, timeout=180, env=subprocess_env(OMP_NUM_THREADS="1", **env))


def test_architecture_from_the_example_plugin_dir_loads_lazily_and_matches_llama(
    tmp_path, make_hf_model
):
    llama = make_hf_model("llama")
    mine = tmp_path / "my-model"
    shutil.copytree(llama, mine)
    config = json.loads((mine / "config.json").read_text())
    config["architectures"] = ["MyLlamaForCausalLM"]
    (mine / "config.json").write_text(json.dumps(config))

    proc = _run(mine, ENGINE_PLUGIN_DIRS=str(EXAMPLE))
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["imported_before"] is False and got["imported_after"] is True
    baseline = json.loads(_run(llama).stdout.strip().splitlines()[-1])
    assert got["tokens"] == baseline["tokens"]

    unsupported = _run(mine, ENGINE_PLUGIN_DIRS=str(EXAMPLE), ENGINE_PLUGINS="")
    assert unsupported.returncode != 0 and "are not supported" in unsupported.stderr
