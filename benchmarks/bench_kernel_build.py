"""The compiled kernels' build of two source trees against each other: how long
``python -m engine.kernels build`` takes from an empty cache, wall and CPU.

    python benchmarks/bench_kernel_build.py --trees /path/to/main /path/to/change

Each round builds tree A then tree B (then B, A in the next round, so neither side
always goes first), each in a fresh process with an empty ``ENGINE_KERNEL_CACHE``:
what a first ``engine kernels build`` on a new machine (or the test suite on a
fresh CI machine) pays. CPU is the build's user + system time, its compiler
processes included. The CPU model and the load average are printed: say them next
to any figure taken from this, and keep the machine otherwise quiet.
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time
from pathlib import Path

from _trees import cpu_line, run_in_tree

# what `engine kernels build` runs
CHILD = "import engine.kernels\nprint(engine.kernels.build())\n"


def build_once(tree: Path) -> tuple[float, float]:
    """(wall s, CPU s) of one build of `tree`'s kernels into an empty cache."""
    with tempfile.TemporaryDirectory(prefix="kernel-build-") as cache:
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        run_in_tree(tree, CHILD, ENGINE_KERNEL_CACHE=cache)
        wall = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trees", nargs=2, type=Path, required=True, metavar=("A", "B"))
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    trees = [t.resolve() for t in args.trees]
    print(f"CPU: {cpu_line()}; load before: {os.getloadavg()}")
    results: dict[str, list[tuple[float, float]]] = {"A": [], "B": []}
    for r in range(args.rounds):
        order = ("A", "B") if r % 2 == 0 else ("B", "A")
        for side in order:
            wall, cpu = build_once(trees[0] if side == "A" else trees[1])
            results[side].append((wall, cpu))
            print(f"round {r + 1} {side}: wall {wall:.1f} s, CPU {cpu:.1f} s, "
                  f"load {os.getloadavg()[0]:.2f}", flush=True)
    for side, tree in zip("AB", trees, strict=True):
        walls = [w for w, _ in results[side]]
        cpus = [c for _, c in results[side]]
        print(f"{side} ({tree}): wall {min(walls):.1f}-{max(walls):.1f} s, "
              f"CPU {min(cpus):.1f}-{max(cpus):.1f} s")


if __name__ == "__main__":
    main()
