"""load_model: HF folders (single and sharded safetensors) and clear errors that
name the file and the tensor."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine.config import EngineConfig, ModelConfig
from engine.model_loader import load_hf_config, load_model
from engine.models import register_builtin_models


@pytest.fixture(autouse=True, scope="module")
def _setup():
    torch.set_num_threads(1)
    register_builtin_models()


@pytest.fixture
def model_copy(make_hf_model, tmp_path):
    out = tmp_path / "model"
    shutil.copytree(make_hf_model("llama"), out)
    return out


def _load(model_dir, **model_kwargs):
    return load_model(EngineConfig(ModelConfig(model=str(model_dir), **model_kwargs)))


def _rewrite_weights(model_dir, change):
    path = model_dir / "model.safetensors"
    tensors = load_file(str(path))
    change(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})
    return path


def test_loads_in_eval_mode_float32_without_grad(model_copy):
    model = _load(model_copy, dtype="float32")  # "auto" may pick bfloat16 on this CPU
    assert not model.training
    assert all(p.dtype == torch.float32 and not p.requires_grad for p in model.parameters())


def test_explicit_dtype_is_used(model_copy):
    assert next(_load(model_copy, dtype="bfloat16").parameters()).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="dtype 'int8' is not supported"):
        _load(model_copy, dtype="int8")


def test_sharded_checkpoint_loads_the_same_weights(model_copy, tmp_path):
    tensors = load_file(str(model_copy / "model.safetensors"))
    sharded = tmp_path / "sharded"
    shutil.copytree(model_copy, sharded)
    (sharded / "model.safetensors").unlink()
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2],
              "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for file, part in shards.items():
        save_file({n: tensors[n] for n in part}, str(sharded / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, file))
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    one, two = _load(model_copy), _load(sharded)
    for (name, a), (_, b) in zip(one.state_dict().items(), two.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    (sharded / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model-00002-of-00002.safetensors: missing; "
                                                "it is named in .*index.json"):
        _load(sharded)


def test_missing_folder_or_config_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        _load(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=r"config.json: missing"):
        _load(tmp_path)


def test_invalid_config_json_names_the_file(model_copy):
    (model_copy / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"config.json: cannot read it as JSON"):
        load_hf_config(model_copy)


def test_unknown_architecture_is_not_supported(model_copy):
    config = json.loads((model_copy / "config.json").read_text())
    config["architectures"] = ["FancyForCausalLM"]
    (model_copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"\['FancyForCausalLM'\] are not supported"):
        _load(model_copy)


def test_missing_weights_file_names_the_folder(model_copy):
    (model_copy / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no \\*.safetensors weight files"):
        _load(model_copy)


def test_unreadable_weights_file_names_it(model_copy):
    (model_copy / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match=r"model.safetensors: cannot read safetensors file"):
        _load(model_copy)


def test_missing_tensor_is_named(model_copy):
    _rewrite_weights(model_copy, lambda t: t.pop("model.layers.1.self_attn.k_proj.weight"))
    with pytest.raises(ValueError, match=r"missing tensor\(s\) in the checkpoint: "
                                         r"'model.layers.1.self_attn.k_proj.weight'"):
        _load(model_copy)


def test_unexpected_tensor_names_file_and_tensor(model_copy):
    _rewrite_weights(model_copy, lambda t: t.update({"model.extra.weight": torch.zeros(2)}))
    with pytest.raises(ValueError, match=r"model.safetensors: unexpected tensor 'model.extra.weight'"):
        _load(model_copy)


def test_shape_mismatch_names_file_tensor_and_shapes(model_copy):
    def shrink(t):
        t["model.layers.0.mlp.up_proj.weight"] = t["model.layers.0.mlp.up_proj.weight"][:100]

    _rewrite_weights(model_copy, shrink)
    with pytest.raises(ValueError, match=r"model.safetensors: tensor 'model.layers.0.mlp.up_proj.weight':"
                                         r" shape mismatch: checkpoint tensor has shape \[100, 64\]"):
        _load(model_copy)


def test_tied_checkpoint_with_a_saved_lm_head_loads(make_hf_model, tmp_path):
    out = tmp_path / "tied"
    shutil.copytree(make_hf_model("llama", tie_word_embeddings=True), out)
    def add_head(t):
        t["lm_head.weight"] = t["model.embed_tokens.weight"].clone()

    _rewrite_weights(out, add_head)
    model = _load(out)
    assert model.lm_head.weight is model.model.embed_tokens.weight
