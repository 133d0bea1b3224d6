"""`engine._malloc.keep_freed_memory`: with it, memory freed by one step is reused
by the next instead of being faulted back in from the kernel (every CPU worker
sets it up: offline `LLM` and `engine serve` alike)."""

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

if sys.argv[1] == "keep":
    applied = keep_freed_memory()
elif sys.argv[1] == "engine":  # an offline engine in this process: its worker sets it
    from engine import LLM
    LLM(sys.argv[2], dtype="float32", kv_cache_memory=1 << 22)
    applied = None
else:
    applied = None
step(), step()  # the first steps fault in either case
before = minor_faults()
for _ in range(10):
    step()
print(json.dumps({"applied": applied, "faults": minor_faults() - before}))
"""


def _run(mode: str, *args: str, **env: str) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, mode, *args], env=subprocess_env(**env),
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


def test_the_setting_can_be_turned_off_by_either_name():
    for name in ("ENGINE_KEEP_FREED_MEMORY", "ENGINE_SERVER_KEEP_FREED_MEMORY"):
        off = _run("keep", **{name: "0"})
        assert off["applied"] is False, name
        assert off["faults"] > 20_000, (name, off)


def test_an_offline_engine_keeps_freed_memory(make_hf_model):
    """Not only `engine serve`: the worker of an offline `LLM` applies it (its
    prefill steps took 1.2-1.3x the time without it), unless turned off."""
    model = str(make_hf_model("llama"))
    kept = _run("engine", model)
    off = _run("engine", model, ENGINE_KEEP_FREED_MEMORY="0")
    assert off["faults"] > 20_000, off
    assert kept["faults"] < off["faults"] / 20, (kept, off)
