"""Steps on the fast path against the same steps through the modules.

    python benchmarks/bench_fast_path.py                           # smol, bf16, 1 and 32 rows
    python benchmarks/bench_fast_path.py --dtype float32 --batch 1
    python benchmarks/bench_fast_path.py --model model.Q8_0.gguf --batch 1,4
    python benchmarks/bench_fast_path.py --batch "" --prompts --context 256   # prompt steps
    python benchmarks/bench_fast_path.py --against ops    # one-call decode steps vs op by op

One engine, one process: `--batch` sequences with fresh prompts decode, and rounds
of `--steps` engine steps alternate between ``ENGINE_FAST_PATH=1`` (the fast
path, docs/fast-path.md) and ``=0`` (every layer through its modules; with
``--against ops``, ``=ops``: the fast path with every kernel called from Python,
so the difference is the one-call decode step), the first side swapping every
round; with --prompts, so do rounds of fresh prompts with one output token each
(TTFT). Both sides run the same kernels on the
same weights and caches, so the difference is the Python between the kernels. Prints
each side's wall time per step for every round, the best-to-best ratio and the
range of the per-round ratios, with the CPU model and the load average.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import engine  # noqa: E402,F401 - before torch: it sets the OpenMP wait policy


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smol",
                    help="smol (SmolLM-135M's shape, built once), or a model folder or "
                         "GGUF file")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--batch", default="1,32", help="comma-separated sequence counts")
    ap.add_argument("--context", type=int, default=200, help="prompt tokens per sequence")
    ap.add_argument("--steps", type=int, default=30, help="decode steps per round and side")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--prompts", action="store_true",
                    help="also time fresh --context-token prompts with one output token "
                         "(what TTFT measures), --steps a round and side")
    ap.add_argument("--against", choices=("0", "ops"), default="0",
                    help="the other side's ENGINE_FAST_PATH: 0 (the modules) or ops (the "
                         "fast path op by op, no one-call decode steps)")
    args = ap.parse_args()
    other = "modules" if args.against == "0" else "op by op"

    import bench_generate
    from bench_vs_vllm import SMOL, cpu_description

    from engine import LLM, SamplingParams
    from engine.ops.fast_path import FAST_PATH_ENV

    model = Path(args.model)
    if args.model == "smol":
        model = Path("/tmp/engine-profile-smol")  # shared with profile_decode.py
        if not (model / "config.json").exists():
            model.mkdir(parents=True, exist_ok=True)
            bench_generate.build_model(model, 0, SMOL)
    llm = LLM(str(model), dtype=args.dtype, kv_cache_memory=1 << 30)
    engine_ = llm.llm_engine
    vocab = llm.get_tokenizer().vocab_size
    rng = random.Random(0)
    print(f"{cpu_description()}; load average {os.getloadavg()[0]:.1f}")

    def alternate(measure) -> dict[str, list[float]]:
        """`measure()` (ms) for --rounds rounds a side, the first side swapping."""
        sides: dict[str, list[float]] = {"fast path": [], other: []}
        for r in range(args.rounds):
            for side in ("fast path", other) if r % 2 == 0 else (other, "fast path"):
                os.environ[FAST_PATH_ENV] = "1" if side == "fast path" else args.against
                sides[side].append(measure())
        os.environ.pop(FAST_PATH_ENV)
        return sides

    def report(what: str, unit: str, sides: dict[str, list[float]]) -> None:
        ratios = sorted(f / m for f, m in zip(sides["fast path"], sides[other], strict=True))
        best = min(sides["fast path"]) / min(sides[other])
        print(f"{args.dtype}, {what}: fast path "
              f"{' '.join(f'{t:.2f}' for t in sides['fast path'])} {unit}, {other} "
              f"{' '.join(f'{t:.2f}' for t in sides[other])} {unit}; best/best "
              f"{best:.2f}x the {other} time (rounds {ratios[0]:.2f}-{ratios[-1]:.2f})")

    def steps_ms() -> float:
        start = time.perf_counter()
        for _ in range(args.steps):
            engine_.step()
        return (time.perf_counter() - start) / args.steps * 1000

    for batch in (int(b) for b in args.batch.split(",") if b):
        # enough tokens for every round: the sequences never finish mid-measurement
        params = SamplingParams(temperature=0, ignore_eos=True,
                                max_tokens=2 * args.rounds * args.steps + 8)
        for _ in range(batch):
            engine_.add_request([rng.randrange(3, vocab) for _ in range(args.context)], params)
        for _ in range(3):  # the prompts, then the first decode steps
            engine_.step()
        sides = alternate(steps_ms)
        while engine_.has_unfinished_requests():
            engine_.step()
        report(f"{batch} sequence(s) decoding after {args.context}-token prompts", "ms/step",
               sides)
    if args.prompts:
        one_token = SamplingParams(temperature=0, max_tokens=1)

        def prompts_ms() -> float:  # best of --steps fresh prompts, one at a time
            best = float("inf")
            for _ in range(args.steps):
                prompt = [rng.randrange(3, vocab) for _ in range(args.context)]
                start = time.perf_counter()
                llm.generate([prompt], one_token, use_tqdm=False)
                best = min(best, time.perf_counter() - start)
            return best * 1000

        prompts_ms()  # this length's first prompt (kernels for its shapes)
        report(f"a fresh {args.context}-token prompt, 1 token (best of {args.steps})",
               "ms", alternate(prompts_ms))
    print(f"load average at the end {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
