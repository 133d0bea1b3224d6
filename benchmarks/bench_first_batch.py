"""Does the first user request pay a first-time cost? The first batch of fresh
prompts in a fresh process against a second batch of different fresh prompts of
the same shapes, in the same process.

    python benchmarks/bench_first_batch.py                 # 3 rounds (docs/benchmarks.md)
    python benchmarks/bench_first_batch.py --rounds 5 --dtype float32

Each round starts one fresh process per model and side (rotated order): it builds
`LLM(model)` (timed: the start-up, warm-up included), then generates batch 1 and
batch 2, each timed. The benchmark sends no warm-up prompt of its own. Both
batches have the same prompt lengths (drawn once per round, spread so that the
step shapes vary), the same output lengths and the same sampling settings (half
greedy, half temperature/top-p/top-k sampled), but different random token ids, so
neither hits the prefix cache. The figure is batch 1 / batch 2 per round, in wall
time and in the process's CPU time (steadier when other jobs share the cores;
``--threads 1`` steadier still).

The sides: the engine as it is built (``warm``), and with its warm-up turned off
(``cold``, ``LLM(skip_warm_up=True)``), so the warm-up's start-up cost and what it
saves the first batch are measured in the same run.

Models: the embedded default model (4.0M parameters) and the 25M random Llama of
`bench_generate.py` (built in a temporary folder).

The table's start-up column includes the warm-up's own time (from its log line);
the last lines say, per model, whether the warm side's median wall-time ratio
meets the 1.15x goal. ``--rounds 4`` takes about 3 minutes on 2 quiet cores.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SIDES = ("warm", "cold")
GOAL = 1.15  # issue #24: batch 1 within 1.15x of batch 2 (wall time, median)


def child(args: argparse.Namespace) -> None:
    """One fresh process: build, batch 1, batch 2; prints one JSON line."""
    start = time.perf_counter()
    import logging

    import torch

    from engine import LLM, SamplingParams

    if args.threads:
        torch.set_num_threads(args.threads)

    # the warm-up's own time, from its log line ("warm-up: ... in X s")
    warm_up_s = []

    class WarmUpLog(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            message = record.getMessage()
            if message.startswith("warm-up:"):
                warm_up_s.append(float(message.rsplit(" in ", 1)[1].split()[0]))

    runner_log = logging.getLogger("engine.worker.model_runner")
    runner_log.setLevel(logging.INFO)
    runner_log.addHandler(WarmUpLog())
    llm = LLM(args.model, dtype=args.dtype, skip_warm_up=args.side == "cold")
    built = time.perf_counter() - start
    vocab = llm.llm_engine.vocab_size
    rng = random.Random(args.seed)
    lengths = [rng.randint(args.min_prompt, args.max_prompt) for _ in range(args.batch)]
    params = [
        SamplingParams(max_tokens=args.new_tokens, ignore_eos=True, temperature=0.0)
        if i % 2 == 0 else
        SamplingParams(max_tokens=args.new_tokens, ignore_eos=True, temperature=0.8,
                       top_p=0.9, top_k=40, seed=i)
        for i in range(args.batch)
    ]
    timings, cpu = [], []
    for _ in range(2):
        prompts = [[rng.randrange(3, vocab) for _ in range(n)] for n in lengths]
        t0, c0 = time.perf_counter(), time.process_time()
        outs = llm.generate(prompts, params)
        timings.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        assert all(len(o.outputs[0].token_ids) == args.new_tokens for o in outs)
    print(json.dumps({"start_s": built, "first_s": timings[0], "second_s": timings[1],
                      "first_cpu_s": cpu[0], "second_cpu_s": cpu[1],
                      "warm_up_s": warm_up_s[0] if warm_up_s else 0.0}))


def run_child(model: str, side: str, args: argparse.Namespace, seed: int) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, __file__, "--child", "--model", model, "--dtype", args.dtype,
           "--side", side, "--threads", str(args.threads),
           "--batch", str(args.batch), "--min-prompt", str(args.min_prompt),
           "--max-prompt", str(args.max_prompt), "--new-tokens", str(args.new_tokens),
           "--seed", str(seed)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode:
        raise RuntimeError(f"child failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def build_bench_model(folder: Path) -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from bench_generate import build_model

    build_model(folder, seed=0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--min-prompt", type=int, default=16)
    ap.add_argument("--max-prompt", type=int, default=384)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=0,
                    help="torch threads in each process (0: torch's default); with 1 the "
                    "CPU-time ratio is steady on a loaded machine")
    ap.add_argument("--sides", default=",".join(SIDES), help="comma-separated: warm,cold")
    ap.add_argument("--models", default="default,bench", help="comma-separated: default,bench")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--side", default="warm", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        args.model = None if args.model in (None, "default") else args.model
        child(args)
        return 0
    sides = [s for s in args.sides.split(",") if s]
    with tempfile.TemporaryDirectory() as tmp:
        models = {}
        for name in args.models.split(","):
            if name == "default":
                models[name] = "default"
            elif name == "bench":
                build_bench_model(Path(tmp))
                models[name] = tmp
            else:
                raise SystemExit(f"unknown model {name!r}: default or bench")
        results: dict[tuple[str, str], list[dict]] = {}
        runs = [(m, s) for m in models for s in sides]
        for r in range(args.rounds):
            rotated = runs[r % len(runs):] + runs[:r % len(runs)]
            for model, side in rotated:
                out = run_child(models[model], side, args, seed=1000 * r + 7)
                results.setdefault((model, side), []).append(out)
                print(f"round {r + 1} {model:8} {side}: start {out['start_s']:.2f} s "
                      f"(warm-up {out['warm_up_s']:.2f} s), "
                      f"batch 1 {out['first_s']:.3f} s, batch 2 {out['second_s']:.3f} s, "
                      f"ratio {out['first_s'] / out['second_s']:.2f} (CPU time "
                      f"{out['first_cpu_s'] / out['second_cpu_s']:.2f})", flush=True)
    print(f"\n{args.batch} prompts of {args.min_prompt}-{args.max_prompt} tokens, "
          f"{args.new_tokens} new tokens each, dtype {args.dtype}, {args.rounds} rounds")
    print("| model | side | start-up (median) | of which warm-up (median, range) "
          "| batch 1 (median) | batch 2 (median) "
          "| batch 1 / batch 2, wall (median, range) | same, CPU time (median, range) |")
    print("|---|---|---|---|---|---|---|---|")
    verdicts = []
    for (model, side), outs in results.items():
        ratios = [o["first_s"] / o["second_s"] for o in outs]
        cpu = [o["first_cpu_s"] / o["second_cpu_s"] for o in outs]
        warm = [o["warm_up_s"] for o in outs]
        print(f"| {model} | {side} | {statistics.median(o['start_s'] for o in outs):.2f} s "
              f"| {statistics.median(warm):.2f} s ({min(warm):.2f}-{max(warm):.2f}) "
              f"| {statistics.median(o['first_s'] for o in outs):.3f} s "
              f"| {statistics.median(o['second_s'] for o in outs):.3f} s "
              f"| {statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f}) "
              f"| {statistics.median(cpu):.2f}x ({min(cpu):.2f}-{max(cpu):.2f}) |")
        if side == "warm":
            ratio = statistics.median(ratios)
            verdicts.append(f"{model} model, warm: batch 1 / batch 2 = {ratio:.2f}x wall "
                            f"(median of {len(ratios)} rounds): the 1.15x goal is "
                            f"{'met' if ratio <= GOAL else 'NOT met'}")
    print()
    for line in verdicts:
        print(line)
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
