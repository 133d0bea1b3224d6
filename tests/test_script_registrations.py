"""Registrations made in the user's script reach every worker process.

A script registers a model architecture (a class defined in the script, or a
``"module:Class"`` string) and a load format, then builds
``LLM(..., tensor_parallel_size=2)``: each worker process builds the script's
class (it leaves a marker file naming its pid) and the tokens equal transformers'.
A class the workers cannot import fails at once with its name and the fix.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from conftest import subprocess_env

PROMPT = [5, 17, 300, 42, 99, 7]
MAX_TOKENS = 6
ARCH = "MarkedLlamaForCausalLM"

MARKED_MODEL = '''
import os
from pathlib import Path

from engine.models.llama import LlamaForCausalLM


class MarkedLlama(LlamaForCausalLM):
    """A Llama that leaves a file named after the process that built it."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        (Path(os.environ["MARKER_DIR"]) / str(os.getpid())).touch()
'''

SCRIPT = MARKED_MODEL + '''

import json, sys
from engine import LLM, ModelRegistry, SamplingParams
from engine.model_loader import SafetensorsLoader, register_model_loader


class RenamedSafetensors(SafetensorsLoader):
    """A load format the script registers: safetensors under another name."""


def main():
    how, model = sys.argv[1], sys.argv[2]
    ModelRegistry.register_model("ARCH", MarkedLlama if how == "class" else "marked_model:MarkedLlama")
    register_model_loader("renamed", RenamedSafetensors)
    with LLM(model, dtype="float32", tensor_parallel_size=2, kv_cache_memory=1 << 22,
             load_format="renamed") as llm:
        out = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True))
    print(json.dumps({"tokens": out[0].outputs[0].token_ids, "pid": os.getpid()}))


if __name__ == "__main__":
    main()
'''.replace("ARCH", ARCH).replace("[PROMPT]", str([PROMPT])).replace(
    "MAX_TOKENS", str(MAX_TOKENS))


@pytest.fixture(scope="module")
def marked_model(make_hf_model, tmp_path_factory) -> Path:
    """The tiny Llama under an architecture name only the script registers."""
    folder = tmp_path_factory.mktemp("marked") / "model"
    shutil.copytree(make_hf_model("llama"), folder)
    config = json.loads((folder / "config.json").read_text())
    config["architectures"] = [ARCH]
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def _expected(make_hf_model) -> list[int]:
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(make_hf_model("llama")), dtype=torch.float32).eval()
    with torch.no_grad():
        out = model.generate(torch.tensor([PROMPT]), max_new_tokens=MAX_TOKENS, do_sample=False,
                             min_new_tokens=MAX_TOKENS)
    return out[0, len(PROMPT):].tolist()


@pytest.mark.slow
@pytest.mark.parametrize("how", ["class", "string"])
def test_script_registrations_reach_both_tensor_parallel_workers(
    marked_model, make_hf_model, tmp_path, how
):
    script = tmp_path / "user_script.py"
    script.write_text(SCRIPT)
    (tmp_path / "marked_model.py").write_text(MARKED_MODEL)
    markers = tmp_path / "markers"
    markers.mkdir()
    proc = subprocess.run(
        [sys.executable, str(script), how, str(marked_model)],
        env=subprocess_env(PYTHONPATH=str(tmp_path), MARKER_DIR=str(markers), OMP_NUM_THREADS="1"),
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    built_in = {int(p.name) for p in markers.iterdir()}
    assert len(built_in) == 2 and result["pid"] not in built_in  # one per worker process
    assert result["tokens"] == _expected(make_hf_model)


INTERACTIVE = MARKED_MODEL + '''
import sys
from engine import LLM, ModelRegistry

ModelRegistry.register_model("ARCH", MarkedLlama)
try:
    LLM(sys.argv[1], tensor_parallel_size=2)
except ValueError as exc:
    print(exc)
'''.replace("ARCH", ARCH)


def test_a_class_from_python_c_is_refused_with_its_name_and_the_fix(marked_model, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-c", INTERACTIVE, str(marked_model)],
        env=subprocess_env(MARKER_DIR=str(tmp_path), OMP_NUM_THREADS="1"),
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert f"model architecture '{ARCH}': class MarkedLlama is defined in __main__" in proc.stdout
    assert "move MarkedLlama into a module on sys.path" in proc.stdout
    assert "pass 'my_models:MarkedLlama'" in proc.stdout
    assert not list(tmp_path.glob("[0-9]*"))  # refused before any worker was built


GUARDED = '''
import sys
from engine import LLM, ModelRegistry

if __name__ == "__main__":
''' + "\n".join("    " + line for line in MARKED_MODEL.splitlines()) + '''
    ModelRegistry.register_model("ARCH", MarkedLlama)
    try:
        LLM(sys.argv[1], tensor_parallel_size=2)
    except ImportError as exc:  # re-raised from the worker that could not import it
        print(exc)
'''.replace("ARCH", ARCH)


@pytest.mark.slow
def test_a_class_defined_under_the_main_guard_gets_the_hint(marked_model, tmp_path):
    script = tmp_path / "guarded.py"
    script.write_text(GUARDED)
    proc = subprocess.run(
        [sys.executable, str(script), str(marked_model)],
        env=subprocess_env(MARKER_DIR=str(tmp_path), OMP_NUM_THREADS="1"),
        capture_output=True, text=True, timeout=180,
    )
    assert proc.returncode == 0, proc.stderr
    assert f"model architecture '{ARCH}' is registered as '__main__:MarkedLlama'" in proc.stdout
    assert "not under `if __name__ == '__main__':`" in proc.stdout
