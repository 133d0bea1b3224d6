"""Llama-family decoder: serves Llama, Qwen2 and Mistral-style configs.

GQA, RoPE (with the scaling variants of `engine.ops.RotaryEmbedding`), RMSNorm,
SwiGLU, tied or untied embeddings, optional attention bias (Qwen2: on q/k/v only).
The q/k/v and gate/up projections are fused into single matmuls; `load_weights`
stacks the checkpoint's separate tensors into them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from engine.attention import Attention, AttentionMetadata
from engine.config import EngineConfig
from engine.kernels import LINEAR_GGML_PARTS, portable_forced
from engine.models.utils import load_stacked_weights
from engine.ops import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    ParallelLMHead,
    QKVParallelLinear,
    RMSNorm,
    RotaryEmbedding,
    RowParallelLinear,
    SiluAndMul,
    VocabParallelEmbedding,
    rope_parameters_from_hf,
)
from engine.ops.fast_path import HookWatch, fast_path_key, fast_path_mode
from engine.ops.linear import divide, fast_linear_fn, fast_linear_kernel, tp_world_size_and_rank
from engine.quantization import one_row_per_sequence

logger = logging.getLogger(__name__)


@dataclass
class LlamaArchConfig:
    """The fields of a Llama/Qwen2/Mistral ``config.json`` this model reads."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    partial_rotary_factor: float
    tie_word_embeddings: bool
    qkv_bias: bool
    o_proj_bias: bool
    mlp_bias: bool

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> LlamaArchConfig:
        """Parse a config.json dict. Raises ValueError naming a missing or
        unsupported field."""
        try:
            hidden = int(hf["hidden_size"])
            heads = int(hf["num_attention_heads"])
            fields = dict(
                vocab_size=int(hf["vocab_size"]),
                intermediate_size=int(hf["intermediate_size"]),
                num_hidden_layers=int(hf["num_hidden_layers"]),
            )
        except KeyError as e:
            raise ValueError(f"config.json lacks the field {e.args[0]!r}") from None
        act = hf.get("hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise ValueError(f"config.json: hidden_act {act!r} is not supported (only 'silu')")
        theta, scaling = rope_parameters_from_hf(hf)
        is_qwen2 = hf.get("model_type") == "qwen2"
        attention_bias = bool(hf.get("attention_bias", False))
        return cls(
            hidden_size=hidden,
            num_attention_heads=heads,
            num_key_value_heads=int(hf.get("num_key_value_heads") or heads),
            head_dim=int(hf.get("head_dim") or hidden // heads),
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
            rope_theta=theta,
            rope_scaling=scaling,
            partial_rotary_factor=float((hf.get("rope_parameters") or {}).get(
                "partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=attention_bias or is_qwen2,
            o_proj_bias=attention_bias and not is_qwen2,
            mlp_bias=bool(hf.get("mlp_bias", False)),
            **fields,
        )


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _sliding_window(hf: dict[str, Any]) -> int | None:
    if hf.get("model_type") == "qwen2" and not hf.get("use_sliding_window", False):
        return None
    return hf.get("sliding_window")


class LlamaMLP(nn.Module):
    def __init__(self, cfg: LlamaArchConfig, prefix: str = "") -> None:
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(
            cfg.hidden_size, [cfg.intermediate_size] * 2, bias=cfg.mlp_bias,
            prefix=f"{prefix}.gate_up_proj", gated_activation=True)
        self.down_proj = RowParallelLinear(cfg.intermediate_size, cfg.hidden_size,
                                           bias=cfg.mlp_bias, prefix=f"{prefix}.down_proj")
        self.act_fn = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.gate_up_proj.silu_and_mul(x, self.act_fn))


class LlamaAttention(nn.Module):
    def __init__(self, cfg: LlamaArchConfig, rotary_emb: RotaryEmbedding,
                 prefix: str = "") -> None:
        super().__init__()
        tp_size, _ = tp_world_size_and_rank()
        self.head_dim = cfg.head_dim
        self.qkv_proj = QKVParallelLinear(
            cfg.hidden_size, cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads,
            bias=cfg.qkv_bias, prefix=f"{prefix}.qkv_proj")
        self.num_heads = self.qkv_proj.num_heads  # per rank
        self.num_kv_heads = self.qkv_proj.num_kv_heads
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.o_proj = RowParallelLinear(
            cfg.num_attention_heads * cfg.head_dim, cfg.hidden_size, bias=cfg.o_proj_bias,
            prefix=f"{prefix}.o_proj")
        divide(cfg.num_attention_heads, tp_size, "number of attention heads")
        self.rotary_emb = rotary_emb  # shared by every layer
        self.attn = Attention(self.num_heads, self.head_dim, self.head_dim**-0.5,
                              self.num_kv_heads, prefix=f"{prefix}.attn")

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor,
                attn_metadata: AttentionMetadata) -> torch.Tensor:
        qkv = self.qkv_proj(hidden_states)  # [T, (H + 2 Hkv) * D]
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q, k = self.rotary_emb(positions, q, k)
        return self.o_proj(self.attn(q, k, v, attn_metadata))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: LlamaArchConfig, rotary_emb: RotaryEmbedding,
                 prefix: str = "") -> None:
        super().__init__()
        self.self_attn = LlamaAttention(cfg, rotary_emb, prefix=f"{prefix}.self_attn")
        self.mlp = LlamaMLP(cfg, prefix=f"{prefix}.mlp")
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor,
                residual: torch.Tensor | None,
                attn_metadata: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        # the residual add is fused into the next norm: (normed, x + residual)
        if residual is None:
            residual = hidden_states
            hidden_states = self.input_layernorm(hidden_states)
        else:
            hidden_states, residual = self.input_layernorm(hidden_states, residual)
        hidden_states = self.self_attn(positions, hidden_states, attn_metadata)
        hidden_states, residual = self.post_attention_layernorm(hidden_states, residual)
        return self.mlp(hidden_states), residual

    def fast_fn(self, dtype: torch.dtype) -> _LayerFn:
        """`forward` from its ops' fast forms (engine.ops.fast_path); an op without
        one, or an input its fast form does not take, runs the op's own forward
        (no module call: the model checks for hooks before it takes the fast path)."""
        attn, mlp = self.self_attn, self.mlp
        sizes = [attn.q_size, attn.kv_size, attn.kv_size]
        norm_in = _norm_fn(self.input_layernorm, dtype)
        norm_post = _norm_fn(self.post_attention_layernorm, dtype)
        qkv = _linear_fn(attn.qkv_proj, dtype)
        o_proj = _linear_fn(attn.o_proj, dtype)
        down = _linear_fn(mlp.down_proj, dtype)
        rotary = attn.rotary_emb.fast_fn(dtype) or attn.rotary_emb.forward
        attend = attn.attn.fast_fn()
        attn_forward = attn.attn.forward
        gate_up, gate_up_module = fast_linear_fn(mlp.gate_up_proj, dtype), mlp.gate_up_proj
        act = mlp.act_fn.fast_fn(dtype) or mlp.act_fn.forward
        act_module = mlp.act_fn

        def run(positions: torch.Tensor, hidden_states: torch.Tensor,
                residual: torch.Tensor | None,
                md: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
            x, residual = norm_in(hidden_states, residual)
            q, k, v = qkv(x).split(sizes, dim=-1)
            q, k = rotary(positions, q, k)
            out = attend(q, k, v, md) if attend is not None else None
            if out is None:
                out = attn_forward(q, k, v, md)
            x, residual = norm_post(o_proj(out), residual)
            gated = gate_up(x) if gate_up is not None else None
            # as LlamaMLP: the fused SiLU-and-mul path for what the few-row kernels
            # do not take (prompt rows)
            mlp_in = (act(gated) if gated is not None
                      else gate_up_module.silu_and_mul(x, act_module))
            return down(mlp_in), residual

        return run


def _norm_fn(norm: RMSNorm, dtype: torch.dtype) -> Callable[
        [torch.Tensor, torch.Tensor | None], tuple[torch.Tensor, torch.Tensor]]:
    """`norm`'s fast form, else its forward with the layer's residual convention."""
    fast = norm.fast_fn(dtype)
    if fast is not None:
        return fast

    def run(x: torch.Tensor,
            residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            return norm.forward(x), x
        return norm.forward(x, residual)

    return run


def _linear_fn(layer: ColumnParallelLinear | RowParallelLinear,
               dtype: torch.dtype) -> Callable[[torch.Tensor], torch.Tensor]:
    """`layer`'s fast form, falling back to its forward for the rows it does not take."""
    fast = fast_linear_fn(layer, dtype)
    forward = layer.forward
    if fast is None:
        return forward

    def run(x: torch.Tensor) -> torch.Tensor:
        out = fast(x)
        return forward(x) if out is None else out

    return run


class LlamaModel(nn.Module):
    def __init__(self, cfg: LlamaArchConfig, max_position: int, prefix: str = "model") -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size,
                                                   prefix=f"{prefix}.embed_tokens")
        rotary_emb = RotaryEmbedding(
            cfg.head_dim, int(cfg.head_dim * cfg.partial_rotary_factor), max_position,
            cfg.rope_theta, cfg.rope_scaling)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(cfg, rotary_emb, prefix=f"{prefix}.layers.{i}")
            for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        # the layers' fast path (engine.ops.fast_path): built at the first step
        self.fast_path: _FastPath | None = None

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                attn_metadata: AttentionMetadata) -> torch.Tensor:
        hidden_states = self.embed_tokens(input_ids)
        residual = None
        fast = self._fast_path(positions, hidden_states.dtype)
        if fast is None:
            for layer in self.layers:
                hidden_states, residual = layer(positions, hidden_states, residual, attn_metadata)
        else:
            path, rotary, one_call = fast
            rotary.cover(positions)  # once for every layer
            decoded = (path.decode_layers(positions, hidden_states, attn_metadata)
                       if one_call else None)
            if decoded is not None:
                hidden_states, residual = decoded
            else:
                for run in path.layers:
                    hidden_states, residual = run(positions, hidden_states, residual,
                                                  attn_metadata)
        hidden_states, _ = self.norm(hidden_states, residual)
        return hidden_states

    def _fast_path(self, positions: torch.Tensor,
                   dtype: torch.dtype) -> tuple[_FastPath, RotaryEmbedding, bool] | None:
        """This step's fast path, built or rebuilt as needed, its layers' shared
        rotary op, and whether its decode steps may run as one call
        (``ENGINE_FAST_PATH=1``, not ``ops``); None when the step must run through
        the modules (see engine.ops.fast_path)."""
        mode = fast_path_mode()
        if (positions.dtype != torch.int64 or positions.dim() != 1
                or torch.compiler.is_compiling() or mode == "0"):
            return None
        fast, key = self.fast_path, (dtype, *fast_path_key())
        if fast is None or fast.key != key:
            fast = self.fast_path = _FastPath.build(self, dtype, key)
        if fast.rotary is None or fast.hooks():
            return None
        return fast, fast.rotary, mode == "1"


_LayerFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None, AttentionMetadata],
                    tuple[torch.Tensor, torch.Tensor]]


@dataclass
class _FastPath:
    """A `LlamaModel`'s decoder layers as fast forms (`LlamaDecoderLayer.fast_fn`);
    ``rotary=None`` where the model's structure is not the one they reproduce (a
    subclass's layers), and its steps run through the modules."""

    key: tuple[Any, ...]  # the activations' dtype, then `fast_path_key()`
    layers: list[_LayerFn]
    hooks: HookWatch  # on every module the layers' fast forms stand for
    rotary: RotaryEmbedding | None  # shared by every layer
    decoders: list[LlamaDecoderLayer] = field(default_factory=list)
    # engine_kernels::decode_layers' arguments by row count and whether the step
    # is of decode rows only (None: not that op's)
    programs: dict[tuple[int, bool], _DecodeProgram | None] = field(default_factory=dict)

    def decode_layers(self, positions: torch.Tensor, hidden_states: torch.Tensor,
                      md: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Every layer of a decode step in one ``engine_kernels::decode_layers`` call
        (the calls of the layers' fast forms, made from C++: bit for bit the same
        step without the Python between ~10 kernels a layer); None for a step it
        does not take (a prompt row, a row count or weight the fast forms hand back
        to their modules, another attention backend), which the layers then run."""
        rows = hidden_states.shape[0]
        # quantized layers take more rows whole in a step the model runner says
        # is of decode rows only (engine.quantization.step_rows)
        key = (rows, one_row_per_sequence())
        program = self.programs.get(key, _UNBUILT)
        if program is _UNBUILT:
            program = self.programs[key] = _DecodeProgram.build(self, rows)
        if program is None:
            return None
        attention = program.attention
        first = attention[0]
        if first.kv_cache.dtype != hidden_states.dtype:  # the fast forms' cache write would not take it
            return None
        decode = first.impl.decode_kernel_rows(first.kv_cache, md)
        if decode is None or decode.shape[0] != rows:
            return None
        hidden, residual = torch.ops.engine_kernels.decode_layers(
            hidden_states, positions, program.tensors, program.ints, program.floats,
            [layer.kv_cache for layer in attention], program.rotary.cos_sin_cache,
            md.slot_mapping, md.block_tables, md.seq_lens_tensor, md.query_start_loc, decode)
        return hidden, residual

    @classmethod
    def build(cls, model: LlamaModel, dtype: torch.dtype, key: tuple[Any, ...]) -> _FastPath:
        layers = [layer for layer in model.layers if isinstance(layer, LlamaDecoderLayer)]
        rotary = layers[0].self_attn.rotary_emb if layers else None
        expected = len(layers) == len(model.layers) and all(
            type(layer) is LlamaDecoderLayer and type(layer.self_attn) is LlamaAttention
            and type(layer.mlp) is LlamaMLP
            and layer.self_attn.rotary_emb is rotary  # one `cover` for every layer
            for layer in layers)
        if not expected or rotary is None:
            return cls(key, [], HookWatch([]), None)
        hooks = HookWatch(m for layer in layers for m in layer.modules())
        return cls(key, [layer.fast_fn(dtype) for layer in layers], hooks, rotary, layers)


_UNBUILT: Any = object()


@dataclass
class _DecodeProgram:
    """``engine_kernels::decode_layers``' arguments for decode steps of one row
    count, fixed while the fast path stands (decode_layers.cpp says their layout);
    the caches are read from their layers at every step."""

    tensors: list[torch.Tensor | None]
    ints: list[int]
    floats: list[float]
    attention: list[Attention]
    rotary: RotaryEmbedding  # its table is read at every step (`cover` may grow it)

    @classmethod
    def build(cls, fast: _FastPath, rows: int) -> _DecodeProgram | None:
        """None where some layer's step for `rows` rows is not the op's: an op
        without its fast form, a product its fast form hands back to the layer or
        makes with another kernel, a backend other than the built-in one."""
        dtype, layers, rotary = fast.key[0], fast.decoders, fast.rotary
        if not layers or rotary is None or rotary.fast_fn(dtype) is None:
            return None
        first = layers[0].self_attn
        shape = (first.q_size, first.kv_size, first.num_heads, first.num_kv_heads,
                 first.head_dim)
        ints = [len(layers), *shape, int(portable_forced())]
        floats: list[float] = []
        tensors: list[torch.Tensor | None] = []
        # the parts of the linears made of several (LINEAR_GGML_PARTS), after the layers'
        part_ints: list[int] = []
        part_tensors: list[torch.Tensor | None] = []
        for layer in layers:
            attn, mlp = layer.self_attn, layer.mlp
            norms = (layer.input_layernorm, layer.post_attention_layernorm)
            if (attn.attn.fast_fn() is None or mlp.act_fn.fast_fn(dtype) is None
                    or any(norm.fast_fn(dtype) is None for norm in norms)
                    or (attn.q_size, attn.kv_size, attn.num_heads, attn.num_kv_heads,
                        attn.head_dim) != shape):
                return None
            scale = attn.attn.impl.scale  # the built-in backend's (its fast form exists)
            if not floats:
                floats.append(scale)
            elif scale != floats[0]:
                return None
            tensors += [norm.weight for norm in norms]
            floats += [norm.variance_epsilon for norm in norms]
            for linear in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj):
                kernel = fast_linear_kernel(linear, dtype, rows, gated=linear is mlp.gate_up_proj)
                if kernel is None:
                    return None
                kernel_ints, kernel_tensors = kernel
                if kernel_ints[0] == LINEAR_GGML_PARTS:
                    count = kernel_ints[3]
                    ints += [LINEAR_GGML_PARTS, kernel_ints[1], len(part_ints) // 5, count, 0]
                    tensors += [None, None]
                    part_ints += kernel_ints[5:]
                    part_tensors += kernel_tensors
                else:
                    ints += kernel_ints
                    tensors += kernel_tensors
        return cls(tensors + part_tensors, ints + part_ints, floats,
                   [layer.self_attn.attn for layer in layers], rotary)


class LlamaForCausalLM(nn.Module):
    """A causal LM for Llama, Qwen2 and Mistral configs.

    ``LlamaForCausalLM(config=EngineConfig)`` (the HF config dict is
    ``config.model_config.hf_config``; a bare dict is accepted too).
    ``forward(input_ids [T], positions [T], attn_metadata) -> hidden [T, H]``,
    ``compute_logits(hidden [n, H]) -> [n, vocab]``,
    ``load_weights(iterable of (name, tensor)) -> set of loaded parameter names``."""

    # our fused parameter <- the checkpoint's separate tensors
    stacked_params = (
        (".qkv_proj.", ".q_proj.", "q"),
        (".qkv_proj.", ".k_proj.", "k"),
        (".qkv_proj.", ".v_proj.", "v"),
        (".gate_up_proj.", ".gate_proj.", 0),
        (".gate_up_proj.", ".up_proj.", 1),
    )

    def __init__(self, config: EngineConfig | dict[str, Any], prefix: str = "") -> None:
        super().__init__()
        if isinstance(config, EngineConfig):
            hf = config.model_config.hf_config
            max_model_len = config.model_config.max_model_len
        else:
            hf, max_model_len = config, None
        self.config = cfg = LlamaArchConfig.from_hf(hf)
        window = _sliding_window(hf)
        if window is not None:
            logger.warning("sliding_window=%s is not applied: outputs for contexts longer "
                           "than the window differ from the reference model", window)
        self.model = LlamaModel(cfg, max_model_len or cfg.max_position_embeddings,
                                prefix=_join(prefix, "model"))
        self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.hidden_size,
                                      prefix=_join(prefix, "lm_head"))
        if cfg.tie_word_embeddings:
            self.lm_head.tie_weights(self.model.embed_tokens)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                attn_metadata: AttentionMetadata) -> torch.Tensor:
        return self.model(input_ids, positions, attn_metadata)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.lm_head.compute_logits(hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        tied = self.config.tie_word_embeddings

        def rename(name: str) -> str | None:
            if "rotary_emb.inv_freq" in name or (tied and name.startswith("lm_head.")):
                return None
            return name

        return load_stacked_weights(self, weights, self.stacked_params, rename)
