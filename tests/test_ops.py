"""Custom ops: numerics against transformers, platform dispatch, custom_ops toggles
and out-of-tree replacement in its three forms."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import subprocess_env

from engine.config import CompilationConfig, EngineConfig, ModelConfig, set_current_engine_config
from engine.ops import CustomOp, RMSNorm, RotaryEmbedding, SiluAndMul, rope_parameters_from_hf
from engine.ops.rotary_embedding import INITIAL_TABLE_POSITIONS


@pytest.fixture(autouse=True)
def _restore_oot_registry():
    saved = dict(CustomOp.op_registry_oot)
    yield
    CustomOp.op_registry_oot.clear()
    CustomOp.op_registry_oot.update(saved)


def _config(*custom_ops: str) -> EngineConfig:
    return EngineConfig(ModelConfig(model="unused"),
                        compilation_config=CompilationConfig(custom_ops=list(custom_ops)))


def _forward_name(op: CustomOp) -> str:
    return op._forward_method.__func__.__name__


def test_rms_norm_matches_transformers_and_fuses_the_residual_add():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    x, res = torch.randn(5, 16), torch.randn(5, 16)
    ours, ref = RMSNorm(16, eps=1e-5), LlamaRMSNorm(16, eps=1e-5)
    with torch.no_grad():
        ref.weight.copy_(torch.randn(16))
        ours.weight.copy_(ref.weight)
    torch.testing.assert_close(ours(x), ref(x))
    out, new_res = ours(x, res)
    torch.testing.assert_close(new_res, x + res)
    torch.testing.assert_close(out, ref(x + res))


def test_silu_and_mul_gates_the_second_half():
    x = torch.randn(3, 8)
    torch.testing.assert_close(SiluAndMul()(x), torch.nn.functional.silu(x[:, :4]) * x[:, 4:])


@pytest.mark.parametrize("rope", [
    {"rope_theta": 10000.0, "rope_type": "default"},
    {"rope_theta": 500000.0, "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
     "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
    {"rope_theta": 10000.0, "rope_type": "linear", "factor": 4.0},
])
def test_rotary_embedding_matches_transformers(rope):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    hf_config = LlamaConfig(hidden_size=64, num_attention_heads=4, rope_parameters=rope,
                            max_position_embeddings=256)
    theta, scaling = rope_parameters_from_hf(hf_config.to_dict())
    ours = RotaryEmbedding(16, 16, 256, theta, scaling)
    positions = torch.tensor([0, 1, 7, 100, 255])
    q, k = torch.randn(5, 4 * 16), torch.randn(5, 2 * 16)
    cos, sin = LlamaRotaryEmbedding(hf_config)(q, positions[None])
    ref_q, ref_k = apply_rotary_pos_emb(q.view(1, 5, 4, 16).transpose(1, 2),
                                        k.view(1, 5, 2, 16).transpose(1, 2), cos, sin)
    out_q, out_k = ours(positions, q, k)
    torch.testing.assert_close(out_q, ref_q.transpose(1, 2).reshape(5, 64))
    torch.testing.assert_close(out_k, ref_k.transpose(1, 2).reshape(5, 32))


def _neox_rope(x: torch.Tensor, positions: torch.Tensor, head_size: int,
               base: float = 10000.0) -> torch.Tensor:
    # RoPE written out from its definition, float32 angles as the op computes them
    inv_freq = 1.0 / (base ** (torch.arange(0, head_size, 2).float() / head_size))
    angles = torch.outer(positions.float(), inv_freq).unsqueeze(1)
    x = x.view(len(positions), -1, head_size)
    x1, x2 = x.chunk(2, dim=-1)
    out = torch.cat([x1 * angles.cos() - x2 * angles.sin(),
                     x2 * angles.cos() + x1 * angles.sin()], dim=-1)
    return out.reshape(len(positions), -1)


@pytest.mark.parametrize("custom_ops", [["none"], ["all"]])
def test_rotary_table_holds_only_the_positions_used_and_grows_for_later_ones(custom_ops):
    # a 300k-position context: its whole table would be 300000 x 16 floats per model
    with set_current_engine_config(_config(*custom_ops)):
        op = RotaryEmbedding(16, 16, 300_000)
    assert op.cos_sin_cache.shape[0] == INITIAL_TABLE_POSITIONS
    q, k = torch.randn(4, 4 * 16), torch.randn(4, 2 * 16)
    for positions, rows in ((torch.tensor([0, 1, 7, 4095]), INITIAL_TABLE_POSITIONS),
                            (torch.tensor([5, 4096, 9000, 10_000]), 16_384),
                            (torch.tensor([299_999, 3, 200_000, 0]), 300_000)):
        out_q, out_k = op(positions, q, k)
        assert op.cos_sin_cache.shape[0] == rows
        torch.testing.assert_close(out_q, _neox_rope(q, positions, 16))
        torch.testing.assert_close(out_k, _neox_rope(k, positions, 16))
    with pytest.raises(IndexError, match="position 300000 .*max_position=300000"):
        op(torch.tensor([300_000]), q[:1], k[:1])


def test_unsupported_rope_type_names_the_valid_ones():
    with pytest.raises(ValueError, match="'yarn' is not supported.*default, linear, llama3"):
        RotaryEmbedding(16, 16, 32, 10000.0, {"rope_type": "yarn", "factor": 2.0})


def test_ops_dispatch_to_the_cpu_forward_on_the_cpu_platform():
    with set_current_engine_config(_config("all")):
        assert _forward_name(RMSNorm(8)) == "forward_cpu"
    assert _forward_name(SiluAndMul()) == "forward_cpu"  # no config: everything on


@pytest.mark.parametrize("toggles, rms, silu", [
    (["none"], "forward_native", "forward_native"),
    (["none", "+rms_norm"], "forward_cpu", "forward_native"),
    (["all", "-silu_and_mul"], "forward_cpu", "forward_native"),
    (["-rms_norm", "+rms_norm"], "forward_cpu", "forward_cpu"),
])
def test_custom_ops_toggles_choose_native_or_platform_forward(toggles, rms, silu):
    with set_current_engine_config(_config(*toggles)):
        assert (_forward_name(RMSNorm(8)), _forward_name(SiluAndMul())) == (rms, silu)


def test_register_oot_as_bare_decorator_replaces_the_op_everywhere():
    @RMSNorm.register_oot
    class MyNorm(RMSNorm):
        def forward_cpu(self, x, residual=None):
            return torch.full_like(x, 7.0)

    op = RMSNorm(4, eps=1e-3)
    assert type(op) is MyNorm and op.variance_epsilon == 1e-3
    assert torch.equal(op(torch.ones(2, 4)), torch.full((2, 4), 7.0))


def test_register_oot_with_parentheses():
    @SiluAndMul.register_oot()
    class MySilu(SiluAndMul):
        pass

    assert type(SiluAndMul()) is MySilu


def test_register_oot_by_name_with_a_class_that_is_not_a_subclass():
    class StandaloneRope(CustomOp):
        def __init__(self, head_size, rotary_dim, max_position, base=10000.0, rope_scaling=None):
            super().__init__()
            self.args = (head_size, rotary_dim, max_position, base)

        def forward_native(self, positions, query, key):
            return query, key

    CustomOp.register_oot(_decorated_op_cls=StandaloneRope, name="RotaryEmbedding")
    op = RotaryEmbedding(16, 16, 32, 5.0)
    assert type(op) is StandaloneRope and op.args == (16, 16, 32, 5.0)


def test_register_oot_for_an_unknown_op_lists_the_known_ones():
    with pytest.raises(ValueError, match="Unknown custom op: 'Nope'.*RMSNorm"):
        CustomOp.register_oot(_decorated_op_cls=SiluAndMul, name="Nope")


PLATFORM_PLUGIN = '''
from engine.platforms import CpuPlatform, PlatformEnum


class AcmePlatform(CpuPlatform):
    _enum = PlatformEnum.OOT
    device_name = "acme"


def detect():
    return "acme_ops.AcmePlatform"


def register_ops():
    from engine.ops import RMSNorm

    @RMSNorm.register_oot
    class AcmeRMSNorm(RMSNorm):
        """Acme's norm kernel would go here."""
'''

MANIFEST = '''
schema-version = 1
[package]
name = "acme-ops"
path = "."
[[plugin]]
group = "platform"
name = "acme"
value = "acme_ops:detect"
[[plugin]]
group = "general"
name = "acme_ops"
value = "acme_ops:register_ops"
'''

SCRIPT = '''
import json, registry
registry.load_general_plugins()
from engine.config import EngineConfig, ModelConfig
from engine.model_loader import load_model
from engine.ops import RMSNorm, SiluAndMul
model = load_model(EngineConfig(ModelConfig(model=MODEL_DIR)))
norm = model.model.norm
print(json.dumps({"norm": type(norm).__name__, "norm_forward": norm._forward_method.__name__,
                  "silu_forward": SiluAndMul()._forward_method.__name__}))
'''


def test_out_of_tree_platform_and_op_plugin_take_effect_in_a_real_model(tmp_path, make_hf_model):
    plugin_dir = tmp_path / "plugins"
    plugin_dir.mkdir()
    (plugin_dir / "acme_ops.py").write_text(textwrap.dedent(PLATFORM_PLUGIN))
    (plugin_dir / "acme.toml").write_text(MANIFEST)
    model_dir = make_hf_model("llama")
    script = SCRIPT.replace("MODEL_DIR", repr(str(model_dir)))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=subprocess_env(ENGINE_PLUGIN_DIRS=str(plugin_dir)), timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {
        "norm": "AcmeRMSNorm", "norm_forward": "forward_oot", "silu_forward": "forward_oot"}
