"""LoRA: a batch mixing 4 adapters against the base model on the same workload,
and the time to add an adapter to a running server.

    python benchmarks/bench_lora.py                 # both parts (docs/benchmarks.md)
    python benchmarks/bench_lora.py --part mix      # throughput only
    python benchmarks/bench_lora.py --part add      # adapter loading only

Model: a random Llama in SmolLM-135M's shape (benchmarks/bench_vs_vllm.py's
SMOL, 134.5M parameters) with a word-level tokenizer; adapters: rank 16 on every
projection (q/k/v/o, gate/up/down), made by peft and saved in its format.

mix: one `LLM(enable_lora=True, max_loras=4)` in this process (dtype --dtype).
Each round generates the same kind of batch twice, once with every request on
the base model and once with the requests spread round-robin over the 4
adapters (so every step mixes all 4), the order flipping every round; each side
gets fresh prompts every round (--requests requests, prompts --prompt-range
tokens (32-128), --output-range output tokens (32-64), greedy, ignore_eos). Throughput is output tokens / wall
time; the ratio LoRA / base is taken per round and reported as the median with
the range.

add: `engine serve --enable-lora --allow-runtime-lora-updating` on the same
model; each of --adds fresh rank-16 adapters (new names, new folders) is
loaded with ``POST /v1/load_lora_adapter`` and the wall time of the call is
reported (median and range): reading, checking, sharding and activating it.

The machine's load average is printed at the start and the end.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))
import engine  # noqa: E402,F401 - before torch (bench_generate imports it): the OpenMP wait policy

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from bench_generate import build_model, note  # noqa: E402
from bench_serve import free_port, start_server  # noqa: E402
from bench_vs_vllm import SMOL  # noqa: E402

ALL_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def load_average() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def make_adapters(model_dir: Path, folder: Path, names: list[str], rank: int = 16) -> list[Path]:
    """Random rank-`rank` peft adapters on every projection, saved by peft."""
    import peft
    import torch
    import transformers

    base = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = peft.get_peft_model(base, peft.LoraConfig(
        r=rank, lora_alpha=2 * rank, target_modules=ALL_PROJECTIONS, init_lora_weights=False))
    paths = []
    for i, name in enumerate(names):
        torch.manual_seed(i)
        with torch.no_grad():
            for pname, param in model.named_parameters():
                if "lora_" in pname:
                    param.copy_(torch.randn_like(param) * 0.02)
        path = folder / name
        model.save_pretrained(path)
        paths.append(path)
    return paths


def workload(n: int, seed: int, prompt_range: tuple[int, int] = (32, 128),
             output_range: tuple[int, int] = (32, 64)) -> tuple[list[list[int]], list[int]]:
    rng = random.Random(seed)
    prompts = [[rng.randrange(3, SMOL["vocab_size"]) for _ in range(rng.randint(*prompt_range))]
               for _ in range(n)]
    return prompts, [rng.randint(*output_range) for _ in range(n)]


def lora_path() -> str:
    """Which code adds the adapters' deltas: the compiled kernel's paths, or PyTorch."""
    import torch

    from engine.kernels import kernels_available, portable_forced

    if not kernels_available():
        return "plain PyTorch (compiled kernels not loaded)"
    if portable_forced():
        return "engine_kernels::lora_add, portable path"
    paths = {str(d).removeprefix("torch."): torch.ops.engine_kernels.lora_add_path(d)
             for d in (torch.bfloat16, torch.float32)}
    return "engine_kernels::lora_add, paths " + ", ".join(f"{d} {p}" for d, p in paths.items())


def mix(model_dir: Path, adapter_dirs: list[Path], args: argparse.Namespace) -> None:
    from engine import LLM, LoRARequest, SamplingParams

    loras = [LoRARequest(p.name, i + 1, str(p)) for i, p in enumerate(adapter_dirs)]
    llm = LLM(model_dir, dtype=args.dtype, enable_lora=True, max_loras=4, max_lora_rank=16,
              kv_cache_memory=2 << 30, enable_prefix_caching=False)
    note(f"dtype {llm.config.model_config.dtype}, LoRA product: {lora_path()}")

    def run(side: str, seed: int, n: int = args.requests) -> float:
        prompts, outs = workload(n, seed, args.prompt_range, args.output_range)
        params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in outs]
        chosen = [loras[i % 4] if side == "lora" else None for i in range(len(prompts))]
        start = time.perf_counter()
        results = llm.generate(prompts, params, lora_request=chosen)
        elapsed = time.perf_counter() - start
        produced = sum(len(r.outputs[0].token_ids) for r in results)
        assert produced == sum(outs)
        return produced / elapsed

    run("base", 999, 4)  # warm-up: both paths once
    run("lora", 998, 4)
    ratios, rows = [], []
    for r in range(args.rounds):
        order = ("base", "lora") if r % 2 == 0 else ("lora", "base")
        tps = {side: run(side, 1000 * r + k) for k, side in enumerate(order)}
        ratios.append(tps["lora"] / tps["base"])
        rows.append(tps)
        note(f"round {r}: base {tps['base']:.1f} tok/s, 4 adapters {tps['lora']:.1f} tok/s, "
             f"ratio {ratios[-1]:.2f} (order {'/'.join(order)})")
    llm.shutdown()
    print(f"mix: {args.requests} requests (prompts {args.prompt_range}, outputs "
          f"{args.output_range} tokens), 4 rank-16 adapters round-robin vs base model: "
          f"ratio {statistics.median(ratios):.2f}x (rounds: "
          + ", ".join(f"{x:.2f}" for x in ratios)
          + f"); base {max(r['base'] for r in rows):.1f} tok/s best, "
            f"4 adapters {max(r['lora'] for r in rows):.1f} tok/s best")


def add(model_dir: Path, tmp: Path, args: argparse.Namespace) -> None:
    import httpx

    names = [f"fresh{i}" for i in range(args.adds)]
    paths = make_adapters(model_dir, tmp / "fresh", names)
    port = free_port()
    proc = start_server(model_dir, port, ("--dtype", args.dtype, "--enable-lora",
                                          "--max-lora-rank", "16", "--max-loras", "4",
                                          "--allow-runtime-lora-updating",
                                          "--kv-cache-memory", str(1 << 30)),
                        log=tmp / "server.log")
    try:
        url = f"http://127.0.0.1:{port}"
        times = []
        for name, path in zip(names, paths, strict=True):
            start = time.perf_counter()
            response = httpx.post(f"{url}/v1/load_lora_adapter", timeout=60,
                                  json={"lora_name": name, "lora_path": str(path)})
            times.append(time.perf_counter() - start)
            assert response.status_code == 200, response.text
        # the adapter serves at once
        response = httpx.post(f"{url}/v1/completions", timeout=60, json={
            "model": names[-1], "prompt": [5, 6, 7], "max_tokens": 4})
        assert response.status_code == 200, response.text
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    print(f"add: rank-16 adapter on every projection of a 135M model, POST "
          f"/v1/load_lora_adapter: median {statistics.median(times) * 1000:.0f} ms "
          f"(range {min(times) * 1000:.0f}-{max(times) * 1000:.0f} ms over {len(times)})")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--part", choices=("mix", "add", "both"), default="both")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--adds", type=int, default=5)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--prompt-range", type=int, nargs=2, default=(32, 128), metavar=("MIN", "MAX"))
    ap.add_argument("--output-range", type=int, nargs=2, default=(32, 64), metavar=("MIN", "MAX"))
    args = ap.parse_args()
    note(f"load average at start: {load_average()}")
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        model_dir = tmp / "smol"
        model_dir.mkdir()
        build_model(model_dir, 0, SMOL)
        if args.part in ("mix", "both"):
            adapters = make_adapters(model_dir, tmp / "adapters", [f"a{i}" for i in range(4)])
            mix(model_dir, adapters, args)
        if args.part in ("add", "both"):
            add(model_dir, tmp, args)
    note(f"load average at end: {load_average()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
