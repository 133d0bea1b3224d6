"""Load formats: torch files read with weights_only=True, a format registered
with register_model_loader (class or "module:Class"), and how "auto" picks one.
Greedy tokens are compared with the same model loaded from safetensors."""

from __future__ import annotations

import shutil
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from engine import LLM, SamplingParams
from engine.model_loader import (
    ModelLoader,
    SafetensorsLoader,
    get_model_loader,
    register_model_loader,
)

PROMPT = [5, 17, 300, 42, 99, 7]
GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)


def greedy(model: Path, **kwargs) -> list[int]:
    with LLM(str(model), dtype="float32", kv_cache_memory=1 << 22, **kwargs) as llm:
        return llm.generate([PROMPT], GREEDY)[0].outputs[0].token_ids


def _without_weights(src: Path, dest: Path) -> Path:
    dest.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json",
                 "special_tokens_map.json"):
        if (src / name).is_file():
            shutil.copy(src / name, dest / name)
    return dest


@pytest.fixture(autouse=True)
def _own_loader_table(monkeypatch):
    """Formats a test registers are gone after it."""
    from engine.model_loader import loader

    monkeypatch.setattr(loader, "_LOADERS", dict(loader._LOADERS))


@pytest.fixture(scope="module")
def llama(make_hf_model) -> Path:
    return make_hf_model("llama")


@pytest.fixture(scope="module")
def reference(llama) -> list[int]:
    return greedy(llama)


def test_torch_files_load_with_auto_and_equal_safetensors(llama, reference, tmp_path):
    folder = _without_weights(llama, tmp_path / "pt")
    torch.save(load_file(str(llama / "model.safetensors")), folder / "pytorch_model.bin")
    assert type(get_model_loader("auto", folder)).__name__ == "PtLoader"
    assert greedy(folder) == reference
    assert greedy(folder, load_format="pt") == reference


class _NotATensor:
    pass


def test_a_torch_file_with_code_is_refused_by_weights_only(llama, tmp_path):
    folder = _without_weights(llama, tmp_path / "evil")
    state = load_file(str(llama / "model.safetensors"))
    state["lm_head.weight"] = _NotATensor()  # unpickling it would run arbitrary code
    torch.save(state, folder / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"pytorch_model.bin: cannot load with torch.load\(weights_only=True\)"):
        greedy(folder)


LOADER_MODULE = '''
import numpy as np
import torch
from engine.model_loader import ModelLoader


class NpzLoader(ModelLoader):
    """Weights in one weights.npz (float32 arrays by Hugging Face name)."""

    def can_load(self, path):
        return (path / "weights.npz").is_file()

    def iter_weights(self, path, hf_config):
        with np.load(path / "weights.npz") as arrays:
            for name in arrays.files:
                yield name, torch.from_numpy(arrays[name].copy())
'''


def test_a_registered_load_format_by_module_string(llama, reference, tmp_path, monkeypatch):
    import numpy as np

    (tmp_path / "npz_loader.py").write_text(textwrap.dedent(LOADER_MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    folder = _without_weights(llama, tmp_path / "npz")
    np.savez(folder / "weights.npz",
             **{k: v.numpy() for k, v in load_file(str(llama / "model.safetensors")).items()})
    register_model_loader("npz", "npz_loader:NpzLoader")
    assert greedy(folder, load_format="npz") == reference
    assert greedy(folder) == reference  # "auto" asks the registered format too


def test_register_model_loader_checks_its_arguments(tmp_path):
    with pytest.raises(ValueError, match=r"other than 'auto'"):
        register_model_loader("auto", SafetensorsLoader)
    with pytest.raises(ValueError, match=r"must be a ModelLoader subclass"):
        register_model_loader("mine", dict)
    with pytest.raises(ValueError, match=r"must be a ModelLoader subclass or a 'module:Class'"):
        register_model_loader("mine", "not a name")

    class Nothing(ModelLoader):
        pass

    register_model_loader("nothing", Nothing)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"no \*.safetensors weight files, nor weights in "
                                                r"another known format \(safetensors, gguf, pt, nothing\)"):
        get_model_loader("auto", tmp_path)
    with pytest.raises(FileNotFoundError, match=r"model '.*nowhere' does not exist"):
        get_model_loader("auto", tmp_path / "nowhere")


PLUGIN_SIDE = """
import json, sys
from engine import LLM, SamplingParams

if __name__ == "__main__":
    model, tp = sys.argv[1], int(sys.argv[2])
    with LLM(model, dtype="float32", kv_cache_memory=1 << 22, tensor_parallel_size=tp) as llm:
        out = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    print(json.dumps(out[0].outputs[0].token_ids))
""".replace("PROMPT", str(PROMPT))


@pytest.mark.parametrize("tp", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_a_format_registered_by_a_general_plugin_is_found_by_auto_in_every_worker(
    llama, reference, tmp_path, tp
):
    import json
    import subprocess
    import sys

    import numpy as np
    from conftest import subprocess_env

    plugin = tmp_path / "npz-plugin"
    plugin.mkdir()
    (plugin / "npz_loader.py").write_text(textwrap.dedent(LOADER_MODULE) + textwrap.dedent("""
        def register():
            from engine.model_loader import register_model_loader
            register_model_loader("npz", "npz_loader:NpzLoader")
    """))
    (plugin / "pyproject.toml").write_text(
        '[project]\nname = "npz-plugin"\nversion = "0.1"\n\n'
        '[project.entry-points."engine.general_plugins"]\nnpz = "npz_loader:register"\n')
    folder = _without_weights(llama, tmp_path / "npz")
    np.savez(folder / "weights.npz",
             **{k: v.numpy() for k, v in load_file(str(llama / "model.safetensors")).items()})
    script = tmp_path / "run.py"
    script.write_text(PLUGIN_SIDE)
    proc = subprocess.run(
        [sys.executable, str(script), str(folder), str(tp)],
        env=subprocess_env(ENGINE_PLUGIN_DIRS=str(plugin), OMP_NUM_THREADS="1"),
        capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == reference
