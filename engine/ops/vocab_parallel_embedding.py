"""Token embedding and LM head with the vocabulary split across tensor-parallel ranks."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from engine.ops.linear import (
    _expect_dim,
    _new_param,
    load_rows,
    packed_linear,
    plain_linear,
    tp_world_size_and_rank,
)
from engine.quantization import QuantizedWeight


class VocabParallelEmbedding(nn.Module):
    """Embedding whose rows (the vocabulary) are split across ranks, each rank
    holding ``ceil(V / tp)`` rows; a rank embeds the ids in its range, zeros the
    others, and the ranks' results are all-reduced."""

    def __init__(self, num_embeddings: int, embedding_dim: int, prefix: str = "") -> None:
        super().__init__()
        self.tp_size, self.tp_rank = tp_world_size_and_rank()
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.num_embeddings_per_partition = -(-num_embeddings // self.tp_size)
        self.vocab_start = self.tp_rank * self.num_embeddings_per_partition
        self.vocab_end = min(num_embeddings, self.vocab_start + self.num_embeddings_per_partition)
        self.prefix = prefix
        self.weight = _new_param(self.num_embeddings_per_partition, embedding_dim,
                                 loader=self.weight_loader)
        self.quant_weight: QuantizedWeight | None = None  # see engine.quantization

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor) -> None:
        _expect_dim(loaded, 0, self.num_embeddings)
        rows = self.vocab_end - self.vocab_start
        if rows < param.shape[0]:
            param.data[rows:].zero_()
        load_rows(self, param, 0, rows, loaded.narrow(0, self.vocab_start, rows))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.quant_weight is not None and self.tp_size == 1:
            return self.quant_weight.embedding(input_ids, self.weight.dtype)
        if self.tp_size == 1:
            return F.embedding(input_ids, self.weight)
        from engine.distributed.parallel_state import tensor_model_parallel_all_reduce

        outside = (input_ids < self.vocab_start) | (input_ids >= self.vocab_end)
        local = (input_ids - self.vocab_start).masked_fill(outside, 0)
        out = F.embedding(local, self.weight).masked_fill(outside.unsqueeze(-1), 0)
        return tensor_model_parallel_all_reduce(out)

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings_per_partition} (of {self.num_embeddings}), "
                f"{self.embedding_dim}")


class ParallelLMHead(VocabParallelEmbedding):
    """The output projection to vocabulary logits, split like the embedding
    (so the two can share one weight when a model ties them)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, bias: bool = False,
                 prefix: str = "") -> None:
        super().__init__(num_embeddings, embedding_dim, prefix)
        self.bias = _new_param(self.num_embeddings_per_partition,
                               loader=self.weight_loader) if bias else None
        self.packed_weight: torch.Tensor | None = None  # see linear.pack_linear_weights
        self.amx_weight: torch.Tensor | None = None

    def tie_weights(self, embedding: VocabParallelEmbedding) -> None:
        """Use `embedding`'s weight as this head's weight."""
        self.weight = embedding.weight

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """[n, H] hidden states -> [n, vocab] logits (gathered from every rank)."""
        if self.quant_weight is not None:
            logits = self.quant_weight.linear(hidden_states, self.bias)
        elif self.packed_weight is not None or self.amx_weight is not None:
            logits = packed_linear(hidden_states, self.packed_weight, self.bias, self.weight,
                                   self.amx_weight)
        else:
            logits = plain_linear(hidden_states, self.weight, self.bias)
        if self.tp_size > 1:
            from engine.distributed.parallel_state import tensor_model_parallel_all_gather

            logits = tensor_model_parallel_all_gather(logits, dim=-1)
        return logits[..., : self.num_embeddings]

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.compute_logits(hidden_states)
