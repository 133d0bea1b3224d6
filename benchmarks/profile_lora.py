"""Where a decode step's time goes with LoRA: the same batch on the base model
and spread round-robin over 4 adapters, under torch's profiler.

    python benchmarks/profile_lora.py                      # bf16, 32 sequences
    python benchmarks/profile_lora.py --dtype float32 --batch 16 --context 64

Model and adapters as in `bench_lora.py` (a random Llama in SmolLM-135M's shape,
cached in --model-dir; 4 rank-16 peft adapters on every projection). Each side
starts --batch requests with --context-token prompts, decodes a few tokens to
warm up, then times --steps decode steps (one token per sequence each) and
profiles --steps more. Prints both sides' ms/step, their ratio, and the LoRA
side's operators by self CPU time (the LoRA hooks run inside the
``lora_delta`` ranges).
"""

from __future__ import annotations

import argparse
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
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--context", type=int, default=64)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rows", type=int, default=20)
    ap.add_argument("--model-dir", type=Path, default=Path("/tmp/engine-profile-lora"))
    args = ap.parse_args()

    import bench_generate
    import torch
    from bench_lora import make_adapters
    from bench_vs_vllm import SMOL

    from engine import LLM, LoRARequest, SamplingParams

    model_dir = args.model_dir / "smol"
    if not (model_dir / "config.json").exists():
        model_dir.mkdir(parents=True, exist_ok=True)
        bench_generate.build_model(model_dir, 0, SMOL)
    names = [f"a{i}" for i in range(4)]
    if not all((args.model_dir / "adapters" / n / "adapter_config.json").exists() for n in names):
        make_adapters(model_dir, args.model_dir / "adapters", names)
    loras = [LoRARequest(n, i + 1, str(args.model_dir / "adapters" / n))
             for i, n in enumerate(names)]
    llm = LLM(model_dir, dtype=args.dtype, enable_lora=True, max_loras=4, max_lora_rank=16,
              kv_cache_memory=1 << 30, enable_prefix_caching=False)
    llm_engine = llm.llm_engine
    rng = random.Random(0)
    params = SamplingParams(temperature=0.0, max_tokens=10_000, ignore_eos=True)

    def side(lora: bool) -> tuple[float, object]:
        ids = []
        for i in range(args.batch):
            prompt = [rng.randrange(3, SMOL["vocab_size"]) for _ in range(args.context)]
            ids.append(llm_engine.add_request(
                prompt, params, lora_request=loras[i % 4] if lora else None))
        for _ in range(5):  # prefill, then a few decode steps
            llm_engine.step()
        start = time.perf_counter()
        for _ in range(args.steps):
            llm_engine.step()
        per_step = (time.perf_counter() - start) / args.steps
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for _ in range(args.steps):
                llm_engine.step()
        for request_id in ids:
            llm_engine.abort_request(request_id)
        while llm_engine.has_unfinished_requests():
            llm_engine.step()
        return per_step, prof

    base, _ = side(False)
    with_lora, prof = side(True)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))
    print(f"{args.dtype}, batch {args.batch}, context {args.context}, threads "
          f"{torch.get_num_threads()}: base {base * 1000:.2f} ms/step, 4 adapters "
          f"{with_lora * 1000:.2f} ms/step, throughput ratio {base / with_lora:.2f}x")
    llm.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
