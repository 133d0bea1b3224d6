"""Where a decode step's time goes with LoRA: the same batch on the base model
and spread round-robin over 4 adapters, under torch's profiler.

    python benchmarks/profile_lora.py                      # bf16, 32 sequences
    python benchmarks/profile_lora.py --dtype float32 --batch 16 --context 64
    python benchmarks/profile_lora.py --kernel --rows 32 512   # the kernel alone

Model and adapters as in `bench_lora.py` (a random Llama in SmolLM-135M's shape,
cached in --model-dir; 4 rank-16 peft adapters on every projection). Each side
starts --batch requests with --context-token prompts, decodes a few tokens to
warm up, then times --steps decode steps (one token per sequence each) and
profiles --steps more. Prints both sides' ms/step, their ratio, and the LoRA
side's operators by self CPU time.

--kernel: the LoRA product alone on one decoder layer of that shape (q/k/v,
o, gate/up, down; rank 16, 4 adapters, rows round-robin over them in runs of
64), for each row count given: ``engine_kernels::lora_add`` against the base
layers' own product (``F.linear``, oneDNN) on the same rows, as CPU time of one
thread (``time.thread_time``, best of 5), which a loaded machine disturbs less
than wall time.
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
    ap.add_argument("--rows", type=int, nargs="*", default=[32, 512],
                    help="table rows (profile), or row counts (--kernel)")
    ap.add_argument("--kernel", action="store_true", help="time the LoRA kernel alone")
    ap.add_argument("--model-dir", type=Path, default=Path("/tmp/engine-profile-lora"))
    args = ap.parse_args()
    if args.kernel:
        return kernel(args.rows)

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
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=max(args.rows)))
    print(f"{args.dtype}, batch {args.batch}, context {args.context}, threads "
          f"{torch.get_num_threads()}: base {base * 1000:.2f} ms/step, 4 adapters "
          f"{with_lora * 1000:.2f} ms/step, throughput ratio {base / with_lora:.2f}x")
    llm.shutdown()
    return 0


def kernel(row_counts: list[int]) -> int:
    import torch
    import torch.nn.functional as F

    import engine.kernels as kernels

    assert kernels.kernels_available(), "the compiled kernels are not built: engine kernels build"
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    # SmolLM-135M's layer: (input features, output columns of each part)
    layers = {"qkv": (576, [576, 192, 192]), "o": (576, [576]), "gate_up": (576, [1536, 1536]),
              "down": (1536, [576])}
    slots, rank = 4, 16

    def best(run) -> float:
        run()
        times = []
        for _ in range(5):
            start = time.thread_time()
            run()
            times.append(time.thread_time() - start)
        return min(times)

    print(f"kernel path: bfloat16 {torch.ops.engine_kernels.lora_add_path(torch.bfloat16)}")
    for rows in row_counts:
        lora_total = base_total = 0.0
        for name, (k, parts) in layers.items():
            ends = [sum(parts[:i + 1]) for i in range(len(parts))]
            spans = torch.tensor([[e - p, e] for p, e in zip(parts, ends, strict=True)],
                                 dtype=torch.int32)
            n = ends[-1]
            x = torch.randn(rows, k, generator=gen).bfloat16()
            a = (torch.randn(slots, len(parts) * rank, k, generator=gen) * 0.1).bfloat16()
            b = torch.randn(slots, rank, n, generator=gen) * 0.1  # float32, as LayerSlots keeps it
            ranks = torch.full((slots, len(parts)), rank, dtype=torch.int32)
            slot_of = ((torch.arange(rows) // 64 + torch.arange(rows)) % slots).int()
            weight = (torch.randn(n, k, generator=gen) * 0.05).bfloat16()
            out = torch.zeros(rows, n).bfloat16()
            args = (out, x, a, b, ranks, spans, slot_of)
            lora = best(lambda args=args: torch.ops.engine_kernels.lora_add(*args))
            base = best(lambda x=x, weight=weight: F.linear(x, weight))
            lora_total += lora
            base_total += base
            print(f"{rows:5d} rows {name:8s} lora_add {lora * 1e3:7.3f} ms   "
                  f"base F.linear {base * 1e3:7.3f} ms")
        print(f"{rows:5d} rows, one decoder layer: lora_add {lora_total * 1e3:.3f} ms CPU, base "
              f"{base_total * 1e3:.3f} ms CPU: LoRA adds {lora_total / base_total:.0%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
