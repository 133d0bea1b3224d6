"""This checkout's engine against the same engine at another commit, on
`bench_vs_vllm.py`'s workload (fresh prompts every round, sides alternating).

    python benchmarks/bench_engine_ab.py --base 6603039                  # bf16, smol
    python benchmarks/bench_engine_ab.py --base 6603039 --dtypes float32,bfloat16 --rounds 3
    python benchmarks/bench_engine_ab.py --base /path/to/other/checkout
    python benchmarks/bench_engine_ab.py --base bcafaa5 --model model.Q4_1.gguf --dtypes auto

The host's speed drifts by 10-20% between minutes (docs/benchmarks.md), so a figure
from one run set against a figure from an earlier run says little about a change:
this runs both versions in the same minutes, each in its own long-lived worker
process (`bench_vs_vllm.py --worker engine` of its own checkout, with that
checkout first on ``PYTHONPATH``), and prints each side's best round and the
per-round ratios. A commit is checked out into a temporary git worktree, removed
afterwards; each side builds its compiled kernels when missing (once per source
version).

Read ratios within ~5% of 1 as noise, and decode within ~15%: run against its own
commit (A/A, bf16, three rounds, 2026-12-06) the tool gave the checkout side
0.93–0.97x the throughput and 0.86–0.96x the decode speed of the worktree side,
because the checkout's process is started first: with ``--base-first`` the same A/A
gave the checkout 1.19x the decode speed (docs/benchmarks.md). For a decode figure,
run both orders.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_generate  # noqa: E402
from _peer_process import Side  # noqa: E402
from bench_vs_vllm import (  # noqa: E402
    ROWS,
    WORKLOADS,
    FreshPrompts,
    cpu_description,
    measure_pair,
    note,
    request_lengths,
)


def start_engine(name: str, checkout: Path, model: Path, dtype: str) -> Side:
    env = dict(os.environ, PYTHONPATH=str(checkout), HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", ENGINE_CPU_KERNELS="build")
    cmd = [sys.executable, str(checkout / "benchmarks" / "bench_vs_vllm.py"), "--worker",
           "engine", "--model-dir", str(model), "--dtype", dtype]
    return Side(name, cmd, env, checkout)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", required=True, help="a commit of this repository, or a checkout")
    ap.add_argument("--dtypes", default="bfloat16", help="comma-separated")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", type=Path,
                    help="this model (a GGUF file, a model folder) instead of the random smol "
                         "one; its prompts draw token ids below 32,000")
    ap.add_argument("--base-first", action="store_true",
                    help="start the base side's process first (see above)")
    args = ap.parse_args()

    note(f"CPU: {cpu_description()}; load average {os.getloadavg()}")
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(args.base)
        worktree = None
        if not (base / "engine").is_dir():
            worktree = Path(tmp, "base")
            subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "-q", "--detach",
                            str(worktree), args.base], check=True)
            base = worktree
        try:
            shape, n, p_rng, o_rng = WORKLOADS["smol"]
            if args.model:
                folder, vocab = args.model.resolve(), 32000
            else:
                folder, vocab = Path(tmp, "smol"), shape["vocab_size"]
                folder.mkdir()
                bench_generate.build_model(folder, args.seed, shape)
            prompt_lens, out_lens = request_lengths(n, p_rng, o_rng, args.seed)
            for dtype in args.dtypes.split(","):
                sides = {}
                try:
                    order = [("this", ROOT), ("base", base)]
                    for name, checkout in (order[::-1] if args.base_first else order):
                        sides[name] = start_engine(name, checkout, folder, dtype)
                    fresh = FreshPrompts(vocab, args.seed + 1)
                    warm = fresh(*prompt_lens[:4])
                    for side in sides.values():
                        side.ask(prompts=warm, out_lens=[8] * 4)
                    load = os.getloadavg()
                    runs = measure_pair(sides, prompt_lens, out_lens, args.rounds, fresh,
                                        cached=False)
                finally:
                    for side in sides.values():
                        side.close()
                print(f"\n{args.model.name if args.model else 'smol'}, {dtype}: this checkout "
                      f"against {args.base}; load average "
                      f"{load[0]:.1f} -> {os.getloadavg()[0]:.1f}; OpenMP wait: "
                      + ", ".join(f"{name} {side.ready.get('omp_wait')}"
                                  for name, side in sides.items()))
                for label, key, fmt in ROWS:
                    if key not in runs["this"]:
                        continue
                    higher_better = key.startswith("tok_s")
                    pick = max if higher_better else min
                    this, other = pick(runs["this"][key]), pick(runs["base"][key])
                    per_round = [a / b if higher_better else b / a
                                 for a, b in zip(runs["this"][key], runs["base"][key],
                                                 strict=True)]
                    print(f"  {label:38s} this {fmt.format(this):>8s}  base "
                          f"{fmt.format(other):>8s}  this/base "
                          f"{(this / other if higher_better else other / this):.2f}x  "
                          f"(per round {min(per_round):.2f}-{max(per_round):.2f})")
        finally:
            if worktree is not None:
                subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force",
                                str(worktree)], check=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
