"""ModelRegistry: eager and lazy registration, errors, and the built-in entries."""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest
from conftest import subprocess_env

from engine.models import ModelRegistry, register_builtin_models


@pytest.fixture(autouse=True)
def _restore_registry():
    saved = dict(ModelRegistry._models)
    yield
    ModelRegistry._models.clear()
    ModelRegistry._models.update(saved)


@pytest.fixture
def lazy_module(tmp_path, monkeypatch):
    """An importable module `lazy_arch_mod` with a class `LazyModel`, not imported yet."""
    (tmp_path / "lazy_arch_mod.py").write_text("class LazyModel:\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("lazy_arch_mod", None)
    yield "lazy_arch_mod"
    sys.modules.pop("lazy_arch_mod", None)


def test_lazy_string_is_not_imported_until_its_architecture_is_resolved(lazy_module):
    ModelRegistry.register_model("LazyArch", f"{lazy_module}:LazyModel")
    assert "LazyArch" in ModelRegistry.get_supported_archs()
    assert lazy_module not in sys.modules
    cls = ModelRegistry.resolve("LazyArch")
    assert cls.__name__ == "LazyModel" and lazy_module in sys.modules


def test_eager_class_is_returned_as_is():
    class Eager:
        pass

    ModelRegistry.register_model("EagerArch", Eager)
    assert ModelRegistry.load_model_cls(["Missing", "EagerArch"]) == (Eager, "EagerArch")


@pytest.mark.parametrize("bad", ["no_colon_here", "mod:", ":Cls", "bad mod:Cls", "m:C:D", 42])
def test_malformed_model_value_is_a_value_error(bad):
    with pytest.raises(ValueError, match="must be a class or a 'module:Class' string"):
        ModelRegistry.register_model("BadArch", bad)


def test_unknown_architecture_lists_the_supported_ones():
    register_builtin_models()
    with pytest.raises(ValueError, match=r"\['NopeForCausalLM'\] are not supported.*"
                                         r"LlamaForCausalLM.*Qwen2ForCausalLM"):
        ModelRegistry.load_model_cls(["NopeForCausalLM"])


def test_lazy_entry_that_cannot_be_imported_names_the_architecture():
    ModelRegistry.register_model("GhostArch", "no_such_module_xyz:Model")
    with pytest.raises(ImportError, match="'GhostArch' is registered as 'no_such_module_xyz:Model'"):
        ModelRegistry.resolve("GhostArch")


def test_re_registering_replaces_and_logs_at_info(caplog):
    ModelRegistry.register_model("TwiceArch", "a.b:C")
    with caplog.at_level(logging.INFO, logger="engine.models.registry"):
        ModelRegistry.register_model("TwiceArch", "d.e:F")
    assert ModelRegistry._models["TwiceArch"].value == "d.e:F"
    assert "'d.e:F' replaces 'a.b:C'" in caplog.text


def test_builtin_registration_is_lazy_re_entrant_and_keeps_a_plugins_choice():
    class PluginLlama:
        pass

    ModelRegistry._models.clear()
    ModelRegistry.register_model("LlamaForCausalLM", PluginLlama)
    register_builtin_models()
    register_builtin_models()
    assert ModelRegistry.resolve("LlamaForCausalLM") is PluginLlama
    assert ModelRegistry._models["Qwen2ForCausalLM"].value == "engine.models.llama:LlamaForCausalLM"
    assert ModelRegistry._models["BertModel"].value == "engine.models.bert:BertModel"


def test_importing_the_models_package_and_public_name_does_not_import_torch():
    code = ("import sys, engine, engine.models; engine.ModelRegistry.get_supported_archs(); "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=subprocess_env(), timeout=60)
    assert out.stdout.strip() == "False", out.stderr
