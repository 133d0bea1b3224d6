"""New model architectures from plugins, through real packaging and real processes.

An entry-point package (pip-installed with ``--target``) registers one
architecture lazily and one eagerly; a manifest-only plugin in a ``--plugin-dir``
registers another. Each serves generation; the lazy module is imported only
when its model is built; ``ENGINE_PLUGINS=""`` turns the architecture off.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import subprocess_env

PLUGIN_PYPROJECT = """\
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "mylm-plugin"
version = "0.1.0"

[project.entry-points."engine.general_plugins"]
mylm = "mylm_plugin:register"

[tool.hatch.build.targets.wheel]
packages = ["mylm_plugin"]
"""

PLUGIN_INIT = """\
def register():
    from engine import ModelRegistry
    from mylm_plugin.eager_model import MyEagerLlama

    ModelRegistry.register_model("MyLazyLlama", "mylm_plugin.lazy_model:MyLazyLlama")
    ModelRegistry.register_model("MyEagerLlama", MyEagerLlama)
"""

SUBCLASS = """\
from engine.models.llama import LlamaForCausalLM


class {name}(LlamaForCausalLM):
    pass
"""

MANIFEST = """\
schema-version = 1

[package]
name = "manifest-arch"
path = "."

[[plugin]]
group = "general"
name = "manifest_arch"
value = "manifest_arch_plugin:register"
"""

MANIFEST_PLUGIN = """\
def register():
    from engine import ModelRegistry

    ModelRegistry.register_model("ManifestLlama", "manifest_arch_models:ManifestLlama")
"""

CHECK_SCRIPT = textwrap.dedent("""
    import json, sys
    import torch
    torch.set_num_threads(1)
    import registry
    from engine import LLM, ModelRegistry, SamplingParams

    registry.load_general_plugins()
    lazy = "mylm_plugin.lazy_model"
    result = {"archs": sorted(a for a in ModelRegistry.get_supported_archs() if a.startswith("My")),
              "lazy_imported_at_start": lazy in sys.modules}
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)

    def tokens(path):
        llm = LLM(path, kv_cache_memory=1 << 20)
        return llm.generate([[5, 6, 7, 8]], params)[0].outputs[0].token_ids

    reference = tokens(sys.argv[1])
    result["lazy_imported_before_its_model"] = lazy in sys.modules
    result["lazy_same_tokens"] = tokens(sys.argv[2]) == reference
    result["lazy_imported_after_its_model"] = lazy in sys.modules
    result["eager_same_tokens"] = tokens(sys.argv[3]) == reference
    print(json.dumps(result))
""")


def _model_with_arch(src: Path, dst: Path, arch: str) -> Path:
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    config["architectures"] = [arch]
    (dst / "config.json").write_text(json.dumps(config))
    return dst


@pytest.fixture(scope="module")
def plugin_site(tmp_path_factory) -> Path:
    """The entry-point plugin package, pip-installed into a --target folder."""
    root = tmp_path_factory.mktemp("mylm")
    pkg = root / "mylm-plugin"
    (pkg / "mylm_plugin").mkdir(parents=True)
    (pkg / "pyproject.toml").write_text(PLUGIN_PYPROJECT)
    (pkg / "mylm_plugin" / "__init__.py").write_text(PLUGIN_INIT)
    (pkg / "mylm_plugin" / "lazy_model.py").write_text(SUBCLASS.format(name="MyLazyLlama"))
    (pkg / "mylm_plugin" / "eager_model.py").write_text(SUBCLASS.format(name="MyEagerLlama"))
    target = root / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index",
         "--no-build-isolation", "--disable-pip-version-check", "--target", str(target),
         str(pkg)],
        check=True, capture_output=True, text=True,
    )
    return target


@pytest.fixture(scope="module")
def models(make_hf_model, tmp_path_factory) -> dict[str, Path]:
    base = make_hf_model("llama")
    root = tmp_path_factory.mktemp("plugin-models")
    return {
        "base": base,
        "lazy": _model_with_arch(base, root / "lazy", "MyLazyLlama"),
        "eager": _model_with_arch(base, root / "eager", "MyEagerLlama"),
        "manifest": _model_with_arch(base, root / "manifest", "ManifestLlama"),
    }


def test_entry_point_plugin_registers_lazy_and_eager_architectures(plugin_site, models):
    proc = subprocess.run(
        [sys.executable, "-c", CHECK_SCRIPT,
         str(models["base"]), str(models["lazy"]), str(models["eager"])],
        capture_output=True, text=True, timeout=180,
        env=subprocess_env(PYTHONPATH=str(plugin_site)),
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result == {
        "archs": ["MyEagerLlama", "MyLazyLlama"],
        "lazy_imported_at_start": False,
        "lazy_imported_before_its_model": False,
        "lazy_same_tokens": True,
        "lazy_imported_after_its_model": True,
        "eager_same_tokens": True,
    }


def test_empty_engine_plugins_makes_the_architecture_unsupported(plugin_site, models):
    proc = subprocess.run(
        [sys.executable, "-m", "engine", "generate", "--model", str(models["lazy"]),
         "--prompt", "x", "--max-tokens", "2"],
        capture_output=True, text=True, timeout=120,
        env=subprocess_env(PYTHONPATH=str(plugin_site), ENGINE_PLUGINS=""),
    )
    assert proc.returncode == 1
    assert "MyLazyLlama" in proc.stderr and "are not supported" in proc.stderr


def test_manifest_only_plugin_in_a_plugin_dir_registers_an_architecture(tmp_path, models):
    plugin_dir = tmp_path / "plugins"
    plugin_dir.mkdir()
    (plugin_dir / "manifest-arch.toml").write_text(MANIFEST)
    (plugin_dir / "manifest_arch_plugin.py").write_text(MANIFEST_PLUGIN)
    (plugin_dir / "manifest_arch_models.py").write_text(SUBCLASS.format(name="ManifestLlama"))
    args = ["generate", "--model", str(models["manifest"]), "--prompt", "def",
            "--max-tokens", "4", "--ignore-eos", "--json"]
    proc = subprocess.run(
        [sys.executable, "-m", "engine", "--plugin-dir", str(plugin_dir), *args],
        capture_output=True, text=True, timeout=120, env=subprocess_env(),
    )
    assert proc.returncode == 0, proc.stderr
    (row,) = json.loads(proc.stdout)
    assert len(row["token_ids"]) == 4
