"""The engine's layers: replaceable custom ops and tensor-parallel linear layers.

`CustomOp` is the extension point (docs/reference.md, "Other extension interfaces"):
platforms specialise an op by its ``forward_<platform>`` method, plugins replace it
with ``register_oot``.
"""

from engine.ops.activation import SiluAndMul
from engine.ops.custom_op import CustomOp
from engine.ops.layernorm import RMSNorm
from engine.ops.linear import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)
from engine.ops.rotary_embedding import RotaryEmbedding, rope_parameters_from_hf
from engine.ops.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding

__all__ = [
    "CustomOp",
    "RMSNorm",
    "SiluAndMul",
    "RotaryEmbedding",
    "rope_parameters_from_hf",
    "ColumnParallelLinear",
    "MergedColumnParallelLinear",
    "QKVParallelLinear",
    "RowParallelLinear",
    "VocabParallelEmbedding",
    "ParallelLMHead",
]
