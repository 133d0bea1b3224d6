"""`engine._malloc.keep_freed_memory`: with it, memory freed by one step is reused
by the next instead of being faulted back in from the kernel (engine serve sets
it at start)."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import subprocess_env

# a step's worth of activations: ten 8 MiB buffers alive at once (a layer's
# outputs), all freed at the end of the step; ten steps
CHILD = """
import json, sys
import numpy as np
from engine._malloc import keep_freed_memory

def minor_faults():
    with open("/proc/self/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[7])

def step():
    live = [np.ones(2 << 20, dtype=np.float32) for _ in range(10)]
    del live

applied = keep_freed_memory() if sys.argv[1] == "keep" else None
step(), step()  # the first steps fault in either case
before = minor_faults()
for _ in range(10):
    step()
print(json.dumps({"applied": applied, "faults": minor_faults() - before}))
"""


def _run(mode: str, **env: str) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, mode], env=subprocess_env(**env),
                         capture_output=True, text=True, check=True, timeout=120).stdout
    return json.loads(out)


def test_freed_memory_is_reused_instead_of_faulted_back_in():
    plain = _run("plain")
    kept = _run("keep")
    assert kept["applied"] is True
    # 10 steps x 80 MiB is 204,800 pages: by default glibc gives the freed top of
    # the heap back after every step and faults it in again in the next
    assert plain["faults"] > 20_000, plain
    assert kept["faults"] < plain["faults"] / 20, (kept, plain)


def test_the_server_setting_can_be_turned_off():
    off = _run("keep", ENGINE_SERVER_KEEP_FREED_MEMORY="0")
    assert off["applied"] is False
    assert off["faults"] > 20_000, off
