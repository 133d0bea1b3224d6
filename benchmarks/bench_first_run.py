"""What a new user waits for: wall time from a cold `python` to the completion
printed, on the embedded default model, against two peers run in the same rounds.

    python benchmarks/bench_first_run.py              # 10 rounds (docs/benchmarks.md)
    python benchmarks/bench_first_run.py --rounds 3

Each round starts three fresh processes, in a rotated order: `engine generate`
on the default model (64 new tokens: the CLI's default length and sampling,
`--ignore-eos` so that every run produces exactly 64 tokens), a bare
`python -c "import torch"` (the floor every torch program pays), and the same
completion with transformers (`AutoModelForCausalLM` + `tokenizers`, the same
sampling settings, exactly 64 new tokens). Then one `python -X importtime` run of
the engine command says how much of the start is importing torch and the registry.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = ROOT / "engine" / "default_model"
PROMPT = "def fibonacci(n):"
NEW_TOKENS = 64

# the transformers version of the same command: load, tokenize, sample 64 tokens, print
HF_PEER = f"""
import sys, torch, transformers
from tokenizers import Tokenizer
model = transformers.AutoModelForCausalLM.from_pretrained({str(DEFAULT_MODEL)!r}).eval()
tok = Tokenizer.from_file({str(DEFAULT_MODEL / "tokenizer.json")!r})
ids = torch.tensor([tok.encode({PROMPT!r}, add_special_tokens=False).ids])
torch.manual_seed(0)
with torch.inference_mode():
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True,
                         temperature=0.7, top_p=0.95, top_k=0, max_new_tokens={NEW_TOKENS},
                         min_new_tokens={NEW_TOKENS}, pad_token_id=1)
print({PROMPT!r} + tok.decode(out[0, ids.shape[1]:].tolist()))
"""

COMMANDS = {
    "engine": [sys.executable, "-m", "engine", "generate", "--prompt", PROMPT,
               "--max-tokens", str(NEW_TOKENS), "--ignore-eos"],
    "torch": [sys.executable, "-c", "import torch"],
    "transformers": [sys.executable, "-c", HF_PEER],
}


def timed(command: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, timeout=600)
    return time.perf_counter() - start


def import_breakdown(env: dict[str, str]) -> dict[str, float]:
    """Seconds importing in total, and cumulatively for torch and registry, from
    one `python -X importtime` run of the engine command."""
    proc = subprocess.run([sys.executable, "-X", "importtime", *COMMANDS["engine"][1:]],
                          env=env, capture_output=True, text=True, check=True, timeout=600)
    total, cumulative = 0, {}
    for line in proc.stderr.splitlines():
        if not line.startswith("import time:") or "self [us]" in line:
            continue
        self_us, cumulative_us, name = (part.strip() for part in line[12:].split("|"))
        total += int(self_us)
        cumulative.setdefault(name, int(cumulative_us))
    return {"total_s": total / 1e6, "torch_s": cumulative.get("torch", 0) / 1e6,
            "registry_s": cumulative.get("registry", 0) / 1e6}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--omp-threads", type=int, default=None,
                    help="OMP_NUM_THREADS for every process (default: torch's own choice)")
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as config_dir:
        # a private config dir: no user plugins
        env = dict(os.environ, ENGINE_CONFIG_DIR=config_dir, HF_HUB_OFFLINE="1",
                   PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT),
                                                            os.environ.get("PYTHONPATH")])))
        if args.omp_threads is not None:
            env["OMP_NUM_THREADS"] = str(args.omp_threads)
        load_start = os.getloadavg()
        names = list(COMMANDS)
        times: dict[str, list[float]] = {name: [] for name in names}
        for r in range(args.rounds):
            for name in names[r % 3:] + names[:r % 3]:
                times[name].append(timed(COMMANDS[name], env))
            print(f"round {r + 1}: " + ", ".join(f"{n} {times[n][-1]:.2f} s" for n in names),
                  file=sys.stderr, flush=True)
        imports = import_breakdown(env)
    result = {
        "rounds": args.rounds,
        "median_s": {n: statistics.median(t) for n, t in times.items()},
        "fastest_s": {n: min(t) for n, t in times.items()},
        "round_ratio_engine_vs_transformers": [
            e / h for e, h in zip(times["engine"], times["transformers"], strict=True)],
        "imports": imports,
        "load_average": [load_start, os.getloadavg()],
        "runs_s": times,
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    hf_median = result["median_s"]["transformers"]
    threads = args.omp_threads if args.omp_threads is not None else "default"
    print(f"cold runs, {args.rounds} rounds, {NEW_TOKENS} new tokens, OMP threads {threads}:")
    for n in names:
        print(f"  {n:13s} median {result['median_s'][n]:5.2f} s, fastest "
              f"{result['fastest_s'][n]:5.2f} s, median vs transformers "
              f"{result['median_s'][n] / hf_median:.2f}x")
    ratios = result["round_ratio_engine_vs_transformers"]
    print(f"  engine / transformers per round: {min(ratios):.2f}-{max(ratios):.2f}")
    print(f"engine imports (one -X importtime run): {imports['total_s']:.2f} s in all, torch "
          f"{imports['torch_s']:.2f} s, registry {imports['registry_s']:.2f} s")
    load = ", ".join(f"{x:.1f}" for x in load_start + os.getloadavg())
    print(f"load average (1, 5, 15 min) at start and end: {load}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
