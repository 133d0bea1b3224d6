"""The engine's throughput under each OpenMP wait setting, alternating.

`import engine` chooses how idle OpenMP threads wait when the user has set neither
``OMP_WAIT_POLICY`` nor ``GOMP_SPINCOUNT``: a short spin (``GOMP_SPINCOUNT=20000``)
when a core is idle, sleeping (``PASSIVE``) when the cores are busy. This measures
the three candidates on the workload of `bench_vs_vllm.py`'s `bench` model: each
round starts one fresh process per setting, best of two timed runs each.
``--busy N`` keeps N busy-looping processes running meanwhile (a loaded machine).

    python benchmarks/bench_omp_wait.py --rounds 2 --dtype bfloat16
    python benchmarks/bench_omp_wait.py --rounds 2 --dtype bfloat16 --busy 2
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
# label -> environment; OMP_WAIT_POLICY="" leaves libgomp's default (spin ~300k, then sleep)
POLICIES = {
    "PASSIVE": {"OMP_WAIT_POLICY": "PASSIVE"},
    "spin 20000": {"GOMP_SPINCOUNT": "20000"},
    "libgomp default": {"OMP_WAIT_POLICY": ""},
}


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
    ap.add_argument("--busy", type=int, default=0,
                    help="busy-looping processes to run meanwhile (a loaded machine)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(run_one(args.worker, args.dtype))
        return 0
    sys.path.insert(0, str(HERE))
    import bench_generate

    results: dict[str, list[float]] = {p: [] for p in POLICIES}
    busy = [subprocess.Popen([sys.executable, "-c", "import time\nend = time.time() + 3600\n"
                              "while time.time() < end: pass"]) for _ in range(args.busy)]
    try:
        load = os.getloadavg()
        with tempfile.TemporaryDirectory() as tmp:
            bench_generate.build_model(Path(tmp), 0, bench_generate.MODEL)
            names = list(POLICIES)
            for r in range(args.rounds):
                for policy in (names if r % 2 == 0 else names[::-1]):
                    env = {k: v for k, v in os.environ.items()
                           if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
                    env.update(POLICIES[policy], ENGINE_CPU_KERNELS="build")
                    out = subprocess.run([sys.executable, __file__, "--worker", tmp,
                                          "--dtype", args.dtype], env=env, check=True,
                                         capture_output=True, text=True).stdout
                    results[policy].append(float(out.strip().splitlines()[-1]))
    finally:
        for p in busy:
            p.kill()
            p.wait()
    print(f"load average {load[0]:.1f} -> {os.getloadavg()[0]:.1f}, {args.dtype}, "
          f"{args.rounds} rounds, {args.busy} busy processes")
    for policy, values in results.items():
        print(f"  {policy:16s} best {max(values):7.1f} tok/s "
              f"rounds {', '.join(f'{v:.1f}' for v in values)}")
    for policy in ("spin 20000", "libgomp default"):
        ratios = [a / b for a, b in zip(results[policy], results["PASSIVE"], strict=True)]
        print(f"  {policy} / PASSIVE per round: {min(ratios):.2f}-{max(ratios):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
