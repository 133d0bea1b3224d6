"""Plugin indirection must cost nothing: the example out-of-tree platform
(examples/acme-platform: its own worker, attention backend and torch.library
RMSNorm kernel, all computing on the CPU) against the built-in CPU platform, and
tensor parallelism (TP=2 against TP=1), on the engine-core benchmark's model
and workload (benchmarks/bench_generate.py), in the same run.

    python benchmarks/bench_platform.py            # 64 requests, as bench_generate
    python benchmarks/bench_platform.py --quick    # 16 short requests

Rounds alternate (A B A B ...) so a change in machine load hits both sides; the
best round of each side counts. One torch thread per process.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ACME = ROOT / "examples" / "acme-platform"
sys.path.insert(0, str(ROOT / "benchmarks"))
# the example plugin without installing it: its manifest, as a plugin dir
os.environ["ENGINE_PLUGIN_DIRS"] = str(ACME / "manifest")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import bench_generate as bg  # noqa: E402  (builds the model and the workload)
import torch  # noqa: E402


def compare(engines: dict, prompts, out_lens, rounds: int) -> dict:
    """Output tokens/s of two engines (A, B), alternating after one warm-up round
    each: the best round of each, and the median of the per-round B/A ratios."""
    for llm in engines.values():  # warm-up: first-touch allocations, caches
        bg.engine_throughput(llm, prompts[:4], out_lens[:4])
    runs: dict[str, list[float]] = {name: [] for name in engines}
    for r in range(rounds):
        for name, llm in engines.items():
            elapsed, produced = bg.engine_throughput(llm, prompts, out_lens)
            runs[name].append(produced / elapsed)
            bg.note(f"round {r + 1} {name}: {produced / elapsed:.1f} tok/s")
    a, b = runs.values()
    ratios = [y / x for x, y in zip(a, b, strict=True)]
    return {"a": max(a), "b": max(b), "best_ratio": max(b) / max(a),
            "median_ratio": statistics.median(ratios),
            "ratio_range": (min(ratios), max(ratios))}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    from engine import LLM

    n_req, p_rng, o_rng = (16, (16, 128), (16, 64)) if args.quick else (64, (16, 512), (16, 256))
    prompts, out_lens = bg.workload(n_req, p_rng, o_rng, args.seed)
    kv = 256 * 2**20
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        params_m = bg.build_model(folder, args.seed) / 1e6
        # built one after the other: each engine binds its platform's classes when built
        engines = {
            "cpu": LLM(folder, platform="cpu", kv_cache_memory=kv, seed=args.seed,
                       dtype="float32"),
            "acme": LLM(folder, platform="acme", kv_cache_memory=kv, seed=args.seed,
                       dtype="float32"),
        }
        platform = compare(engines, prompts, out_lens, args.rounds)
        for llm in engines.values():
            llm.shutdown()
        engines = {
            "tp1": LLM(folder, platform="cpu", kv_cache_memory=kv, seed=args.seed,
                       dtype="float32"),
            "tp2": LLM(folder, platform="cpu", kv_cache_memory=kv, seed=args.seed,
                       dtype="float32", tensor_parallel_size=2),
        }
        tp = compare(engines, prompts, out_lens, args.rounds)
        for llm in engines.values():
            llm.shutdown()
    load = os.getloadavg()[0]
    print(f"model: random Llama {params_m:.1f}M params; {n_req} requests, "
          f"{sum(out_lens)} output tokens; best of {args.rounds} alternating rounds; "
          f"load average {load:.1f}")
    print("| comparison | A best tok/s | B best tok/s | B / A (best) "
          "| B / A (median of rounds) | per-round B / A |")
    print("|---|---:|---:|---:|---:|---|")
    for label, r in (("built-in cpu (A) vs acme plugin (B)", platform),
                     ("TP=1 (A) vs TP=2 (B)", tp)):
        print(f"| {label} | {r['a']:.1f} | {r['b']:.1f} | {r['best_ratio']:.3f}x "
              f"| **{r['median_ratio']:.3f}x** "
              f"| {r['ratio_range'][0]:.3f}-{r['ratio_range'][1]:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
