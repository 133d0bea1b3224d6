"""The engine's throughput under each OpenMP wait policy, alternating.

`import engine` sets ``OMP_WAIT_POLICY=PASSIVE`` when the user has not set it (threads
sleep while they wait: much better when other processes want the cores). This measures
what that costs on the workload of `bench_vs_vllm.py`'s `bench` model when the machine
is otherwise idle: each round starts one fresh process per policy ("" is libgomp's own
default), best of two timed runs each.

    python benchmarks/bench_omp_wait.py --rounds 2 --dtype bfloat16
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
POLICIES = ("PASSIVE", "")  # "" leaves libgomp's default (spin, then sleep)


def run_one(model_dir: str, dtype: str) -> float:
    sys.path.insert(0, str(HERE))
    import bench_generate
    import bench_vs_vllm as peer

    from engine import LLM, SamplingParams

    shape, _n, p_rng, o_rng = peer.WORKLOADS["bench"]
    shape = shape or bench_generate.MODEL
    prompts, out_lens = peer.workload(_n, p_rng, o_rng, shape["vocab_size"], 0)
    llm = LLM(model_dir, dtype=dtype, kv_cache_memory=2 * 2**30, seed=0)
    params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in out_lens]
    prompts = [list(p) for p in prompts]
    llm.generate(prompts[:4], params[:4])  # warm-up
    best = 0.0
    for _ in range(2):
        start = time.perf_counter()
        llm.generate(prompts, params)
        best = max(best, sum(out_lens) / (time.perf_counter() - start))
    return best


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(run_one(args.worker, args.dtype))
        return 0
    sys.path.insert(0, str(HERE))
    import bench_generate

    results: dict[str, list[float]] = {p: [] for p in POLICIES}
    load = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        bench_generate.build_model(Path(tmp), 0, bench_generate.MODEL)
        for r in range(args.rounds):
            order = POLICIES if r % 2 == 0 else POLICIES[::-1]
            for policy in order:
                env = dict(os.environ, OMP_WAIT_POLICY=policy, ENGINE_CPU_KERNELS="build")
                out = subprocess.run([sys.executable, __file__, "--worker", tmp,
                                      "--dtype", args.dtype], env=env, check=True,
                                     capture_output=True, text=True).stdout
                results[policy].append(float(out.strip().splitlines()[-1]))
    ratios = [p / d for p, d in zip(results["PASSIVE"], results[""], strict=True)]
    print(f"load average {load[0]:.1f} -> {os.getloadavg()[0]:.1f}, {args.dtype}, "
          f"{args.rounds} rounds")
    for policy, values in results.items():
        print(f"  OMP_WAIT_POLICY={policy or '(default)':9s} best {max(values):7.1f} tok/s "
              f"rounds {', '.join(f'{v:.1f}' for v in values)}")
    print(f"  PASSIVE / default per round: {min(ratios):.2f}-{max(ratios):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
