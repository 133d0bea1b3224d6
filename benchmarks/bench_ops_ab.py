"""The element-wise kernels of two source trees against each other: the same bits,
and how long a call takes.

    python benchmarks/bench_ops_ab.py --trees /path/to/main /path/to/change --dtype bfloat16

Each tree's kernels are built (``ENGINE_CPU_KERNELS=build``; the library is cached
under a key of its sources) and run in fresh processes of their own, in the tree's
folder (``python -c`` puts the working folder ahead of PYTHONPATH), alternating
A, B, B, A, ... for ``--rounds`` rounds. The ops: ``silu_and_mul`` (32 and 512 rows
of 2 x 1,536), ``rms_norm`` (32 and 512 rows of 576: SmolLM2-135M's sizes) and
``ggml_dequantize`` of a Q8_0 1,536 x 576 weight (what a quantized prompt step
expands per tile); best of 5 loops per process, µs per call, in cache (one input
again and again: this measures the kernels' instructions, not memory).

The CPU model and the load average are printed: say them next to any figure.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from _trees import cpu_line, run_in_tree

CHILD = r"""
import sys, time
import numpy as np, torch
import engine.kernels as kernels
assert kernels.kernels_available(), "the kernels did not load"
ops = torch.ops.engine_kernels
dtype = getattr(torch, sys.argv[1])
gen = torch.Generator().manual_seed(0)
calls, outputs = {}, {}
for rows in (32, 512):
    x = torch.randn(rows, 3072, generator=gen).to(dtype)
    out = torch.empty(rows, 1536, dtype=dtype)
    calls[f"silu_and_mul {rows} x 1,536"] = (lambda out=out, x=x: ops.silu_and_mul(out, x), out)
    x = torch.randn(rows, 576, generator=gen).to(dtype)
    w = torch.randn(576, generator=gen).to(dtype)
    o = torch.empty_like(x)
    calls[f"rms_norm {rows} x 576"] = (lambda o=o, x=x, w=w: ops.rms_norm(o, x, w, 1e-5), o)
rng = np.random.default_rng(0)
blocks = np.zeros((1536, 18, 34), dtype=np.uint8)  # Q8_0: a float16 scale, 32 int8
blocks[:, :, :2] = np.full((1536, 18), 0.01, dtype=np.float16).view(np.uint8).reshape(1536, 18, 2)
blocks[:, :, 2:] = rng.integers(0, 256, size=(1536, 18, 32), dtype=np.uint8)
stored = torch.from_numpy(blocks.reshape(1536, -1))
dq = torch.empty(1536, 576, dtype=dtype)
calls["ggml_dequantize Q8_0 1,536 x 576"] = (lambda: ops.ggml_dequantize(dq, stored, 8, False), dq)
for name, (fn, out) in calls.items():
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(50):
            fn()
        best = min(best, (time.perf_counter() - t) / 50)
    outputs[name] = out.clone()
    print(f"{name}: {best * 1e6:.1f} us", flush=True)
torch.save(outputs, sys.argv[2])
"""


def _run(tree: Path, dtype: str, out: Path) -> list[str]:
    return run_in_tree(tree, CHILD, dtype, str(out), ENGINE_CPU_KERNELS="build")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trees", nargs=2, type=Path, required=True, metavar=("A", "B"))
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="bfloat16")
    args = ap.parse_args()
    trees = [tree.resolve() for tree in args.trees]
    print(f"CPU: {cpu_line()}; load average {os.getloadavg()[0]:.2f}; {args.dtype}", flush=True)
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        saved: dict[str, Path] = {}
        for rnd in range(args.rounds):
            order = ("A", "B") if rnd % 2 == 0 else ("B", "A")
            for side in order:
                tree = trees[0] if side == "A" else trees[1]
                saved[side] = Path(tmp) / f"{side}.pt"
                for line in _run(tree, args.dtype, saved[side]):
                    print(f"{side} round {rnd}: {line}", flush=True)
        a, b = torch.load(saved["A"]), torch.load(saved["B"])
        for name in a:
            print(f"bits {name}: {'equal' if torch.equal(a[name], b[name]) else 'DIFFER'}")
    print(f"load average at the end {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
