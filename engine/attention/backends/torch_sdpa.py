"""TORCH_SDPA: attention through ``torch.nn.functional.scaled_dot_product_attention``.

Decoding sequences (one new token each) are sorted by context length and cut into
a few buckets; each bucket is one call over its sequences' whole cache blocks,
gathered with one index per block and padded only to the bucket's longest context
(a padding mask hides the rest). Where to cut is chosen per step to minimise the
keys copied plus a fixed cost per call (`split_by_length`): with contexts of 30-770
tokens in one batch, one bucket padded to the longest copies about twice the keys
that are real. The query heads that share a KV head are folded into the
query-length axis, so grouped-query attention needs no copy of K/V.

With the compiled kernels (engine.kernels) loaded, decode rows go to the paged
decode kernel and, for a float32 cache (PREFILL_KERNEL_DTYPES) or a bfloat16 one on
a CPU with AMX (`prefill_on_amx`), every prefill of the step (whole prompts, chunks,
prompts after prefix-cache hits) to one call of the paged prefill kernel, both
reading K/V from the cache in place and writing the output rows where the output
projection reads them. Without them, prefills run one SDPA call per sequence: 4-D
inputs reach the fused CPU kernel, and a prompt with no cached context skips the cache read entirely
(``is_causal``). Measured on 2 CPU cores, that beats one call with a block-causal
mask over all prefill tokens, whose cost grows with the square of the step's total
tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from engine.attention.backend import (
    AttentionBackend,
    AttentionImpl,
    causal_mask,
    gather_blocks,
    write_kv_cache,
)
from engine.attention.metadata import AttentionMetadata
from engine.kernels import amx_set_aside, cpu_flags, kernels_available, portable_forced
from engine.utils import shape_bucket

# The fixed cost of one decode bucket (two gathers, the SDPA call, the scatter back),
# as bytes of K/V it would pay for: a bucket is worth cutting off when it saves more
# padding than this. On bench_generate's decode steps (docs/benchmarks.md) decode
# attention took the same time for any value from 32 KiB to 1 MiB; the top of that
# range keeps the buckets few.
BUCKET_COST_BYTES = 512 * 1024


# The cache dtypes whose prefills go to the compiled paged prefill kernel. Its
# portable bfloat16 path is correct (tested) but slower than SDPA's bf16 kernel,
# which uses the CPU's bf16 matrix instructions: bfloat16 prefills go to the kernel
# only where it runs on AMX tiles (`prefill_on_amx`), and stay on SDPA elsewhere
# (Zen 4, ENGINE_KERNEL_PATH=portable or no-amx; docs/prefill.md).
PREFILL_KERNEL_DTYPES: tuple[torch.dtype, ...] = (torch.float32,)

_wide_vectors: bool | None = None


def prefill_kernel_vectors_fit() -> bool:
    """Whether the prefill kernel's vector code runs well here: on a CPU with
    AVX-512. Its 16-lane vectors are one register there; on an AVX2 CPU the compiler
    splits them through the stack, and a 256-token float32 prompt took 16 ms a layer
    in the kernel against 1.3 ms in SDPA (2-core AMD EPYC, 9 heads of 64), so
    prefills stay on SDPA there (docs/prefill.md)."""
    global _wide_vectors
    if _wide_vectors is None:
        _wide_vectors = "avx512f" in cpu_flags()
    return _wide_vectors


@dataclass
class _Prefill:
    rows: slice  # the sequence's rows in the step
    block_ids: torch.Tensor | None  # [num_blocks] cache blocks, None when the context is all new
    seq_len: int
    mask: torch.Tensor | None  # [query_len, seq_len], None: plain causal


@dataclass
class _DecodeBucket:
    rows: torch.Tensor  # [n] the sequences' rows in the step
    block_ids: torch.Tensor  # [n * num_blocks] their block tables, padded with block 0
    mask: torch.Tensor | None  # [n, 1, 1, num_blocks * block_size], None: no padding
    num_seqs: int
    # [n * num_blocks * block_size, 1, 1]: True for the gathered slots past each
    # sequence's length (None: no padding)
    padding: torch.Tensor | None = None


@dataclass
class _StepPlan:
    """What every layer of one step reuses: built once from the metadata."""

    decode: list[_DecodeBucket]
    prefills: list[_Prefill]
    # [2, blocks of the largest bucket, block_size, Hkv, D]: every bucket and
    # every layer of the step gathers into it
    scratch: torch.Tensor | None
    # one decode bucket holding every row of the step in order: its result is the
    # output as it is (no row gather or scatter)
    whole_step: bool = False
    # [n] the decoding sequences, when the compiled paged-attention kernel computes
    # them (engine.kernels); then `decode` is empty
    kernel_decode: torch.Tensor | None = None
    # [n] the prefilling sequences (prompts, chunks, prefix hits), when the compiled
    # prefill kernel computes them from the cache; then `prefills` is empty
    kernel_prefill: torch.Tensor | None = None
    # the prefill kernel takes its AMX path (bfloat16 on a CPU with AMX)
    prefill_amx: bool = False


def split_by_length(lengths: list[int], cost_per_bucket: float) -> list[int]:
    """Where to cut `lengths` (sorted ascending) into buckets, each padded to its
    last (longest) entry, minimising ``sum(len(bucket) * max(bucket)) +
    cost_per_bucket * number_of_buckets``. Returns the end index of every bucket,
    the last being ``len(lengths)``."""
    # cuts only fall between different lengths: dynamic programming over those,
    # quadratic in the number of distinct lengths (a few dozen blocks counts)
    n = len(lengths)
    ends = [i + 1 for i in range(n) if i + 1 == n or lengths[i + 1] != lengths[i]]
    best = [0.0]  # best[j]: cost of the first ends[j - 1] entries
    cut_at: list[int] = []  # for each j > 0, the j' < j whose bucket ends just before
    for j, end in enumerate(ends, start=1):
        longest = lengths[end - 1]
        cost, prev = min(
            (best[i] + (end - (ends[i - 1] if i else 0)) * longest + cost_per_bucket, i)
            for i in range(j)
        )
        best.append(cost)
        cut_at.append(prev)
    cuts = []
    j = len(ends)
    while j:
        cuts.append(ends[j - 1])
        j = cut_at[j - 1]
    return cuts[::-1]


def _decode_buckets(md: AttentionMetadata, decode: list[int],
                    bytes_per_token: int) -> list[_DecodeBucket]:
    bs = md.block_size
    decode = sorted(decode, key=md.seq_lens.__getitem__)
    num_blocks = [-(-md.seq_lens[i] // bs) for i in decode]
    cost = BUCKET_COST_BYTES / (bytes_per_token * bs)  # in blocks
    device = md.block_tables.device
    starts = md.query_start_loc.tolist()
    buckets, start = [], 0
    for end in split_by_length(num_blocks, cost):
        seqs, width = decode[start:end], num_blocks[end - 1]
        lens = [md.seq_lens[i] for i in seqs]
        index = torch.tensor(seqs, dtype=torch.int64, device=device)
        block_ids = md.block_tables.index_select(0, index)[:, :width].reshape(-1)
        mask = padding = None
        if min(lens) < width * bs:
            keys = torch.arange(width * bs, device=device)
            lens_t = torch.tensor(lens, dtype=torch.int64, device=device)
            mask = (keys.unsqueeze(0) < lens_t.unsqueeze(1)).view(len(seqs), 1, 1, width * bs)
            padding = mask.logical_not().view(-1, 1, 1)
        rows = torch.tensor([starts[i] for i in seqs], dtype=torch.int64, device=device)
        buckets.append(_DecodeBucket(rows, block_ids, mask, len(seqs), padding))
        start = end
    return buckets


def _use_kernel(kv_cache: torch.Tensor) -> bool:
    """Whether decode rows go to ``engine_kernels::paged_decode_attention``: a CPU
    cache in float32 or bfloat16 and the compiled kernels loaded."""
    if kv_cache.device.type != "cpu" or kv_cache.dtype not in (torch.float32, torch.bfloat16):
        return False
    return kernels_available()


def prefill_on_amx(kv_cache: torch.Tensor) -> bool:
    """Whether prefills over `kv_cache` run the prefill kernel's AMX path: a bfloat16
    CPU cache, the compiled kernels loaded and built with AMX, Linux granting the
    tile state, head size a multiple of 32 (up to 128), block size a multiple of 16,
    and ENGINE_KERNEL_PATH not setting AMX aside (``portable``, ``no-amx``)."""
    if (kv_cache.dtype != torch.bfloat16 or kv_cache.dim() != 5 or kv_cache.shape[-1] % 32
            or kv_cache.shape[-1] > 128 or kv_cache.shape[2] % 16 or not _use_kernel(kv_cache)):
        return False
    return not amx_set_aside() and bool(torch.ops.engine_kernels.amx_supported())


def _plan(md: AttentionMetadata, kv_cache: torch.Tensor) -> _StepPlan:
    has_cache = kv_cache.numel() > 0
    starts = md.query_start_loc.tolist()
    decode = [i for i, q in enumerate(md.query_lens) if q == 1] if has_cache else []
    kernel_prefill = None
    amx = has_cache and prefill_on_amx(kv_cache)
    if amx or (has_cache and kv_cache.dtype in PREFILL_KERNEL_DTYPES
               and kv_cache.shape[-1] % 16 == 0 and kv_cache.shape[-1] <= 128
               and _use_kernel(kv_cache) and prefill_kernel_vectors_fit()):
        # every prefill, whole or chunk or after a prefix hit, in one call that reads
        # the cache where the step's keys were just written
        rows = [i for i, q in enumerate(md.query_lens) if q > 1]
        if rows:
            kernel_prefill = torch.tensor(rows, dtype=torch.int64, device=kv_cache.device)
        plan = _plan_decode(md, kv_cache, decode, [])
        plan.kernel_prefill = kernel_prefill
        plan.prefill_amx = amx
        return plan
    prefills = []
    for i, (q_len, seq_len) in enumerate(zip(md.query_lens, md.seq_lens, strict=True)):
        if has_cache and q_len == 1:
            continue
        rows = slice(starts[i], starts[i] + q_len)
        if q_len == seq_len:
            prefills.append(_Prefill(rows, None, seq_len, None))
        elif not has_cache:
            raise ValueError("attention without a KV cache needs query_lens == seq_lens")
        else:
            block_ids = md.block_tables[i, : -(-seq_len // md.block_size)]
            mask = causal_mask(q_len, seq_len, block_ids.device)
            prefills.append(_Prefill(rows, block_ids, seq_len, mask))
    return _plan_decode(md, kv_cache, decode, prefills)


def _plan_decode(md: AttentionMetadata, kv_cache: torch.Tensor, decode: list[int],
                 prefills: list[_Prefill]) -> _StepPlan:
    if not decode:
        return _StepPlan(decode=[], prefills=prefills, scratch=None)
    if _use_kernel(kv_cache):
        index = torch.tensor(decode, dtype=torch.int64, device=kv_cache.device)
        return _StepPlan(decode=[], prefills=prefills, scratch=None, kernel_decode=index)
    _, _, block_size, num_kv_heads, head_size = kv_cache.shape
    bytes_per_token = 2 * num_kv_heads * head_size * kv_cache.element_size()
    buckets = _decode_buckets(md, decode, bytes_per_token)
    largest = max(b.block_ids.numel() for b in buckets)
    scratch = kv_cache.new_empty((2, largest, block_size, num_kv_heads, head_size))
    whole_step = (not prefills and len(buckets) == 1
                  and buckets[0].rows.tolist() == list(range(md.num_seqs)))
    return _StepPlan(decode=buckets, prefills=prefills, scratch=scratch, whole_step=whole_step)


class TorchSDPAImpl(AttentionImpl):
    def forward(self, layer: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                value: torch.Tensor, kv_cache: torch.Tensor,
                attn_metadata: AttentionMetadata) -> torch.Tensor:
        q = query.view(-1, self.num_heads, self.head_size)
        k = key.view(-1, self.num_kv_heads, self.head_size)
        v = value.view(-1, self.num_kv_heads, self.head_size)
        plan = attn_metadata.backend_state.get("TORCH_SDPA")
        if plan is None:
            plan = attn_metadata.backend_state["TORCH_SDPA"] = _plan(attn_metadata, kv_cache)
        if kv_cache.numel() > 0:
            write_kv_cache(kv_cache, k, v, attn_metadata.slot_mapping)

        if plan.whole_step:
            out = self._decode(q, kv_cache, plan.decode[0], plan.scratch)
            return out.view(-1, self.num_heads * self.head_size)
        out = torch.empty_like(q)
        if plan.kernel_decode is not None:
            md = attn_metadata
            torch.ops.engine_kernels.paged_decode_attention(
                out, q, kv_cache, md.block_tables, md.seq_lens_tensor, md.query_start_loc,
                plan.kernel_decode, self.scale, portable_forced())
        if plan.kernel_prefill is not None:
            md = attn_metadata
            torch.ops.engine_kernels.paged_prefill_attention(
                out, q, kv_cache, md.block_tables, md.seq_lens_tensor, md.query_start_loc,
                plan.kernel_prefill, self.scale, plan.prefill_amx)
        for bucket in plan.decode:
            out.index_copy_(0, bucket.rows,
                            self._decode(q.index_select(0, bucket.rows), kv_cache, bucket,
                                         plan.scratch))
        for p in plan.prefills:
            out[p.rows] = self._prefill(q[p.rows], k[p.rows], v[p.rows], kv_cache, p)
        return out.view(-1, self.num_heads * self.head_size)

    def fast_fn(self, layer: torch.nn.Module) -> Callable[
            [torch.Tensor, torch.Tensor, torch.Tensor, AttentionMetadata], torch.Tensor | None] | None:
        """`forward`'s path for a step whose rows all run on the compiled kernels
        (the step's plan, shared by every layer, says so): decode rows on the paged
        decode kernel, prompt rows (whole, chunked or after a prefix hit) on the
        prefill kernel: the cache write and the kernel calls, ``ENGINE_KERNEL_PATH``
        read once. Any other step returns None before touching anything."""
        if type(self) is not TorchSDPAImpl or not kernels_available():
            return None
        num_heads, num_kv_heads, head_size = self.num_heads, self.num_kv_heads, self.head_size
        scale, portable = self.scale, portable_forced()
        decode_attention = torch.ops.engine_kernels.paged_decode_attention
        prefill_attention = torch.ops.engine_kernels.paged_prefill_attention

        def run(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                md: AttentionMetadata) -> torch.Tensor | None:
            kv_cache = layer.kv_cache
            plan = md.backend_state.get("TORCH_SDPA")
            if plan is None:
                plan = md.backend_state["TORCH_SDPA"] = _plan(md, kv_cache)
            decode, prefill = plan.kernel_decode, plan.kernel_prefill
            if (plan.decode or plan.prefills or (decode is None and prefill is None)
                    or kv_cache.numel() == 0):
                return None
            tokens = query.shape[0]
            write_kv_cache(kv_cache, key.view(tokens, num_kv_heads, head_size),
                           value.view(tokens, num_kv_heads, head_size), md.slot_mapping)
            q = query.view(tokens, num_heads, head_size)
            out = query.new_empty((tokens, num_heads, head_size))
            if decode is not None:
                decode_attention(out, q, kv_cache, md.block_tables, md.seq_lens_tensor,
                                 md.query_start_loc, decode, scale, portable)
            if prefill is not None:
                prefill_attention(out, q, kv_cache, md.block_tables, md.seq_lens_tensor,
                                  md.query_start_loc, prefill, scale, plan.prefill_amx)
            return out.view(tokens, num_heads * head_size)

        return run

    def decode_kernel_rows(self, kv_cache: torch.Tensor,
                           md: AttentionMetadata) -> torch.Tensor | None:
        """The step's sequences for ``paged_decode_attention`` (its `decode_seqs`)
        when every row of the step is a decode row on that kernel, as `fast_fn`'s
        form would run it; else None. For ``engine_kernels::decode_layers``, which
        runs that form's calls for every layer of such a step."""
        if type(self) is not TorchSDPAImpl or kv_cache.numel() == 0:
            return None
        plan = md.backend_state.get("TORCH_SDPA")
        if plan is None:
            plan = md.backend_state["TORCH_SDPA"] = _plan(md, kv_cache)
        if plan.decode or plan.prefills or plan.kernel_prefill is not None:
            return None
        return plan.kernel_decode

    def _decode(self, q: torch.Tensor, kv_cache: torch.Tensor, bucket: _DecodeBucket,
                scratch: torch.Tensor) -> torch.Tensor:
        """q [n, H, D] (one token per sequence) -> [n, H, D]."""
        n = bucket.num_seqs
        keys, values = gather_blocks(kv_cache, bucket.block_ids, scratch)  # [n * L, Hkv, D]
        # the slots past a sequence's length hold what their block held before (another
        # request's values, NaN after a broken one): the mask gives them weight 0, and
        # 0 * NaN is NaN, so they are zeroed in the gathered copy
        if bucket.padding is not None:
            keys.masked_fill_(bucket.padding, 0)
            values.masked_fill_(bucket.padding, 0)
        keys = keys.view(n, -1, self.num_kv_heads, self.head_size).transpose(1, 2)
        values = values.view(n, -1, self.num_kv_heads, self.head_size).transpose(1, 2)
        # heads sharing a KV head become that head's "query length": GQA without a copy
        q = q.view(n, self.num_kv_heads, self.num_queries_per_kv, self.head_size)
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=bucket.mask,
                                             scale=self.scale)
        return out.reshape(n, self.num_heads, self.head_size)

    def _prefill(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 kv_cache: torch.Tensor, p: _Prefill) -> torch.Tensor:
        """q [Lq, H, D] and this step's k/v [Lq, Hkv, D] -> [Lq, H, D]."""
        if p.block_ids is not None:
            k, v = gather_blocks(kv_cache, p.block_ids)  # the whole context, block-padded
            k, v = k[: p.seq_len], v[: p.seq_len]
        length, keys, mask = q.shape[0], k.shape[0], p.mask
        if q.dtype != torch.float32 and (shape_bucket(length) != length
                                         or shape_bucket(keys) != keys):
            # torch's reduced-precision CPU attention keeps a kernel per shape (see
            # shape_bucket): pad queries and keys to buckets. Plain causal, the padding
            # sits after the real rows, which never see it; with a mask (a chunk, or a
            # prompt after a prefix-cache hit) the padded keys are masked out and the
            # padded query rows, dropped below, see key 0 only
            q, k, v = _pad_rows(q, shape_bucket(length)), *(
                _pad_rows(t, shape_bucket(keys)) for t in (k, v))
            if mask is not None:
                padded = mask.new_zeros((q.shape[0], k.shape[0]))
                padded[:length, :keys] = mask
                padded[length:, 0] = True
                mask = padded
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1).unsqueeze(0), k.transpose(0, 1).unsqueeze(0),
            v.transpose(0, 1).unsqueeze(0), attn_mask=mask, is_causal=mask is None,
            scale=self.scale, enable_gqa=self.num_queries_per_kv > 1)
        return out.squeeze(0).transpose(0, 1)[:length]


def _pad_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    """`x` [n, ...] with zero rows appended up to `rows`."""
    if x.shape[0] == rows:
        return x
    return torch.cat([x, x.new_zeros((rows - x.shape[0], *x.shape[1:]))])


class TorchSDPABackend(AttentionBackend):
    @staticmethod
    def get_name() -> str:
        return "TORCH_SDPA"

    @staticmethod
    def get_impl_cls() -> type[AttentionImpl]:
        return TorchSDPAImpl
