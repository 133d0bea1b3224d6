"""Logits-processor plugins: what they cost a generation, installed and idle or
active on every request, against an engine without them.

    python benchmarks/bench_logits_processors.py              # 15 alternating rounds
    python benchmarks/bench_logits_processors.py --rounds 3

The example package examples/token-rules-logits-processor (plugins
``ban_tokens`` and ``no_repeat_ngram``) is pip-installed (``--no-deps
--target``) into a temporary folder and found through its entry points. Two
engines over the same tiny random Llama (benchmarks/bench_generate.py's builder;
hidden 256, 4 layers, vocab 4096, float32): ``none`` is built before the package
is on ``sys.path``, ``plugins`` after. Three sides, each 32 greedy prompts (16-64
random tokens) x 32 output tokens (ignore_eos) in one `generate` call:

- ``none``: the engine without the plugins;
- ``installed``: the engine with them, no request using them (each reports
  itself argmax-invariant, so greedy batches skip it);
- ``active``: the engine with them, every request with
  ``extra_args={"banned_token_ids": [...16 ids], "no_repeat_ngram_size": 3}``.

Rounds alternate the sides, rotating their order; torch uses --threads threads
(default 1). Reported: the median of the per-round ratios installed/none and
active/none, of wall time and of the process's CPU time (less disturbed by other
work on a loaded machine), with their range, and `uptime` before and after (the
figures are only comparable at a similar load).
"""

from __future__ import annotations

import argparse
import importlib
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from bench_generate import build_model, note  # noqa: E402

EXAMPLE = ROOT / "examples" / "token-rules-logits-processor"
PLUGINS = {"ban_tokens", "no_repeat_ngram"}
TINY = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, vocab_size=4096,
            max_position_embeddings=512)
SIDES = ("none", "installed", "active")


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def install_example(tmp: Path) -> Path:
    """pip-install the example package (its entry points) into a folder; returns it."""
    source = tmp / "src-copy"
    shutil.copytree(EXAMPLE, source)
    target = tmp / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                    "--no-build-isolation", "--no-index", "--disable-pip-version-check",
                    "--target", str(target), str(source)], check=True,
                   env={**os.environ, "PIP_ROOT_USER_ACTION": "ignore"})
    return target


def processor_names(llm) -> set[str]:
    return {name for name, _ in llm.llm_engine._logits_processor_classes}


def build_engines(folder: Path, site: Path, seed: int) -> dict[str, object]:
    """The engine without the plugins, then (the package on sys.path) the one with them."""
    import registry
    from engine import LLM

    def make():
        return LLM(str(folder), dtype="float32", seed=seed, kv_cache_memory=2**26)

    none = make()
    assert not PLUGINS & processor_names(none), "the plugins are already installed here"
    sys.path.insert(0, str(site))
    importlib.invalidate_caches()
    registry.clear_discovery_cache()
    plugins = make()
    found = processor_names(plugins)
    assert PLUGINS <= found, f"plugins not found: {sorted(found)}"
    assert {r.name for r in registry.discover("logits_processor")} >= PLUGINS
    return {"none": none, "plugins": plugins}


def workload(seed: int, n: int, max_tokens: int):
    """Prompts (token lists) and, per side, the engine key and the params."""
    from engine import SamplingParams

    rng = random.Random(seed)
    prompts = [[rng.randrange(3, TINY["vocab_size"]) for _ in range(rng.randint(16, 64))]
               for _ in range(n)]
    plain = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    banned = rng.sample(range(3, TINY["vocab_size"]), 16)
    active = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True,
                            extra_args={"banned_token_ids": banned, "no_repeat_ngram_size": 3})
    sides = {"none": ("none", plain), "installed": ("plugins", plain),
             "active": ("plugins", active)}
    return prompts, sides


def timed_generate(llm, prompts, params, max_tokens: int) -> tuple[float, float]:
    """Wall and CPU seconds of one `generate` call over every prompt."""
    start, cpu = time.perf_counter(), time.process_time()
    outs = llm.generate(prompts, params)
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    assert all(len(o.outputs[0].token_ids) == max_tokens for o in outs)
    return elapsed, cpu


def ratio_line(label: str, side: list[float], base: list[float]) -> str:
    ratios = [t / n for t, n in zip(side, base, strict=True)]
    return (f"  {label:<16} median {statistics.median(ratios):.3f}  "
            f"range {min(ratios):.3f}-{max(ratios):.3f}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)

    load_before = uptime()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        os.environ["ENGINE_CONFIG_DIR"] = str(tmp / "config")  # no user plugin state
        model = tmp / "model"
        model.mkdir()
        note("building the model and installing the example package")
        params_count = build_model(model, args.seed, TINY)
        site = install_example(tmp)
        engines = build_engines(model, site, args.seed)
        prompts, sides = workload(args.seed, args.prompts, args.max_tokens)
        for side in SIDES:  # warm-up
            key, params = sides[side]
            engines[key].generate(prompts[:4], params)
        # the active side really runs the processors: no banned id in its outputs,
        # and no output token completes a trigram seen before it
        key, active = sides["active"]
        banned = set(active.extra_args["banned_token_ids"])
        for out in engines[key].generate(prompts, active):
            ids = list(out.prompt_token_ids) + list(out.outputs[0].token_ids)
            assert not banned & set(out.outputs[0].token_ids), "ban_tokens did not apply"
            for k in range(len(out.prompt_token_ids), len(ids)):
                earlier = {tuple(ids[i:i + 3]) for i in range(k - 2)}
                assert tuple(ids[k - 2:k + 1]) not in earlier, "no_repeat_ngram did not apply"
        times: dict[str, list[float]] = {side: [] for side in SIDES}
        cpu: dict[str, list[float]] = {side: [] for side in SIDES}
        for r in range(args.rounds):
            order = SIDES[r % 3:] + SIDES[:r % 3]  # rotate so load drift hits every side
            for side in order:
                key, params = sides[side]
                wall, spent = timed_generate(engines[key], prompts, params, args.max_tokens)
                times[side].append(wall)
                cpu[side].append(spent)
            note(f"round {r + 1}: " + ", ".join(f"{s} {times[s][-1]:.3f}s" for s in SIDES))
        for llm in engines.values():
            llm.shutdown()
    load_after = uptime()

    tokens = args.prompts * args.max_tokens
    print(f"logits-processor plugins: {args.prompts} greedy prompts x {args.max_tokens} tokens, "
          f"tiny random Llama ({params_count / 1e6:.1f}M params, float32), "
          f"{args.rounds} alternating rounds, {args.threads} torch thread(s)")
    for side in SIDES:
        best = min(times[side])
        print(f"  {side:<10} median {statistics.median(times[side]):.3f}s  "
              f"best {best:.3f}s ({tokens / best:.0f} tok/s)")
    for side in ("installed", "active"):
        print(ratio_line(f"{side}/none wall", times[side], times["none"]))
        print(ratio_line(f"{side}/none CPU", cpu[side], cpu["none"]))
    print(f"  load before: {load_before}")
    print(f"  load after:  {load_after}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
