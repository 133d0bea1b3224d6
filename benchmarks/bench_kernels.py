"""The engine's compiled CPU kernels against what they replace, per call.

    python benchmarks/bench_kernels.py                # bf16, two threads
    python benchmarks/bench_kernels.py --threads 1

- paged decode attention (`engine_kernels::paged_decode_attention`) on 32
  sequences of 210 tokens (smol's 9 heads, 3 KV heads, head size 64), against the
  SDPA path it replaced (gather the blocks, pad, one call);
- linear layers of smol's shapes at 1, 4 and 32 rows: the GEMV and AMX kernels
  against oneDNN with a prepacked weight (what the engine used before). Each shape
  cycles through 30 distinct weights, so every call reads its weight from DRAM as
  a decode step does;
- the greedy sampler's argmax over 32 x 49,152 logits against torch's;
- prefill attention (`engine_kernels::paged_prefill_attention`) on a fresh
  256-token prompt, on a 64-token chunk after 192 cached tokens and on a step of 8
  fresh prompts of 16-384 tokens, against the SDPA path (one call per sequence,
  the cached context gathered), float32 and bf16 (bf16: the kernel's AMX path where
  the CPU has AMX, as the engine runs it; elsewhere its portable path, routed to the
  kernel for its side while the engine keeps such prefills on SDPA);
- float32 linears of smol's shapes at 1, 4, 32 and 256 rows (``--fp32-rows``: others,
  e.g. 8,12,16,20,24,32 for where oneDNN overtakes the GEMV): the float32 GEMV
  kernel (native and portable paths, up to 32 rows) and oneDNN on a prepacked
  weight against F.linear (torch's BLAS), again cycling through distinct weights.

- GGUF block-quantized linears (Q4_1, Q8_0) of smol's shapes at 1 to 96 rows,
  bfloat16 activations, on the avx512_vnni path: the weight interleaved in groups
  of 16 rows (what the engine stores) against the blocks as the file has them,
  and the block kernel (`ggml_linear`) against dequantize-then-matmul
  (`ggml_matmul`), the choice `MAX_INTERLEAVED_ROWS` makes; process CPU time per
  call next to wall time (the machine is shared), again cycling through distinct
  weights.

- paged decode attention alone (`--parts decode_attention`, not in the default set):
  1, 8 and 32 rows of 128, 300 and 1,024 tokens (smol's heads), bf16 and float32,
  the kernel's native and portable paths against SDPA over the gathered context
  (what the engine runs without the kernels); caches cycled so that every call
  reads its K/V from DRAM, as a decode step's layers do; CPU time per call and the
  K/V bytes read per CPU second, sides alternating over three rounds.

- paged decode attention with its K/V resident in the CPU caches (`--parts
  decode_resident`, not in the default set): one bf16 step called again and again,
  4 × 300 (in L2) and 32 × 300 (in L3), native and portable paths alternating over
  eight rounds: the kernel's own instructions, without DRAM.

- the decode-attention kernel with its K/V cache in 4 KiB pages against 2 MiB
  transparent huge pages (`--parts kv_pages`, not in the default set): 32 × 300,
  8 × 1,024 and 32 × 1,024, bf16 and float32, alternating over six rounds, the
  pages resident before timing.

- the decode-attention kernel on the cache's layout against each KV head's rows of a
  block stored together (`--parts kv_layout`, not in the default set): bf16, 32 x
  300, the second layout simulated with one KV head per sequence (3x the
  sequences), alternating over six rounds.

- K-quant linears (`--parts kquants`, not in the default set): Q4_K, Q5_K and Q6_K
  weights of 4096 x 1024 and 1024 x 4096 (whole 256-value super-blocks), 1 to 64
  bfloat16 activation rows, on the avx512_vnni path: the block kernel
  (`ggml_linear`) against dequantize-then-matmul (`ggml_matmul`), weights cycling
  through 8 copies, best of two alternations, next to a Q4_1 weight of the same
  shape (interleaved, as the engine stores it) for the bytes-for-bytes comparison.

``--parts`` picks some of them (attention, linears, argmax, prefill, fp32, ggml,
kquants, decode_attention, decode_resident, kv_pages, kv_layout).

Times are the mean over the repetitions, after a warm-up; the machine's load is
printed with them.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import engine  # noqa: E402,F401 - before torch: it chooses the OpenMP wait

SHAPES = {"qkv": (960, 576), "o_proj": (576, 576), "gate_up": (3072, 576),
          "down": (576, 1536), "lm_head": (49152, 576)}


def timed(fn, reps: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - start) / reps


def attention(torch) -> None:
    from attention_steps import random_attention_step

    from engine.attention.backends import torch_sdpa
    from engine.attention.backends.torch_sdpa import TorchSDPAImpl

    seq_lens = [210] * 32
    md, cache, (q, k, v) = random_attention_step([1] * 32, seq_lens, torch.bfloat16,
                                                 block_size=16, kv_heads=3, heads=9, head_size=64)
    impl = TorchSDPAImpl(9, 64, 0.125, 3)

    def run(use_kernel: bool):
        def call():
            md.backend_state.clear()
            torch_sdpa._use_kernel = (lambda _c: use_kernel) if not use_kernel else original
            impl.forward(None, q, k, v, cache, md)
        return call

    original = torch_sdpa._use_kernel
    try:
        sdpa = timed(run(False), 50)
        kernel = timed(run(True), 50)
    finally:
        torch_sdpa._use_kernel = original
    print(f"decode attention, 32 x 210 tokens, bf16: SDPA path {sdpa * 1e3:.3f} ms, "
          f"kernel {kernel * 1e3:.3f} ms ({sdpa / kernel:.1f}x)")


def linears(torch) -> None:
    from engine.ops.linear import pack_weight, pack_weight_for_amx

    amx_ok = bool(torch.ops.engine_kernels.amx_supported())
    for rows in (1, 4, 32):
        for name, (n, k) in SHAPES.items():
            count = 30 if name != "lm_head" else 2
            weights = [torch.randn(n, k).bfloat16() for _ in range(count)]
            onednn = [pack_weight(w) for w in weights]
            amx = [pack_weight_for_amx(w) for w in weights] if amx_ok else []
            x = torch.randn(rows, k).bfloat16()
            out = torch.empty(rows, n, dtype=torch.bfloat16)

            def each(fn, packed):
                def call():
                    for p in packed:
                        fn(p)
                return call

            base = timed(each(lambda p, x=x: torch.ops.mkldnn._linear_pointwise(
                x, p, None, "none", [], ""), onednn), 3) / count
            line = f"linear {name:8s} {n:5d}x{k:4d}, {rows:2d} rows: oneDNN {base * 1e6:7.1f} us"
            if rows <= 8:
                t = timed(each(lambda w, x=x, out=out: torch.ops.engine_kernels.bf16_gemv(
                    out, x, w, None), weights), 3) / count
                line += f", GEMV {t * 1e6:7.1f} us ({base / t:.2f}x)"
            if amx:
                t = timed(each(lambda p, x=x, out=out: torch.ops.engine_kernels.amx_linear(
                    out, x, p, None), amx), 3) / count
                line += f", AMX {t * 1e6:7.1f} us ({base / t:.2f}x, {n * k * 2 / t / 1e9:.1f} GB/s)"
            print(line)


def prefill(torch) -> None:
    from attention_steps import random_attention_step

    from engine.attention.backends import torch_sdpa
    from engine.attention.backends.torch_sdpa import TorchSDPAImpl

    original = (torch_sdpa._use_kernel, torch_sdpa.PREFILL_KERNEL_DTYPES)
    impl = TorchSDPAImpl(9, 64, 0.125, 3)
    batch = [16, 64, 128, 200, 256, 300, 350, 384]
    cases = (("fresh 256-token prompt", [256], [256]),
             ("64-token chunk after 192 cached", [64], [256]),
             ("8 fresh prompts of 16-384", batch, batch))
    for dtype in (torch.float32, torch.bfloat16):
        for label, q_lens, seq_lens in cases:
            md, cache, (q, k, v) = random_attention_step(q_lens, seq_lens, dtype,
                                                         block_size=16, kv_heads=3, heads=9,
                                                         head_size=64)

            def run(use_kernel: bool, md=md, cache=cache, q=q, k=k, v=v):
                def call():
                    md.backend_state.clear()
                    torch_sdpa._use_kernel = original[0] if use_kernel else (lambda _c: False)
                    torch_sdpa.PREFILL_KERNEL_DTYPES = (torch.float32, torch.bfloat16)
                    impl.forward(None, q, k, v, cache, md)
                return call

            try:
                # alternating rounds, the median of each side: steadier on a shared machine
                sides = (run(False), run(True))
                rounds = [[timed(side, 4) for side in sides] for _ in range(7)]
                sdpa, kernel = (statistics.median(r[i] for r in rounds) for i in range(2))
            finally:
                torch_sdpa._use_kernel, torch_sdpa.PREFILL_KERNEL_DTYPES = original
            print(f"prefill attention, {label}, {str(dtype)[6:]}: SDPA path "
                  f"{sdpa * 1e3:.3f} ms, kernel {kernel * 1e3:.3f} ms ({sdpa / kernel:.2f}x)")


FP32_ROWS = [1, 4, 32, 256]  # --fp32-rows


def fp32_linears(torch) -> None:
    import torch.nn.functional as F

    from engine.ops.linear import pack_weight

    for rows in FP32_ROWS:
        for name, (n, k) in SHAPES.items():
            count = 12 if name != "lm_head" else 1
            weights = [torch.randn(n, k) for _ in range(count)]
            onednn = [pack_weight(w) for w in weights]
            x = torch.randn(rows, k)
            out = torch.empty(rows, n)

            def each(fn, items):
                def call():
                    for item in items:
                        fn(item)
                return call

            base = timed(each(lambda w, x=x: F.linear(x, w), weights), 3) / count
            line = f"fp32 linear {name:8s} {n:5d}x{k:4d}, {rows:3d} rows: F.linear {base * 1e6:8.1f} us"
            t = timed(each(lambda p, x=x: torch.ops.mkldnn._linear_pointwise(
                x, p, None, "none", [], ""), onednn), 3) / count
            line += f", oneDNN packed {t * 1e6:8.1f} us ({base / t:.2f}x)"
            if rows <= 32:
                for label, portable in (("GEMV", False), ("GEMV portable", True)):
                    t = timed(each(lambda w, x=x, out=out, portable=portable:
                                   torch.ops.engine_kernels.fp32_gemv(out, x, w, None, portable),
                                   weights), 3) / count
                    line += f", {label} {t * 1e6:8.1f} us ({base / t:.2f}x)"
            print(line)


def argmax(torch) -> None:
    logits = torch.randn(32, 49152)
    plain = timed(lambda: logits.argmax(dim=-1), 50)
    kernel = timed(lambda: torch.ops.engine_kernels.argmax_rows(logits), 50)
    print(f"argmax 32 x 49152 float32: torch {plain * 1e3:.3f} ms, kernel {kernel * 1e3:.3f} ms")


def ggml_linears(torch) -> None:
    import gguf
    import numpy as np

    from engine.quantization.ggml import GGML_TYPES, PATHS, PREFILL_TILE_BYTES, kernel_paths

    best = kernel_paths()[0]
    if best == "portable":
        print("ggml: this CPU has no vector int8 path (avx2, avx512_vnni); skipped")
        return
    ops = torch.ops.engine_kernels
    vnni = PATHS[best][0]  # the best int8 path: avx512_vnni, else avx2
    # the activations dtype="auto" gives a GGUF model: bf16 where the CPU has bf16
    # arithmetic (the avx512_vnni CPUs we have), float32 on an AVX2 CPU
    act = torch.bfloat16 if best == "avx512_vnni" else torch.float32
    print(f"ggml linears on the {best} path, {act} activations")
    rng = np.random.default_rng(0)
    for qtype in ("Q4_1", "Q8_0"):
        type_id = GGML_TYPES[qtype][0]
        for name, (n, k) in SHAPES.items():
            count = 12 if name != "lm_head" else 1
            values = rng.standard_normal((n, k)).astype(np.float32)
            plain = torch.from_numpy(gguf.quants.quantize(values, gguf.GGMLQuantizationType[qtype]))
            interleaved = torch.empty_like(plain)
            ops.ggml_interleave(interleaved, plain, type_id)
            layouts = {"file": [plain.clone() for _ in range(count)],
                       "interleaved": [interleaved.clone() for _ in range(count)]}
            for rows in (1, 4, 16, 32, 48, 64, 96) if name != "lm_head" else (1, 32):
                x = torch.randn(rows, k).to(act)
                out = torch.empty(rows, n, dtype=act)

                def run(kind, layout, x=x, out=out, type_id=type_id, layouts=layouts):
                    interleave = layout == "interleaved"
                    for w in layouts[layout]:
                        if kind == "kernel":
                            ops.ggml_linear(out, x, w, type_id, None, vnni, interleave)
                        else:
                            ops.ggml_matmul(out, x, w, type_id, None, PREFILL_TILE_BYTES, interleave)

                line = f"{qtype} {name:8s} {n:5d}x{k:4d}, {rows:3d} rows:"
                sides = [("kernel", "interleaved"), ("kernel", "file"), ("tiles", "interleaved")]
                for kind, layout in sides if rows <= 16 else sides[::2]:
                    cpu = time.process_time()
                    wall = timed(lambda kind=kind, layout=layout: run(kind, layout), 3) / count
                    cpu = (time.process_time() - cpu) / (4 * count)
                    line += f" {kind} {layout} {wall * 1e6:8.1f} us ({cpu * 1e6:.1f} CPU)"
                print(line, flush=True)


def k_quant_linears(torch) -> None:
    import gguf
    import numpy as np

    from engine.quantization import kquants
    from engine.quantization.ggml import GGML_TYPES, PATHS, PREFILL_TILE_BYTES, kernel_paths

    if "avx512_vnni" not in kernel_paths():
        print("kquants: this CPU has no avx512_vnni path; skipped")
        return
    ops = torch.ops.engine_kernels
    vnni = PATHS["avx512_vnni"][0]
    rng = np.random.default_rng(0)
    writers = {"Q4_K": kquants.quantize_q4_k, "Q5_K": kquants.quantize_q5_k,
               "Q6_K": kquants.quantize_q6_k,
               "Q4_1": lambda v: gguf.quants.quantize(v, gguf.GGMLQuantizationType.Q4_1)}
    print("K-quant linears, bf16 activations: wall us per call, kernel / dequantize-then-matmul")
    for qtype, write in writers.items():
        type_id = GGML_TYPES[qtype][0]
        for n, k in ((4096, 1024), (1024, 4096)):
            blocks = torch.from_numpy(np.ascontiguousarray(
                write(rng.standard_normal((n, k)).astype(np.float32))))
            interleave = qtype == "Q4_1"
            if interleave:
                packed = torch.empty_like(blocks)
                ops.ggml_interleave(packed, blocks, type_id)
                blocks = packed
            weights = [blocks.clone() for _ in range(8)]
            line = f"{qtype} {n:5d}x{k:4d}:"
            for rows in (1, 8, 16, 32, 64):
                x = torch.randn(rows, k).to(torch.bfloat16)
                out = torch.empty(rows, n, dtype=torch.bfloat16)
                best = {"kernel": float("inf"), "tiles": float("inf")}
                for kind in ("kernel", "tiles", "kernel", "tiles"):
                    def run(kind=kind, x=x, out=out, type_id=type_id, weights=weights,
                            interleave=interleave):
                        for w in weights:
                            if kind == "kernel":
                                ops.ggml_linear(out, x, w, type_id, None, vnni, interleave)
                            else:
                                ops.ggml_matmul(out, x, w, type_id, None, PREFILL_TILE_BYTES,
                                                interleave)
                    best[kind] = min(best[kind], timed(run, 3) / len(weights))
                line += f"  {rows} rows {best['kernel'] * 1e6:.0f} / {best['tiles'] * 1e6:.0f}"
            print(line, flush=True)


def decode_attention(torch) -> None:
    from attention_steps import random_attention_step

    print(f"decode attention (9 heads, 3 KV heads, head size 64, blocks of 16, shuffled), "
          f"bf16 path {op_path(torch)}; CPU ms per call [range over rounds], GB/s of K/V")
    for dtype in (torch.bfloat16, torch.float32):
        for rows in (1, 8, 32):
            for ctx in (128, 300, 1024):
                kv_bytes = rows * ctx * 2 * 3 * 64 * (2 if dtype == torch.bfloat16 else 4)
                count = max(2, -(-64_000_000 // kv_bytes))  # more than the L3 holds
                sides = {"kernel": [], "portable": [], "sdpa": []}
                if dtype != torch.bfloat16:
                    del sides["portable"]
                for rnd in range(3):
                    steps = []
                    for i in range(count):
                        md, cache, (q, _, _) = random_attention_step(
                            [1] * rows, [ctx] * rows, dtype, block_size=16, kv_heads=3,
                            heads=9, head_size=64, seed=rnd * 1000 + i)
                        steps.append((md, cache, q.view(rows, 9, 64), torch.empty(rows, 9, 64, dtype=dtype)))
                    order = list(sides) if rnd % 2 == 0 else list(sides)[::-1]
                    for side in order:
                        _decode_call(torch, side, *steps[0])
                        reps = max(1, 40 // count)
                        cpu = time.process_time()
                        for _ in range(reps):
                            for step in steps:
                                _decode_call(torch, side, *step)
                        sides[side].append((time.process_time() - cpu) / (reps * count))
                print(_sides_line(dtype, rows, ctx, sides, kv_bytes), flush=True)


def decode_attention_resident(torch) -> None:
    """bf16 decode attention with the step's K/V resident in the CPU caches (the
    same step called again and again): 4 rows x 300 tokens (0.9 MB, in L2) and
    32 x 300 (7.4 MB, L3), kernel and portable alternating, 8 rounds of 200 calls."""
    from attention_steps import random_attention_step

    print(f"decode attention, K/V resident (bf16, 9 heads, 3 KV heads, head size 64), "
          f"bf16 path {op_path(torch)}; CPU ms per call [range over rounds], GB/s of K/V")
    for rows, ctx in ((4, 300), (32, 300)):
        md, cache, (q, _, _) = random_attention_step(
            [1] * rows, [ctx] * rows, torch.bfloat16, block_size=16, kv_heads=3, heads=9,
            head_size=64, seed=1)
        step = (md, cache, q.view(rows, 9, 64), torch.empty(rows, 9, 64, dtype=torch.bfloat16))
        sides = {"kernel": [], "portable": []}
        for rnd in range(8):
            for side in (list(sides) if rnd % 2 == 0 else list(sides)[::-1]):
                for _ in range(5):
                    _decode_call(torch, side, *step)
                cpu = time.process_time()
                for _ in range(200):
                    _decode_call(torch, side, *step)
                sides[side].append((time.process_time() - cpu) / 200)
        kv_bytes = rows * ctx * 2 * 3 * 64 * 2
        print(_sides_line(torch.bfloat16, rows, ctx, sides, kv_bytes), flush=True)


def decode_attention_pages(torch) -> None:
    """The decode-attention kernel with its K/V cache in 4 KiB pages (as the
    engine's cache is: `_small_pages`) against the same bytes in 2 MiB
    transparent huge pages, alternating in one process, the pages resident
    before the clock starts: what the TLB costs the K/V stream."""
    from attention_steps import random_attention_step

    print(f"decode attention, K/V in 4 KiB against 2 MiB pages (bf16 path {op_path(torch)}); "
          f"CPU ms per call [range over rounds], GB/s of K/V; THP "
          f"{Path('/sys/kernel/mm/transparent_hugepage/enabled').read_text().strip()}")
    for dtype in (torch.bfloat16, torch.float32):
        for rows, ctx in ((32, 300), (8, 1024), (32, 1024)):
            kv_bytes = rows * ctx * 2 * 3 * 64 * dtype.itemsize
            count = max(2, -(-64_000_000 // kv_bytes))
            sides: dict[str, list[float]] = {"4k": [], "2m": []}
            huge = {}
            for rnd in range(6):
                built = [random_attention_step([1] * rows, [ctx] * rows, dtype, block_size=16,
                                               kv_heads=3, heads=9, head_size=64,
                                               seed=rnd * 1000 + i) for i in range(count)]
                steps = {}
                for side in sides:
                    before = _anon_huge_kb()
                    steps[side] = [(md, _paged_copy(torch, cache, side == "2m"),
                                    q.view(rows, 9, 64), torch.empty(rows, 9, 64, dtype=dtype))
                                   for md, cache, (q, _, _) in built]
                    huge[side] = _anon_huge_kb() - before
                order = list(sides) if rnd % 2 == 0 else list(sides)[::-1]
                for side in order:
                    _decode_call(torch, "kernel", *steps[side][0])
                    reps = max(1, 40 // count)
                    cpu = time.process_time()
                    for _ in range(reps):
                        for step in steps[side]:
                            _decode_call(torch, "kernel", *step)
                    sides[side].append((time.process_time() - cpu) / (reps * count))
                del steps, built
            notes = {side: f" (huge pages {huge[side] >> 10} MiB)" for side in sides}
            print(_sides_line(dtype, rows, ctx, sides, kv_bytes, notes)
                  + f" 4k/2m {min(sides['4k']) / min(sides['2m']):.2f}x", flush=True)


def decode_attention_layout(torch) -> None:
    """The decode-attention kernel on today's cache layout (a token's KV heads side
    by side: one head's rows of a block 16 x 128 bytes apart) against each KV head's
    rows of a block together (2 KiB in a row), the same kernel: the second side is
    3x the sequences with one KV head each, so every block holds one head's rows.
    Same bytes, same arithmetic; caches cycled so that every call reads from DRAM."""
    from attention_steps import random_attention_step

    print("decode attention, bf16, 32 x 300: KV heads interleaved in a block against one "
          "head's rows together; CPU ms per call [range over rounds], GB/s of K/V")
    rows, ctx, dtype = 32, 300, torch.bfloat16
    kv_bytes = rows * ctx * 2 * 3 * 64 * dtype.itemsize
    count = max(2, -(-64_000_000 // kv_bytes))
    shapes = {"interleaved": (rows, 3, 9), "head-contiguous": (3 * rows, 1, 3)}
    steps = {}
    for side, (n, kv_heads, heads) in shapes.items():
        built = [random_attention_step([1] * n, [ctx] * n, dtype, block_size=16,
                                       kv_heads=kv_heads, heads=heads, head_size=64, seed=i)
                 for i in range(count)]
        steps[side] = [(md, cache, q.view(n, heads, 64), torch.empty(n, heads, 64, dtype=dtype))
                       for md, cache, (q, _, _) in built]
    sides: dict[str, list[float]] = {side: [] for side in shapes}
    for rnd in range(6):
        for side in (list(sides) if rnd % 2 == 0 else list(sides)[::-1]):
            cpu = time.process_time()
            for md, cache, q, out in steps[side]:
                torch.ops.engine_kernels.paged_decode_attention(
                    out, q, cache, md.block_tables, md.seq_lens_tensor, md.query_start_loc,
                    torch.arange(q.shape[0]), 0.125, False)
            sides[side].append((time.process_time() - cpu) / count)
    print(_sides_line(dtype, rows, ctx, sides, kv_bytes), flush=True)


def _sides_line(dtype, rows: int, ctx: int, sides: dict[str, list[float]], kv_bytes: int,
                notes: dict[str, str] | None = None) -> str:
    """One line of a decode-attention part: each side's best CPU ms per call, the
    range over rounds and the K/V read rate at the best."""
    line = f"{str(dtype)[6:]:8s} rows {rows:2d} ctx {ctx:4d}:"
    for side, times in sides.items():
        best = min(times)
        line += (f" {side} {best * 1e3:.3f} [{best * 1e3:.3f}-{max(times) * 1e3:.3f}]"
                 f" {kv_bytes / best / 1e9:.1f} GB/s{(notes or {}).get(side, '')};")
    return line


def _paged_copy(torch, cache, huge: bool):
    """`cache` copied into its own anonymous mapping, advised for 2 MiB pages
    (`huge`) or 4 KiB ones, and so made resident."""
    import mmap

    region = mmap.mmap(-1, cache.nbytes + (2 << 20),
                       flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    region.madvise(mmap.MADV_HUGEPAGE if huge else mmap.MADV_NOHUGEPAGE)
    raw = torch.frombuffer(region, dtype=torch.uint8)
    start = -raw.data_ptr() % (2 << 20)
    out = raw[start:start + cache.nbytes].view(cache.dtype).view(cache.shape)
    out.copy_(cache)
    return out


def _anon_huge_kb() -> int:
    """This process's anonymous memory in transparent huge pages, KiB."""
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
        if line.startswith("AnonHugePages:"):
            return int(line.split()[1])
    return 0


def op_path(torch) -> str:
    return torch.ops.engine_kernels.paged_decode_attention_path()


def _decode_call(torch, side: str, md, cache, q, out) -> None:
    """One decode-attention call of `side` (kernel, portable or sdpa) on equal-length rows."""
    rows, ctx = q.shape[0], md.seq_lens[0]
    if side == "sdpa":
        width = -(-ctx // 16)
        blocks = md.block_tables[:, :width].reshape(-1)
        k, v = (cache[i].index_select(0, blocks).view(rows, width * 16, 3, 64)[:, :ctx]
                .transpose(1, 2) for i in (0, 1))
        torch.nn.functional.scaled_dot_product_attention(q.unsqueeze(2), k, v, scale=0.125,
                                                         enable_gqa=True)
    else:
        torch.ops.engine_kernels.paged_decode_attention(
            out, q, cache, md.block_tables, md.seq_lens_tensor, md.query_start_loc,
            torch.arange(rows), 0.125, side == "portable")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    ap.add_argument("--parts", default="attention,linears,argmax,prefill,fp32",
                    help="comma-separated: attention, linears, argmax, prefill, fp32, ggml, kquants, "
                         "decode_attention, decode_resident, kv_pages, kv_layout")
    ap.add_argument("--fp32-rows", default="1,4,32,256",
                    help="the fp32 part's row counts (comma-separated)")
    args = ap.parse_args()
    FP32_ROWS[:] = [int(rows) for rows in args.fp32_rows.split(",")]
    import torch

    from engine.kernels import kernels_available

    os.environ.setdefault("ENGINE_CPU_KERNELS", "build")
    if not kernels_available():
        print("the compiled kernels are unavailable (ENGINE_CPU_KERNELS=0?)", file=sys.stderr)
        return 1
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f}, "
          f"OpenMP wait: {os.environ.get('OMP_WAIT_POLICY') or 'spin ' + str(os.environ.get('GOMP_SPINCOUNT'))}")
    parts = {"attention": attention, "linears": linears, "argmax": argmax,
             "prefill": prefill, "fp32": fp32_linears, "ggml": ggml_linears, "kquants": k_quant_linears,
             "decode_attention": decode_attention, "decode_resident": decode_attention_resident,
             "kv_pages": decode_attention_pages, "kv_layout": decode_attention_layout}
    for part in args.parts.split(","):
        parts[part](torch)
    print(f"load average at the end {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
