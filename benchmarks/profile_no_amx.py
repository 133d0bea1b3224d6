"""Why bf16 prompts are slower than float32 ones on an Intel CPU with AMX set aside.

    python benchmarks/profile_no_amx.py            # both parts, two threads
    python benchmarks/profile_no_amx.py --rows 1024
    ONEDNN_MAX_CPU_ISA=AVX512_CORE python benchmarks/profile_no_amx.py --widened

Two measurements, on whatever CPU runs it:

1. The instruction peaks of one core: a register-only loop of 12 independent
   AVX512-BF16 dot products (``vdpbf16ps``: 32 multiply-adds of bf16 pairs into 16
   float32 lanes) and the same of float32 FMAs (``vfmadd231ps``: 16), in GFLOP/s.
   Built with g++ ``-march=native`` into a temporary folder; skipped where the
   compiler or the instructions are missing.
2. oneDNN's products at the prompt shapes of SmolLM-135M (q/k/v, o_proj, gate/up,
   down; `--rows` rows, 8 distinct weights per shape, packed as the engine packs
   them: `engine.ops.linear.pack_weight`), bf16 against float32, in the process's
   own oneDNN ISA: run it with ``ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16`` for the
   products a CPU without AMX gets (the script sets it unless --with-amx).

With --widened instead: oneDNN's bf16 product against the weight widened to
float32 and a float32 product (`engine.ops.linear.widened_linear`, what a CPU
without bf16 arithmetic runs), per layer of the four shapes, from 5 to 1,024 rows;
with ``ONEDNN_MAX_CPU_ISA=AVX512_CORE`` that is oneDNN on an AVX-512 CPU without
AVX512-BF16 (docs/prefill.md, "bfloat16 on a CPU without bfloat16 arithmetic").

docs/benchmarks.md ("AMX hidden from both sides") has the figures: one
``vdpbf16ps`` a cycle against two FMAs on the team's Xeon, so oneDNN's bf16
products there run at 0.6x its float32 ones once AMX is out of the way.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PEAK_CPP = r"""
#include <immintrin.h>
#include <chrono>
#include <cstdio>
#define R12(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7) X(8) X(9) X(10) X(11)
int main() {
  const long iters = 50000000;
  // distinct starting values: identical chains would be folded into one
#define DECL(i) __m512 a##i = _mm512_set1_ps((float)i); __m512 f##i = _mm512_set1_ps((float)i);
  R12(DECL)
  const __m512i p = _mm512_set1_epi16(0x3f80), q = _mm512_set1_epi16(0x3f80);
  const __m512 x = _mm512_set1_ps(1.0001f), y = _mm512_set1_ps(0.9999f);
  auto t0 = std::chrono::steady_clock::now();
  for (long n = 0; n < iters; ++n) {
#define DP(i) a##i = _mm512_dpbf16_ps(a##i, (__m512bh)p, (__m512bh)q);
    R12(DP)
  }
  auto t1 = std::chrono::steady_clock::now();
  for (long n = 0; n < iters; ++n) {
#define FM(i) f##i = _mm512_fmadd_ps(x, y, f##i);
    R12(FM)
  }
  auto t2 = std::chrono::steady_clock::now();
  float sink = 0;
#define SUM(i) sink += _mm512_reduce_add_ps(a##i) + _mm512_reduce_add_ps(f##i);
  R12(SUM)
  const double dp = std::chrono::duration<double>(t1 - t0).count();
  const double fm = std::chrono::duration<double>(t2 - t1).count();
  std::printf("%.1f %.1f %d\n", iters * 12 * 64.0 / dp / 1e9, iters * 12 * 32.0 / fm / 1e9,
              sink == 1.2345f);
  return 0;
}
"""

# SmolLM-135M's linear layers: (out features, in features)
SHAPES = {"q/k/v": (960, 576), "o_proj": (576, 576), "gate/up": (3072, 576), "down": (576, 1536)}


def instruction_peaks() -> None:
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    if shutil.which("g++") is None or "avx512_bf16" not in flags:
        print("instruction peaks: skipped (no g++ or no AVX512-BF16)")
        return
    with tempfile.TemporaryDirectory() as tmp:
        src, exe = Path(tmp, "peak.cpp"), Path(tmp, "peak")
        src.write_text(PEAK_CPP)
        subprocess.run(["g++", "-O2", "-march=native", str(src), "-o", str(exe)], check=True)
        runs = [subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout.split()
                for _ in range(3)]
    dp = max(float(r[0]) for r in runs)
    fma = max(float(r[1]) for r in runs)
    print(f"one core, best of 3: vdpbf16ps {dp:.0f} GFLOP/s, vfmadd231ps {fma:.0f} GFLOP/s "
          f"(bf16 / float32: {dp / fma:.2f}x)")


def onednn_products(rows: int, rounds: int) -> None:
    import torch

    from engine.ops.linear import onednn_linear, pack_weight

    print(f"oneDNN products, {rows} rows, {torch.get_num_threads()} threads, "
          f"ONEDNN_MAX_CPU_ISA={os.environ.get('ONEDNN_MAX_CPU_ISA', '(all)')}:")
    for dtype in (torch.bfloat16, torch.float32):
        total_s = total_flop = 0.0
        for name, (n, k) in SHAPES.items():
            weights = [pack_weight(torch.randn(n, k, dtype=dtype) * 0.02) for _ in range(8)]
            x = torch.randn(rows, k, dtype=dtype)
            for w in weights:
                onednn_linear(x, w, None)
            best = float("inf")
            for _ in range(rounds):
                start = time.perf_counter()
                for w in weights:
                    onednn_linear(x, w, None)
                best = min(best, (time.perf_counter() - start) / len(weights))
            flop = 2.0 * rows * n * k
            total_s += best
            total_flop += flop
            print(f"  {str(dtype):15} {name:8} {best * 1e6:8.0f} us  {flop / best / 1e9:6.0f} GFLOP/s")
        print(f"  {str(dtype):15} all four {total_s * 1e3:8.2f} ms  {total_flop / total_s / 1e9:6.0f} GFLOP/s")


def widened_against_onednn(rounds: int) -> None:
    import torch

    from engine.ops.linear import onednn_linear, pack_weight, widened_linear

    print(f"a layer's bf16 products, {torch.get_num_threads()} threads, "
          f"ONEDNN_MAX_CPU_ISA={os.environ.get('ONEDNN_MAX_CPU_ISA', '(all)')}:")
    for rows in (5, 8, 16, 32, 64, 128, 256, 1024):
        total = {"oneDNN bf16": 0.0, "widened": 0.0}
        for n, k in SHAPES.values():
            weights = [torch.randn(n, k, dtype=torch.bfloat16) * 0.02 for _ in range(4)]
            packed = [pack_weight(w) for w in weights]
            x = torch.randn(rows, k, dtype=torch.bfloat16)
            runs = {"oneDNN bf16": lambda x=x, packed=packed: [onednn_linear(x, p, None)
                                                               for p in packed],
                    "widened": lambda x=x, weights=weights: [widened_linear(x, w)
                                                             for w in weights]}
            for name, run in runs.items():
                run()
                best = float("inf")
                for _ in range(rounds):
                    start = time.perf_counter()
                    run()
                    best = min(best, (time.perf_counter() - start) / len(weights))
                total[name] += best
        print(f"  {rows:5} rows: oneDNN bf16 {total['oneDNN bf16'] * 1e3:7.3f} ms, widened "
              f"{total['widened'] * 1e3:7.3f} ms, widened / oneDNN "
              f"{total['widened'] / total['oneDNN bf16']:.2f}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--with-amx", action="store_true",
                    help="leave oneDNN's ISA alone (AMX where the CPU has it)")
    ap.add_argument("--widened", action="store_true",
                    help="oneDNN's bf16 products against widened float32 ones, 5-1,024 rows")
    args = ap.parse_args()
    if not args.with_amx and "ONEDNN_MAX_CPU_ISA" not in os.environ:
        # read by oneDNN when torch first uses it: set before the first product
        os.environ["ONEDNN_MAX_CPU_ISA"] = "AVX512_CORE_BF16"
    import torch

    torch.set_num_threads(args.threads)
    if args.widened:
        widened_against_onednn(args.rounds)
        return 0
    instruction_peaks()
    onednn_products(args.rows, args.rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
