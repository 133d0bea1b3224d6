"""BERT-family encoder for sentence embeddings (serves all-MiniLM-L6-v2).

No KV cache: a batch of padded sequences goes through plain SDPA with a key
padding mask. Pooling and normalisation are `engine.pooling`'s, configured from
the model folder's sentence-transformers files.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from engine.config import EngineConfig
from engine.model_loader.pooling_config import PoolingConfig, load_pooling_config
from engine.models.utils import load_stacked_weights
from engine.ops import (
    ColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
)

_ACTIVATIONS = {
    "gelu": lambda x: F.gelu(x),
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


@dataclass
class BertArchConfig:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int
    type_vocab_size: int
    layer_norm_eps: float
    hidden_act: str
    pad_token_id: int

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> BertArchConfig:
        """Parse a BERT config.json dict. Raises ValueError naming a missing or
        unsupported field."""
        if hf.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError(f"config.json: position_embedding_type "
                             f"{hf['position_embedding_type']!r} is not supported (only 'absolute')")
        act = hf.get("hidden_act", "gelu")
        if act not in _ACTIVATIONS:
            raise ValueError(f"config.json: hidden_act {act!r} is not supported. "
                             f"Valid options are: {', '.join(_ACTIVATIONS)}")
        try:
            return cls(
                vocab_size=int(hf["vocab_size"]),
                hidden_size=int(hf["hidden_size"]),
                num_hidden_layers=int(hf["num_hidden_layers"]),
                num_attention_heads=int(hf["num_attention_heads"]),
                intermediate_size=int(hf["intermediate_size"]),
                max_position_embeddings=int(hf.get("max_position_embeddings", 512)),
                type_vocab_size=int(hf.get("type_vocab_size", 2)),
                layer_norm_eps=float(hf.get("layer_norm_eps", 1e-12)),
                hidden_act=act,
                pad_token_id=int(hf.get("pad_token_id") or 0),
            )
        except KeyError as e:
            raise ValueError(f"config.json lacks the field {e.args[0]!r}") from None


class BertEmbeddings(nn.Module):
    def __init__(self, cfg: BertArchConfig) -> None:
        super().__init__()
        self.word_embeddings = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.LayerNorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions)
        if token_type_ids is None:  # all segment 0: one row, broadcast
            x = x + self.token_type_embeddings.weight[0]
        else:
            x = x + self.token_type_embeddings(token_type_ids)
        return self.LayerNorm(x)


class _Packing:
    """Where the real tokens of a padded [B, L] batch sit. The encoder runs its
    per-token layers on the packed [N, H] real tokens only (padding is pure waste
    there) and pads just for attention."""

    def __init__(self, mask: torch.Tensor) -> None:
        self.batch, self.length = mask.shape
        self.full = bool(mask.all())
        self.rows = None if self.full else mask.reshape(-1).nonzero().squeeze(1)
        self.key_mask = None if self.full else mask[:, None, None, :]  # [B, 1, 1, L]

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """[B, L, F] -> [N, F]."""
        x = x.reshape(self.batch * self.length, -1)
        return x if self.rows is None else x.index_select(0, self.rows)

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        """[N, F] -> [B, L, F], zeros at padding."""
        if self.rows is not None:
            x = x.new_zeros(self.batch * self.length, x.shape[-1]).index_copy_(0, self.rows, x)
        return x.view(self.batch, self.length, -1)


class BertSelfAttention(nn.Module):
    def __init__(self, cfg: BertArchConfig) -> None:
        super().__init__()
        self.head_size = cfg.hidden_size // cfg.num_attention_heads
        self.qkv = QKVParallelLinear(cfg.hidden_size, self.head_size, cfg.num_attention_heads,
                                     cfg.num_attention_heads, bias=True)
        self.num_heads = self.qkv.num_heads  # per rank

    def forward(self, x: torch.Tensor, packing: _Packing) -> torch.Tensor:
        """x [N, H] packed tokens -> [N, heads * head_size]."""
        qkv = packing.unpack(self.qkv(x))  # [B, L, 3 * heads * D]
        batch, length, _ = qkv.shape
        q, k, v = qkv.view(batch, length, 3, self.num_heads, self.head_size).permute(
            2, 0, 3, 1, 4).unbind(0)  # each [B, heads, L, D]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=packing.key_mask)
        return packing.pack(out.transpose(1, 2))


class BertAttention(nn.Module):
    def __init__(self, cfg: BertArchConfig) -> None:
        super().__init__()
        self.self = BertSelfAttention(cfg)
        self.output = BertOutput(cfg.hidden_size, cfg.hidden_size, cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor, packing: _Packing) -> torch.Tensor:
        return self.output(self.self(x, packing), x)


class BertOutput(nn.Module):
    """Projection back to the hidden size, residual add, LayerNorm."""

    def __init__(self, input_size: int, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.dense = RowParallelLinear(input_size, hidden_size, bias=True)
        self.LayerNorm = nn.LayerNorm(hidden_size, eps=eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(x) + residual)


class BertIntermediate(nn.Module):
    def __init__(self, cfg: BertArchConfig) -> None:
        super().__init__()
        self.dense = ColumnParallelLinear(cfg.hidden_size, cfg.intermediate_size, bias=True)
        self.act = _ACTIVATIONS[cfg.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.dense(x))


class BertLayer(nn.Module):
    def __init__(self, cfg: BertArchConfig) -> None:
        super().__init__()
        self.attention = BertAttention(cfg)
        self.intermediate = BertIntermediate(cfg)
        self.output = BertOutput(cfg.intermediate_size, cfg.hidden_size, cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor, packing: _Packing) -> torch.Tensor:
        x = self.attention(x, packing)
        return self.output(self.intermediate(x), x)


class BertEncoder(nn.Module):
    def __init__(self, cfg: BertArchConfig) -> None:
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(cfg) for _ in range(cfg.num_hidden_layers))

    def forward(self, x: torch.Tensor, packing: _Packing) -> torch.Tensor:
        for layer in self.layer:
            x = layer(x, packing)
        return x


class BertModel(nn.Module):
    """BERT encoder: ``forward(input_ids [B, L], attention_mask [B, L] bool,
    token_type_ids=None) -> hidden [B, L, H]``. ``pooling_config`` (from the model
    folder) tells `engine.pooling.embed` how to turn that into one vector."""

    stacked_params = (
        (".attention.self.qkv.", ".attention.self.query.", "q"),
        (".attention.self.qkv.", ".attention.self.key.", "k"),
        (".attention.self.qkv.", ".attention.self.value.", "v"),
    )

    def __init__(self, config: EngineConfig | dict[str, Any], prefix: str = "") -> None:
        super().__init__()
        if isinstance(config, EngineConfig):
            hf = config.model_config.hf_config
            self.pooling_config = load_pooling_config(Path(config.model_config.model))
        else:
            hf, self.pooling_config = config, PoolingConfig()
        self.config = cfg = BertArchConfig.from_hf(hf)
        self.pad_token_id = cfg.pad_token_id
        self.max_position_embeddings = cfg.max_position_embeddings
        self.embeddings = BertEmbeddings(cfg)
        self.encoder = BertEncoder(cfg)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        packing = _Packing(attention_mask.bool())
        hidden = packing.pack(self.embeddings(input_ids, token_type_ids))  # [N, H]
        return packing.unpack(self.encoder(hidden, packing))

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        def rename(name: str) -> str | None:
            name = name.removeprefix("bert.")
            if name.startswith(("pooler.", "cls.")) or name.endswith("position_ids"):
                return None  # the pooler head and MLM head are not used for embeddings
            return name.replace("LayerNorm.gamma", "LayerNorm.weight").replace(
                "LayerNorm.beta", "LayerNorm.bias")

        return load_stacked_weights(self, weights, self.stacked_params, rename)
