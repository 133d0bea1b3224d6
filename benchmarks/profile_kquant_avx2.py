"""One K-quant product on one thread, per kernel path: what a decode step's down
projection of a mixed GGUF file (SmolLM2's Q4_K_M: 576 x 1536, Q4_K or Q6_K) costs.

    python benchmarks/profile_kquant_avx2.py
    python benchmarks/profile_kquant_avx2.py --shape 2048x2048 --rows 1,4 --rounds 5
    PYTHONPATH=/path/to/other/checkout python benchmarks/profile_kquant_avx2.py

Blocks are the engine's own quantizers' (engine.quantization.kquants) on random
float weights. Each line: the type, the path, the activation rows, the best and
worst round's µs per `ggml_linear` call (each round the mean of `--calls` calls,
the call through torch's dispatcher included) and the GB/s of blocks at the best
round. Paths run alternately in every round, so a noisy machine moves them alike.
The one weight stays in the caches across calls: this times the kernels'
arithmetic, not a decode step's reads from memory (profile_quant_decode.py).
Run it under two checkouts (PYTHONPATH) to compare kernels across commits: the
compiled kernels are keyed by their sources, each checkout builds its own.
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np
import torch

from engine import kernels
from engine.quantization.ggml import GGML_TYPES, PATHS, kernel_paths
from engine.quantization.kquants import quantize_q4_k, quantize_q5_k, quantize_q6_k

QUANTIZERS = {"Q4_K": quantize_q4_k, "Q5_K": quantize_q5_k, "Q6_K": quantize_q6_k}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="576x1536", help="N x K of the weight")
    parser.add_argument("--types", default="Q4_K,Q5_K,Q6_K")
    parser.add_argument("--rows", default="1,4", help="activation rows per call")
    parser.add_argument("--paths", default=None, help="default: every int8 path this CPU runs")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=2000)
    args = parser.parse_args()
    if not kernels.kernels_available():
        kernels.build()
        kernels.kernels_available()
    torch.set_num_threads(1)
    n, k = (int(v) for v in args.shape.split("x"))
    paths = args.paths.split(",") if args.paths else [p for p in kernel_paths()]
    print(f"# {platform.processor() or platform.machine()}, cpu flags: "
          f"{' '.join(sorted(f for f in kernels.cpu_flags() if f.startswith(('avx', 'amx', 'fma', 'f16c'))))}")
    values = np.random.default_rng(0).standard_normal((n, k)).astype(np.float32)
    for qtype in args.types.split(","):
        blocks = torch.from_numpy(QUANTIZERS[qtype](values))
        type_id = GGML_TYPES[qtype][0]
        for rows in (int(r) for r in args.rows.split(",")):
            x = torch.randn(rows, k)
            out = torch.empty(rows, n)
            times: dict[str, list[float]] = {p: [] for p in paths}
            for _ in range(args.rounds):
                for path in paths:
                    call = torch.ops.engine_kernels.ggml_linear.default
                    code = PATHS[path][0]
                    for _ in range(50):
                        call(out, x, blocks, type_id, None, code, False)
                    start = time.perf_counter()
                    for _ in range(args.calls):
                        call(out, x, blocks, type_id, None, code, False)
                    times[path].append((time.perf_counter() - start) / args.calls)
            for path, ts in times.items():
                print(f"{qtype} {path:12s} rows={rows}: {min(ts) * 1e6:7.1f} µs "
                      f"(rounds {min(ts) * 1e6:.1f}-{max(ts) * 1e6:.1f}), "
                      f"{blocks.numel() / min(ts) / 1e9:5.1f} GB/s", flush=True)


if __name__ == "__main__":
    main()
