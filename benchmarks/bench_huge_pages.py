"""Model weights in transparent huge pages or in 4 KiB pages, in fresh processes.

    python benchmarks/bench_huge_pages.py                     # 3 pairs, alternating
    python benchmarks/bench_huge_pages.py --order 1,0,0,1 --model /path/to/model

Each run is its own process, one after another (never two at once: a process
started while another holds memory reads its weights measurably slower for its
whole life on the team's VMs, docs/benchmarks.md), with
``ENGINE_WEIGHT_HUGE_PAGES`` 1 or 0 in the order given. Each loads the model
(`LLM(...)`, bf16 unless --dtype, 2 GiB KV cache), warms up, then measures:
load time; single-request decode, ms/token ((129 tokens - 1 token) / 128 on a
fresh 32-token prompt, best of 3); throughput of bench_vs_vllm.py's smol batch
(32 fresh requests at once, best of 2). The model is profile_decode.py's random
Llama of SmolLM-135M's shape unless --model.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CHILD = r"""
import json, sys, time
sys.path.insert(0, {bench!r})
from bench_vs_vllm import FreshPrompts, request_lengths, WORKLOADS
start = time.perf_counter()
from engine import LLM, SamplingParams
llm = LLM({model!r}, dtype={dtype!r}, kv_cache_memory=2 << 30, seed=0)
load = time.perf_counter() - start
vocab = json.load(open({model!r} + "/config.json"))["vocab_size"]
fresh = FreshPrompts(vocab, 7)
def run(prompts, outputs):
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in outputs]
    start = time.perf_counter()
    llm.generate(prompts, params, use_tqdm=False)
    return time.perf_counter() - start
run(fresh(32, 32), [8, 8])
decode = min((run(fresh(32), [129]) - run(fresh(32), [1])) / 128 for _ in range(3))
_, _, prompt_range, output_range = WORKLOADS["smol"]
lengths, outputs = request_lengths(32, prompt_range, output_range, 0)
throughput = max(sum(outputs) / run(fresh(*lengths), outputs) for _ in range(2))
print(json.dumps({{"load_s": load, "decode_ms": decode * 1e3, "tok_s": throughput}}))
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--order", default="1,0,0,1,1,0",
                    help="ENGINE_WEIGHT_HUGE_PAGES of each run, in order")
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--dtype", default="bfloat16")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT / "benchmarks"))
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None:
            import bench_generate
            from bench_vs_vllm import WORKLOADS

            model = Path(tmp, "smol")
            model.mkdir()
            bench_generate.build_model(model, 0, WORKLOADS["smol"][0])
        code = CHILD.format(bench=str(ROOT / "benchmarks"), model=str(model), dtype=args.dtype)
        results: dict[str, list[dict]] = {"1": [], "0": []}
        for setting in args.order.split(","):
            env = dict(os.environ, ENGINE_WEIGHT_HUGE_PAGES=setting, HF_HUB_OFFLINE="1",
                       ENGINE_CONFIG_DIR=tmp)
            out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                                 text=True, cwd=str(ROOT), check=False)
            lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
            if out.returncode or not lines:
                print(out.stderr[-2000:], file=sys.stderr)
                return 1
            result = json.loads(lines[-1])
            results[setting].append(result)
            label = "huge pages" if setting == "1" else "4 KiB pages"
            print(f"{label:12s} load {result['load_s']:.2f} s, decode {result['decode_ms']:.2f} "
                  f"ms/token, throughput {result['tok_s']:.1f} tok/s", flush=True)
    if results["1"] and results["0"]:
        hp = min(r["decode_ms"] for r in results["1"])
        small = min(r["decode_ms"] for r in results["0"])
        print(f"decode, best huge / best 4 KiB: {hp / small:.2f}x the time; throughput "
              f"{max(r['tok_s'] for r in results['1']) / max(r['tok_s'] for r in results['0']):.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
