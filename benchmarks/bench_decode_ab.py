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

The CPU model and the load average are printed: say them next to any figure.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import pathlib, random, sys, time
import engine.kernels as kernels
print("engine from", pathlib.Path(kernels.__file__).parents[2], flush=True)
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
    env = {**os.environ, "PYTHONPATH": str(tree), "ENGINE_CPU_KERNELS": "build"}
    proc = subprocess.run([sys.executable, "-c", CHILD, model, dtype, str(seed)], env=env,
                          cwd=tree, capture_output=True, text=True, check=False, timeout=1800)
    if proc.returncode != 0:
        raise SystemExit(f"{tree}: {proc.stderr[-2000:]}")
    lines = proc.stdout.splitlines()
    if lines[0] != f"engine from {tree}":
        raise SystemExit(f"{tree}: the child imported another tree's engine ({lines[0]})")
    return lines[-1]


def _cpu() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} CPUs"
    return f"{os.cpu_count()} CPUs"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trees", nargs=2, type=Path, required=True, metavar=("A", "B"))
    ap.add_argument("--model", required=True)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    trees = [tree.resolve() for tree in args.trees]
    print(f"CPU: {_cpu()}; load average {os.getloadavg()[0]:.2f}; {args.model} {args.dtype}",
          flush=True)
    for rnd in range(args.rounds):
        for side in (("A", "B") if rnd % 2 == 0 else ("B", "A")):
            tree = trees[0] if side == "A" else trees[1]
            print(f"{side} round {rnd}: {_run(tree, args.model, args.dtype, rnd)}", flush=True)
    print(f"load average at the end {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
