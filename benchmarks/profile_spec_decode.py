"""Where the time of speculative decoding goes: `bench_spec_decode.py`'s workloads
under cProfile, plain against speculative, in one process.

    python benchmarks/profile_spec_decode.py                   # repeat workload, n-gram
    python benchmarks/profile_spec_decode.py --workload norepeat --rows 40

Runs `--prompts` fresh prompts of the workload on each engine (after one warm-up
request each), then prints, per side: engine steps, output tokens per step, wall
time per step and per token, and the functions by own time (cProfile). The gap
between the two sides' per-step times is what a verify step costs beyond a plain
decode step (CPU time: one torch thread, so it is the work done even on a loaded
machine).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_spec_decode as bench  # noqa: E402 - after the path set-up


def run(llm, prompts: list[str], params_for, rows: int, profile: bool) -> dict:
    """Generate each prompt alone, counting engine steps; cProfile around it all."""
    engine = llm.llm_engine
    steps = 0
    step = engine.step

    def counted():
        nonlocal steps
        steps += 1
        return step()

    engine.step = counted
    profiler = cProfile.Profile() if profile else None
    tokens = 0
    start, cpu = time.perf_counter(), time.process_time()
    if profiler:
        profiler.enable()
    for i, prompt in enumerate(prompts):
        out = llm.generate([prompt], params_for(i), use_tqdm=False)[0].outputs[0]
        tokens += len(out.token_ids)
    if profiler:
        profiler.disable()
    wall = time.perf_counter() - start
    cpu = time.process_time() - cpu
    engine.step = step
    text = ""
    if profiler:
        buf = io.StringIO()
        pstats.Stats(profiler, stream=buf).sort_stats("tottime").print_stats(rows)
        text = buf.getvalue()
    return {"steps": steps, "tokens": tokens, "wall": wall, "cpu": cpu, "profile": text}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workload", choices=("repeat", "norepeat"), default="repeat")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=160)
    ap.add_argument("--rows", type=int, default=30)
    ap.add_argument("--no-profile", action="store_true", help="timings only")
    ap.add_argument("--k", type=int, default=bench.NGRAM["num_speculative_tokens"])
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    from engine import LLM, SamplingParams

    if args.workload == "repeat":
        functions = bench.stdlib_functions(0)
        prompts = [bench.edit_prompt(s, n)[0] for s, n in functions[: args.prompts + 1]]

        def params_for(i: int) -> SamplingParams:
            return SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    else:
        prompts = bench.comments(0)[: args.prompts + 1]

        def params_for(i: int) -> SamplingParams:
            return SamplingParams(temperature=1.0, max_tokens=args.max_tokens,
                                  ignore_eos=True, seed=1000 + i)
    kw = dict(dtype="float32", kv_cache_memory=64 << 20)
    ngram = {**bench.NGRAM, "num_speculative_tokens": args.k}
    for name, llm in (("plain", LLM(**kw)), ("spec", LLM(speculative_config=ngram, **kw))):
        llm.generate([prompts[-1]], params_for(0), use_tqdm=False)  # warm-up
        r = run(llm, prompts[:-1], params_for, args.rows, not args.no_profile)
        print(f"== {name}: {r['steps']} steps, {r['tokens']} tokens, "
              f"{r['tokens'] / r['steps']:.2f} tokens/step, "
              f"{1e3 * r['wall'] / r['steps']:.2f} ms/step, "
              f"{1e3 * r['wall'] / r['tokens']:.2f} ms/token, "
              f"{r['tokens'] / r['wall']:.0f} tok/s, "
              f"{1e3 * r['cpu'] / r['steps']:.2f} CPU ms/step")
        stats = llm.llm_engine.spec_decoding_stats
        if stats is not None:
            print(f"   drafted {stats.num_draft_tokens}, accepted {stats.num_accepted_tokens}")
        print(r["profile"])
        llm.shutdown()


if __name__ == "__main__":
    main()
