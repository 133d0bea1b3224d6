"""Decode speed of two source trees against each other, end to end, on one model.

    python benchmarks/bench_decode_ab.py --trees /path/to/main /path/to/change \\
        --model /path/to/model --dtype float32

Each side runs in a fresh process of its own, in its tree's folder (``python -c``
puts the working folder ahead of PYTHONPATH), with the compiled kernels built for
its sources (``ENGINE_CPU_KERNELS=build``), alternating A, B, B, A, ... for
``--rounds`` rounds. A process loads the model, runs one untimed batch, then times
32 fresh prompts at once (continuous batching: decode steps of up to 32 rows) and
one fresh prompt alone, 64 new tokens each (``ignore_eos``): output tokens per
second and ms per token. Every timed prompt is new (no prefix-cache hits).

For throughput on `bench_vs_vllm.py`'s serving workload (long-lived workers,
per-round ratios, a commit checked out for you) use `bench_engine_ab.py`; this one
is the quick look at decode through ``LLM.generate``.

The CPU model and the load average are printed: say them next to any figure.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from _trees import cpu_line, run_in_tree

CHILD = r"""
import random, sys, time
import engine.kernels as kernels
from engine import LLM, SamplingParams
model, dtype, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
words = "the a of to in is it that for on with as was at by an be this from or".split()
rng = random.Random(seed)
def prompts(n):
    return [" ".join(rng.choice(words) for _ in range(24)) + f" {rng.random()}" for _ in range(n)]
params = SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True)
llm = LLM(model, dtype=dtype)
assert kernels.kernels_available(), "the kernels did not load"
llm.generate(prompts(32), params)
t = time.perf_counter()
out = llm.generate(prompts(32), params)
batched = sum(len(o.outputs[0].token_ids) for o in out) / (time.perf_counter() - t)
t = time.perf_counter()
out = llm.generate(prompts(1), params)
single = (time.perf_counter() - t) / len(out[0].outputs[0].token_ids)
print(f"32 at once {batched:.1f} tok/s, one alone {single * 1e3:.2f} ms/token", flush=True)
llm.shutdown()
"""


def _run(tree: Path, model: str, dtype: str, seed: int) -> str:
    return run_in_tree(tree, CHILD, model, dtype, str(seed), ENGINE_CPU_KERNELS="build")[-1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trees", nargs=2, type=Path, required=True, metavar=("A", "B"))
    ap.add_argument("--model", required=True)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    trees = [tree.resolve() for tree in args.trees]
    print(f"CPU: {cpu_line()}; load average {os.getloadavg()[0]:.2f}; {args.model} {args.dtype}",
          flush=True)
    for rnd in range(args.rounds):
        for side in (("A", "B") if rnd % 2 == 0 else ("B", "A")):
            tree = trees[0] if side == "A" else trees[1]
            print(f"{side} round {rnd}: {_run(tree, args.model, args.dtype, rnd)}", flush=True)
    print(f"load average at the end {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
