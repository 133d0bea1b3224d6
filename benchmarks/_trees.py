"""What the benchmarks that run two source trees against each other share
(bench_attention_ab.py, bench_ops_ab.py, bench_decode_ab.py, bench_kernel_build.py):
a child process that really runs its own tree's engine, and the CPU line to print
next to the figures."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

# the child's first line: which checkout's engine it imported
_SAYS_ITS_ENGINE = ('import pathlib as _p, engine as _e\n'
                    'print("engine from", _p.Path(_e.__file__).parents[1], flush=True)\n')


def run_in_tree(tree: Path, code: str, *args: str, timeout: float = 1800,
                **env: str) -> list[str]:
    """Run ``python -c code args`` on `tree`'s engine and return its stdout lines.

    The child runs in the tree's folder, with the tree first on PYTHONPATH: ``python
    -c`` (and ``-m``) put the working folder ahead of PYTHONPATH, so a child started
    from another checkout would import that one's engine (as this project's A/B
    scripts once did, comparing a kernel with itself). The child's first line says
    which engine it imported; anything else stops the benchmark."""
    proc = subprocess.run([sys.executable, "-c", _SAYS_ITS_ENGINE + code, *args],
                          env={**os.environ, "PYTHONPATH": str(tree), **env}, cwd=tree,
                          capture_output=True, text=True, check=False, timeout=timeout)
    if proc.returncode != 0:
        raise SystemExit(f"{tree}: {proc.stderr[-2000:]}")
    first, *rest = proc.stdout.splitlines() or [""]
    if first != f"engine from {tree}":
        raise SystemExit(f"{tree}: the child imported another tree's engine ({first})")
    return rest


def cpu_line() -> str:
    """The CPU's model, the flags the kernels choose paths by, and the core count."""
    model = flags = ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name") and not model:
            model = line.split(":", 1)[1].strip()
        if line.startswith("flags") and not flags:
            wanted = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile")
            flags = " ".join(f for f in line.split(":", 1)[1].split() if f in wanted)
    return f"{model} ({flags}), {os.cpu_count()} CPUs"
