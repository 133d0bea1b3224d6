"""Decode speed of two source trees against each other, end to end, on one model.

    python benchmarks/bench_decode_ab.py --trees /path/to/main /path/to/change \\
        --model /path/to/model --dtype float32

Each side runs in a fresh process of its own, in its tree's folder (``python -c``
puts the working folder ahead of PYTHONPATH), with the compiled kernels built for
its sources (``ENGINE_CPU_KERNELS=build``), alternating A, B, B, A, ... for
``--rounds`` rounds. A process loads the model, runs one untimed batch, then times
32 fresh prompts at once (continuous batching: decode steps of up to 32 rows) and
one fresh prompt alone, 64 new tokens each (``ignore_eos``), prompts of
``--prompt-words`` words (24): output tokens per second and ms per token, every
prompt new (no prefix-cache hits). Then decode alone: 32 fresh prompts are
prefilled (one token each) and run again for 65 tokens, their prompts now
prefix-cache hits, which times their decode steps (the one case here that reuses
a prompt, on purpose).

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
model, dtype, seed, length = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
words = "the a of to in is it that for on with as was at by an be this from or".split()
rng = random.Random(seed)
def prompts(n):
    return [" ".join(rng.choice(words) for _ in range(length)) + f" {rng.random()}"
            for _ in range(n)]
params = SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True)
llm = LLM(model, dtype=dtype, kv_cache_memory=2 << 30)  # every prompt below stays cached
assert kernels.kernels_available(), "the kernels did not load"
llm.generate(prompts(32), params)
t = time.perf_counter()
out = llm.generate(prompts(32), params)
batched = sum(len(o.outputs[0].token_ids) for o in out) / (time.perf_counter() - t)
t = time.perf_counter()
out = llm.generate(prompts(1), params)
single = (time.perf_counter() - t) / len(out[0].outputs[0].token_ids)
# decode alone: 32 fresh prompts prefilled first (one token each), then the same
# prompts again for 65 tokens, their prompts now prefix-cache hits: the time is
# their 64 decode steps (and one step of their last prompt tokens)
again = prompts(32)
llm.generate(again, SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True))
t = time.perf_counter()
out = llm.generate(again, SamplingParams(temperature=0.0, max_tokens=65, ignore_eos=True))
decode = sum(len(o.outputs[0].token_ids) - 1 for o in out) / (time.perf_counter() - t)
print(f"32 at once {batched:.1f} tok/s, one alone {single * 1e3:.2f} ms/token, "
      f"32 decoding after their prompts {decode:.1f} tok/s", flush=True)
llm.shutdown()
"""


def _run(tree: Path, model: str, dtype: str, seed: int, words: int) -> str:
    return run_in_tree(tree, CHILD, model, dtype, str(seed), str(words),
                       ENGINE_CPU_KERNELS="build")[-1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trees", nargs=2, type=Path, required=True, metavar=("A", "B"))
    ap.add_argument("--model", required=True)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--prompt-words", type=int, default=24,
                    help="words a prompt (about a token each): longer contexts weigh "
                         "decode attention more")
    args = ap.parse_args()
    trees = [tree.resolve() for tree in args.trees]
    print(f"CPU: {cpu_line()}; load average {os.getloadavg()[0]:.2f}; {args.model} {args.dtype}; "
          f"prompts of {args.prompt_words} words", flush=True)
    for rnd in range(args.rounds):
        for side in (("A", "B") if rnd % 2 == 0 else ("B", "A")):
            tree = trees[0] if side == "A" else trees[1]
            result = _run(tree, args.model, args.dtype, rnd, args.prompt_words)
            print(f"{side} round {rnd}: {result}", flush=True)
    print(f"load average at the end {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
