"""The warm-up steps: what `Worker.compile_or_warm_up_model` runs before the
engine takes requests, so that no user request pays a first-time cost.

A first step of a given kind pays for things a later one does not: the OpenMP
thread pool and oneDNN's first primitives and AMX set-up, the first calls of
the compiled kernels (GEMV up to a few decode rows, AMX up to
`engine.ops.linear.AMX_MAX_ROWS`, paged decode attention), the attention
backend's prefill paths (a whole prompt, and a chunk over a cached context),
the sampler's paths (argmax; temperature with top-k/top-p/min-p and a seeded
generator; penalties; log-probabilities on the float32 copy of the logits) and
the allocator growing to the largest step. The warm-up runs a step of each
kind as the scheduler would send it: one prefill step of up to
`MAX_PREFILL_TOKENS` tokens, one step that mixes a prompt chunk over a cached
context with decodes, then one decode step per batch bucket (1, 2, 4, ... up
to `MAX_DECODE_BATCH` or ``max_num_seqs``). After the steps,
`warm_up_linear_buckets` runs each distinct prepacked linear layer once at every
prompt-step row bucket up to the step budget or the cache's capacity, the smaller
(`engine.utils.shape_bucket`):
oneDNN builds a primitive per row count the first time it sees one, and a step
larger than the warm-up's own (several prompts together) would otherwise pay
for it in the first request that reaches that size. `warm_up_attention` then
runs each distinct attention layer on one fresh prompt of every length bucket up
to the longest prompt step: torch's reduced-precision SDPA kernel, which bfloat16
prompts take, also builds its blocks per (bucketed) shape on first use.

It leaves nothing behind: the steps never reach the scheduler (no KV block is
allocated, the prefix cache and the statistics never see them), their
sequences have negative ids (never a request's) and are dropped at the end, and
the cache blocks they write (all sequences share the first ones; the attention
stage writes blocks 0, 1, ... up to its longest prompt) hold finite values that
no request reads before writing (as after any finished request).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

import torch
from torch import nn

from engine.attention.layer import get_attention_layers
from engine.attention.metadata import AttentionMetadata
from engine.ops.linear import (
    AMX_MAX_ROWS,
    ColumnParallelLinear,
    RowParallelLinear,
    onednn_silu_and_mul,
    packed_linear,
)
from engine.sampling_params import SamplingParams
from engine.step import NewSequenceData, ScheduledSequence, SchedulerOutput
from engine.utils import shape_bucket

# The largest prefill step of the warm-up. The step budget (max_num_batched_tokens)
# can be 4096 or more; a larger step warms nothing new (oneDNN's primitives are
# per row count whatever the warm-up runs) and costs start-up time in proportion.
MAX_PREFILL_TOKENS = 512
# The largest decode bucket: past the compiled kernels' row limits (GEMV, AMX up
# to engine.ops.linear.AMX_MAX_ROWS) every row count is one more oneDNN shape,
# which the warm-up cannot cover for every count.
MAX_DECODE_BATCH = 64
# decode rows of one context: enough to span several cache blocks
DECODE_CONTEXT_TOKENS = 48
# The most FLOPs `warm_up_linear_buckets` spends. Building a oneDNN primitive
# costs about the same for any model, while running it grows with the layer: the
# embedded default model warms every bucket up to 2,048 rows within this, a large
# model (whose prompt steps take long enough that a first-time build is lost in
# them) only its smaller buckets.
LINEAR_BUCKET_FLOPS = 40e9
# The same for `warm_up_attention` (a causal prompt of n tokens: about 2 n^2 H D
# FLOPs per distinct layer shape)
ATTENTION_SHAPE_FLOPS = 10e9


def decode_batch_sizes(max_num_seqs: int) -> list[int]:
    """The decode batch buckets the warm-up runs: powers of two up to
    ``min(max_num_seqs, MAX_DECODE_BATCH)``, and that limit itself."""
    limit = min(max_num_seqs, MAX_DECODE_BATCH)
    sizes, n = [], 1
    while n < limit:
        sizes.append(n)
        n *= 2
    return sizes + [limit]


def _params(i: int) -> SamplingParams:
    """Row `i`'s sampling settings: every sampler path within a few rows."""
    kinds: tuple[dict[str, Any], ...] = (
        dict(temperature=0.0),
        dict(temperature=0.8, top_p=0.9, top_k=40, seed=i),
        dict(temperature=1.0, min_p=0.05, repetition_penalty=1.1, presence_penalty=0.5),
        dict(temperature=0.0, logprobs=2),
    )
    return SamplingParams(max_tokens=1, ignore_eos=True, **kinds[i % len(kinds)])


class _Blocks:
    """Block tables for the warm-up's sequences: every one starts at block 0, so
    the warm-up writes (and makes resident: the cache's pages are only touched
    when written) no more blocks than its longest sequence needs. Sharing is
    harmless: the values are never read as any request's context."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size

    def table(self, num_tokens: int) -> list[int]:
        return [i % self.num_blocks for i in range(-(-num_tokens // self.block_size))]


def warm_up_steps(config: Any, num_blocks: int, vocab_size: int) -> Iterator[SchedulerOutput]:
    """The warm-up's steps in order, for a KV cache of `num_blocks` blocks; the
    last one only drops the warm-up sequences (``finished_seq_ids``)."""
    max_len = config.model_config.max_model_len
    budget = config.scheduler_config.max_num_batched_tokens
    max_seqs = config.scheduler_config.max_num_seqs
    blocks = _Blocks(num_blocks, config.cache_config.block_size)
    seq_ids = iter(range(-1, -(1 << 62), -1))
    live: list[int] = []

    def token_ids(n: int, offset: int) -> list[int]:
        return [(offset * 31 + j * 7 + 3) % vocab_size for j in range(n)]

    def new_seq(prompt: list[int], row: int) -> tuple[int, NewSequenceData]:
        seq_id = next(seq_ids)
        live.append(seq_id)
        return seq_id, NewSequenceData(seq_id, prompt, _params(row), seed_offset=0)

    # 1. whole prompts, no cached context: the largest prefill step
    total = max(1, min(budget, MAX_PREFILL_TOKENS, num_blocks * blocks.block_size))
    per_seq = max(1, min(max_len - 1, total))
    step = SchedulerOutput()
    row = 0
    while total > 0 and len(step.scheduled) < max_seqs:
        n = min(per_seq, total)
        prompt = token_ids(n, row)
        seq_id, data = new_seq(prompt, row)
        step.new_seqs.append(data)
        step.scheduled.append(ScheduledSequence(seq_id, prompt, 0, blocks.table(n + 1), True))
        total -= n
        row += 1
    step.num_batched_tokens = sum(len(s.token_ids) for s in step.scheduled)
    yield step

    # 2. a prompt chunk over a cached context, next to a decode
    if max_len >= 3:
        chunk = max(1, min(budget - 1, max_len - 2, 64) // 2)
        prompt = token_ids(2 * chunk, row)
        seq_id, data = new_seq(prompt, row)
        table = blocks.table(2 * chunk + 1)
        decode_id, decode_data = new_seq(token_ids(1, row + 1), row + 1)
        yield SchedulerOutput(
            scheduled=[ScheduledSequence(seq_id, prompt[chunk:], chunk, table, True),
                       ScheduledSequence(decode_id, [5 % vocab_size], 1, blocks.table(2), True)],
            new_seqs=[data, decode_data], num_batched_tokens=chunk + 1)

    # 3. decode steps, one per batch bucket
    context = max(1, min(DECODE_CONTEXT_TOKENS, max_len - 1))
    for size in decode_batch_sizes(max_seqs):
        step = SchedulerOutput(num_batched_tokens=size)
        for i in range(size):
            seq_id, data = new_seq(token_ids(context, i), i)
            step.new_seqs.append(data)
            step.scheduled.append(ScheduledSequence(
                seq_id, [(i + 11) % vocab_size], context, blocks.table(context + 1), True))
        yield step
    yield SchedulerOutput(finished_seq_ids=live)


def prefill_row_buckets(max_rows: int) -> list[int]:
    """The row counts that prompt steps of more than `AMX_MAX_ROWS` and up to
    `max_rows` rows reach oneDNN with (`shape_bucket` of each), ascending."""
    return sorted({shape_bucket(rows) for rows in range(AMX_MAX_ROWS + 1, max_rows + 1)})


def _linear_products(model: nn.Module) -> dict[tuple, tuple[torch.Tensor,
                                                            Callable[[torch.Tensor], Any]]]:
    """One (weight, product) per distinct oneDNN call of the model's prepacked
    linear layers as a prompt step runs them, keyed by what oneDNN's primitives
    depend on (weight shape, dtype, bias, fused activation); `product(x)` runs
    it on `x` [rows, in]. A gate-up projection packed in halves
    (``gated_activation``) runs as prompt steps run it, with SiLU-and-mul inside
    the two matmuls (`onednn_silu_and_mul`)."""
    products: dict[tuple, tuple] = {}
    for module in model.modules():
        if not isinstance(module, ColumnParallelLinear | RowParallelLinear):
            continue
        if module.quant_weight is not None:
            continue  # its quantization method's kernels run it
        weight, bias = module.weight, module.bias
        gate, up = getattr(module, "packed_gate", None), getattr(module, "packed_up", None)
        packed = getattr(module, "packed_weight", None)
        if gate is not None and up is not None:
            biases: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None)
            if bias is not None:
                gate_bias, up_bias = bias.chunk(2)
                biases = (gate_bias, up_bias)
            product = partial(_silu_and_mul, gate=gate, up=up, biases=biases)
            kind = "silu_and_mul"
        elif packed is not None:
            if isinstance(module, RowParallelLinear) and module.tp_size > 1:
                bias = None  # added after the all-reduce (RowParallelLinear.forward)
            product = partial(packed_linear, packed=packed, bias=bias, weight=weight,
                              amx_packed=module.amx_weight)
            kind = "linear"
        else:
            continue
        key = (tuple(weight.shape), weight.dtype, bias is not None, kind)
        products.setdefault(key, (weight, product))
    return products


def _silu_and_mul(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor,
                  biases: tuple[torch.Tensor | None, torch.Tensor | None]) -> torch.Tensor:
    return onednn_silu_and_mul(x, gate, up, *biases)


def warm_up_linear_buckets(model: nn.Module, max_rows: int,
                           flop_budget: float | None = None) -> int:
    """Run each distinct prepacked linear layer of `model` once at every prompt-step
    row bucket up to `max_rows` (`prefill_row_buckets`), smallest first, while the
    products' FLOPs stay within `flop_budget` (default `LINEAR_BUCKET_FLOPS`).
    Returns the number of buckets run."""
    if flop_budget is None:
        flop_budget = LINEAR_BUCKET_FLOPS
    products = _linear_products(model)
    if not products:
        return 0
    flops_per_row = 2 * sum(w.shape[0] * w.shape[1] for w, _ in products.values())
    spent, done = 0.0, 0
    with torch.inference_mode():
        for rows in prefill_row_buckets(max_rows):
            spent += flops_per_row * rows
            if spent > flop_budget:
                break
            for weight, product in products.values():
                product(weight.new_zeros((rows, weight.shape[1])))
            done += 1
    return done


def prompt_length_buckets(max_len: int) -> list[int]:
    """The lengths (`shape_bucket`) that fresh prompts of 2 to `max_len` tokens
    reach a reduced-precision SDPA call with, ascending."""
    return sorted({shape_bucket(n) for n in range(2, max_len + 1)})


def warm_up_attention(model: nn.Module, max_len: int, dtype: torch.dtype, block_size: int,
                      num_blocks: int, flop_budget: float | None = None,
                      device: torch.device | str = "cpu") -> int:
    """Run each distinct attention layer of `model` (backend, heads, head size)
    on one fresh prompt of every length in `prompt_length_buckets(max_len)`,
    shortest first, through its backend's `forward` on its own KV cache (blocks
    0, 1, ... of `num_blocks` blocks of `block_size`, which no request reads
    before writing), while the FLOPs stay within `flop_budget` (default
    `ATTENTION_SHAPE_FLOPS`), with inputs on `device`. That is the path of a
    prompt with no cached context, whichever kernel the backend picks for it.
    Returns the number of lengths run."""
    if flop_budget is None:
        flop_budget = ATTENTION_SHAPE_FLOPS
    layers: dict[tuple, Any] = {}
    for layer in get_attention_layers(model):
        key = (type(layer.impl), layer.num_heads, layer.head_size, layer.num_kv_heads)
        layers.setdefault(key, layer)
    if not layers:
        return 0
    flops_per_square = 2 * sum(a.num_heads * a.head_size for a in layers.values())
    spent, done = 0.0, 0
    with torch.inference_mode():
        for n in prompt_length_buckets(min(max_len, num_blocks * block_size)):
            spent += flops_per_square * n * n
            if spent > flop_budget:
                break
            table = list(range(-(-n // block_size)))
            md = AttentionMetadata.build([n], [n], [table], list(range(n)), block_size, device)
            for layer in layers.values():
                q = torch.zeros((n, layer.num_heads * layer.head_size), dtype=dtype, device=device)
                kv = torch.zeros((n, layer.num_kv_heads * layer.head_size), dtype=dtype,
                                 device=device)
                md.backend_state.clear()
                layer.impl.forward(layer, q, kv, kv, layer.kv_cache, md)
            done += 1
    return done
