"""The paged decode-attention kernel of two source trees against each other:
whether they compute the same bits, and how long a call takes.

    python benchmarks/bench_attention_ab.py --trees /path/to/main /path/to/change

Each tree's kernels are built (``ENGINE_CPU_KERNELS=build``: the library is cached
under a key of its sources, so two trees' builds live side by side) and run in
fresh processes of their own, alternating A, B, A, B for ``--rounds`` rounds.

- bits: both trees run the same random steps (float32 and bfloat16 caches; head
  sizes 64, 80 and 128; 1 to 12 query heads per KV head; contexts of 1 to 300
  tokens) and the outputs are compared bit for bit;
- time: float32 (what ``dtype="auto"`` runs on a CPU without bfloat16 arithmetic;
  ``--dtype bfloat16`` for a bfloat16 cache), 9 query heads over 3 KV heads of 64
  values (SmolLM2-135M), rows x context tokens as a decode step has them; "DRAM" cycles through enough steps that their K/V
  (more than 64 MB) cannot stay in the caches, "again" calls one step again and
  again. Best of 3 per process, wall ms per call, with the GB/s of K/V read.

The CPU model and flags and the load average are printed: say them next to any
figure taken from this.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from _trees import cpu_line, run_in_tree

CHILD = r"""
import os, sys, time, torch
sys.path.insert(0, sys.argv[1] + "/tests")
PORTABLE = os.environ.get("BENCH_ATTENTION_PORTABLE") == "1"
import engine.kernels as kernels
assert kernels.kernels_available(), "the kernels did not load"
from attention_steps import random_attention_step
ops = torch.ops.engine_kernels

def call(md, cache, q, out):
    ops.paged_decode_attention(out, q, cache, md.block_tables, md.seq_lens_tensor,
                               md.query_start_loc, torch.arange(q.shape[0]), 0.125, PORTABLE)

if sys.argv[2] == "bits":
    outs = {}
    lens = [37, 200, 16, 300, 1]
    for dtype in (torch.float32, torch.bfloat16):
        for heads, kv_heads, size in ((9, 3, 64), (8, 1, 128), (4, 4, 64), (12, 2, 128), (6, 3, 80)):
            md, cache, (q, _, _) = random_attention_step(
                [1] * len(lens), lens, dtype, block_size=16, kv_heads=kv_heads, heads=heads,
                head_size=size, seed=5)
            q = q.reshape(len(lens), heads, size)
            out = torch.empty_like(q)
            call(md, cache, q, out)
            outs[f"{dtype} {heads}/{kv_heads} x {size}"] = out
    torch.save(outs, sys.argv[3])
else:
    dtype = getattr(torch, sys.argv[3])
    for rows, ctx in ((1, 300), (8, 300), (32, 128), (32, 300), (32, 1024)):
        kv_bytes = rows * ctx * 2 * 3 * 64 * dtype.itemsize
        count = max(2, -(-64_000_000 // kv_bytes))
        steps = []
        for i in range(count):
            md, cache, (q, _, _) = random_attention_step(
                [1] * rows, [ctx] * rows, dtype, block_size=16, kv_heads=3, heads=9,
                head_size=64, seed=i)
            q = q.reshape(rows, 9, 64)
            steps.append((md, cache, q, torch.empty_like(q)))
        dram = again = float("inf")
        for _ in range(3):
            reps = max(1, 40 // count)
            t = time.perf_counter()
            for _ in range(reps):
                for step in steps:
                    call(*step)
            dram = min(dram, (time.perf_counter() - t) / (reps * count))
            t = time.perf_counter()
            for _ in range(100):
                call(*steps[0])
            again = min(again, (time.perf_counter() - t) / 100)
        print(f"{rows:2d} x {ctx:4d} tokens: DRAM {dram * 1e3:.3f} ms "
              f"({kv_bytes / dram / 1e9:.1f} GB/s), again {again * 1e3:.3f} ms "
              f"({kv_bytes / again / 1e9:.1f} GB/s)", flush=True)
"""


def _run(tree: Path, *args: str) -> str:
    return "\n".join(run_in_tree(tree, CHILD, str(tree), *args, ENGINE_CPU_KERNELS="build")) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trees", nargs=2, type=Path, required=True, metavar=("A", "B"),
                    help="two checkouts of the engine (the kernels' sources in each)")
    ap.add_argument("--rounds", type=int, default=2, help="timed processes per tree")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                    help="the cache and query dtype of the timed calls")
    ap.add_argument("--portable", action="store_true",
                    help="time the op's portable path (portable=True) instead of the native one")
    args = ap.parse_args()
    if args.portable:
        os.environ["BENCH_ATTENTION_PORTABLE"] = "1"  # the children inherit it
    trees = [tree.resolve() for tree in args.trees]
    print(f"CPU: {cpu_line()}; load average {os.getloadavg()[0]:.2f}", flush=True)
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        files = [Path(tmp) / f"{i}.pt" for i in range(2)]
        for tree, file in zip(trees, files, strict=True):
            _run(tree, "bits", str(file))
        a, b = (torch.load(file) for file in files)
        for key in a:
            diff = float((a[key].float() - b[key].float()).abs().max())
            print(f"bits {key}: {'equal' if torch.equal(a[key], b[key]) else f'differ (max {diff:.3g})'}")
    for rnd in range(args.rounds):
        for name, tree in zip("AB", trees, strict=True):
            for line in _run(tree, "time", args.dtype).splitlines():
                print(f"{name} round {rnd}: {line}", flush=True)
    print(f"load average at the end {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
