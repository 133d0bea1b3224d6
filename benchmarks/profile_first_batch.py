"""Where a first batch spends the time a second batch of the same shapes does not.

    python benchmarks/profile_first_batch.py                 # the embedded default model
    python benchmarks/profile_first_batch.py --model DIR --dtype bfloat16

Builds `LLM(model)` (with its warm-up, as a user gets it), then runs two batches of
fresh random prompts of the same lengths (greedy, a few tokens each) under the torch
profiler, and prints each batch's wall time and the operators whose self CPU time
grew most from batch 2 to batch 1: what the warm-up leaves for the first request.
`bench_first_batch.py` measures the ratio across fresh processes; this says why.
With ``--no-profile`` it prints each batch's minor page faults instead (memory
touched for the first time: steady on a loaded machine, where the profiler's
times are not; the profiler's own buffers would count too). For the oneDNN
primitives a batch creates, run it with ``ONEDNN_VERBOSE=2`` and count the
``create:cache_miss`` lines between the batch markers.
"""

from __future__ import annotations

import argparse
import random
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from torch.profiler import ProfilerActivity, profile  # noqa: E402

import engine  # noqa: E402,F401 - before torch: it sets the OpenMP wait policy
from engine import LLM, SamplingParams  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="model folder (default: the embedded model)")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--lengths", type=int, nargs="+",
                    default=[16, 64, 128, 200, 256, 300, 350, 384])
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--no-profile", action="store_true",
                    help="no profiler: each batch's time and minor page faults only")
    args = ap.parse_args()

    llm = LLM(args.model, dtype=args.dtype) if args.model else LLM(dtype=args.dtype)
    vocab = llm.get_tokenizer().vocab_size
    params = SamplingParams(max_tokens=args.new_tokens, ignore_eos=True, temperature=0)
    self_cpu: dict[str, dict[str, float]] = {}
    for name, seed in (("batch 1", 1), ("batch 2", 2)):
        rng = random.Random(seed)
        prompts = [[rng.randrange(3, vocab) for _ in range(n)] for n in args.lengths]
        print(f"=== {name}", flush=True)
        if args.no_profile:
            faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            start = time.perf_counter()
            llm.generate(prompts, params, use_tqdm=False)
            elapsed = time.perf_counter() - start
            faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
            print(f"{name}: {elapsed:.4f} s, {faults} minor page faults", flush=True)
            continue
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            start = time.perf_counter()
            llm.generate(prompts, params, use_tqdm=False)
            elapsed = time.perf_counter() - start
        print(f"{name}: {elapsed:.4f} s", flush=True)
        self_cpu[name] = {e.key: e.self_cpu_time_total for e in prof.key_averages()}
    if args.no_profile:
        return 0
    first, second = self_cpu["batch 1"], self_cpu["batch 2"]
    growth = sorted(((first.get(k, 0.0) - second.get(k, 0.0), k) for k in set(first) | set(second)),
                    reverse=True)
    print("self CPU time, batch 1 minus batch 2:")
    for delta, key in growth[:args.top]:
        print(f"  {delta / 1000:8.2f} ms  {key}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
