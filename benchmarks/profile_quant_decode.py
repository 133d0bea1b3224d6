"""Where a quantized GGUF model's decode step goes, and how near the kernels run to DRAM.

    python benchmarks/profile_quant_decode.py --gguf SmolLM2-135M-Instruct.Q4_1.gguf
    python benchmarks/profile_quant_decode.py --gguf model.Q8_0.gguf --peer-dequantized
    ENGINE_QUANT_KERNEL_PATH=portable python benchmarks/profile_quant_decode.py --gguf ...

Three views of one sequence decoding (fresh 32-token prompt, greedy):

1. the engine step: ms/step plain and the operators by self CPU time under
   torch's profiler (Python cost shows as the gap between the two);
2. each distinct quantized weight shape of the model on its own: `ggml_linear`
   for one activation row, µs per call and the GB/s it reads the blocks at, next
   to the same product on the weight dequantized to the activation dtype
   (`F.linear`, what ``quantization="none"`` runs);
3. the bytes one token reads (every quantized block once) and the floor that puts
   on decode at ``--dram-gbs``.

With ``--peer-dequantized`` the same file loaded with ``quantization="none"`` is
timed too, alternating with the quantized engine; with ``--peer-file-layout`` the
same file with its blocks as the file stores them (no `pack`: the layout before
the interleaved groups). Each line gives wall and process CPU ms per step (CPU
time moves less when other work shares the cores).
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import engine  # noqa: E402,F401 - before torch: it sets the OpenMP wait policy


def decode_ms(llm, rng: random.Random, steps: int) -> tuple[float, float]:
    """Wall and process CPU ms per decode step of one sequence with a fresh
    32-token prompt."""
    from engine import SamplingParams

    llm_engine = llm.llm_engine
    prompt = [rng.randrange(3, 40000) for _ in range(32)]
    llm_engine.add_request(prompt, SamplingParams(temperature=0.0, max_tokens=steps + 8,
                                                  ignore_eos=True))
    for _ in range(4):  # prefill, then a few decode steps
        llm_engine.step()
    start, cpu = time.perf_counter(), time.process_time()
    for _ in range(steps):
        llm_engine.step()
    took = (time.perf_counter() - start) / steps
    cpu_took = (time.process_time() - cpu) / steps
    while llm_engine.has_unfinished_requests():
        llm_engine.step()
    return took * 1000, cpu_took * 1000


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gguf", required=True, type=Path)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--rows", type=int, default=20, help="profiler table rows")
    ap.add_argument("--dram-gbs", type=float, default=20.0, help="DRAM read bandwidth for the floor")
    peers = ap.add_mutually_exclusive_group()
    peers.add_argument("--peer-dequantized", action="store_true")
    peers.add_argument("--peer-file-layout", action="store_true")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()

    import torch
    import torch.nn.functional as F

    from engine import LLM
    from engine.quantization.ggml import GGMLBlockMethod
    from engine.quantization.layers import _quantizable

    rng = random.Random(0)
    llm = LLM(str(args.gguf), dtype=args.dtype, kv_cache_memory=1 << 28)
    peer, peer_name = None, ""
    if args.peer_dequantized:
        peer, peer_name = LLM(str(args.gguf), dtype=args.dtype, quantization="none",
                              kv_cache_memory=1 << 28), "dequantized"
    elif args.peer_file_layout:
        packing = GGMLBlockMethod.pack
        GGMLBlockMethod.pack = lambda self, weight: weight  # the blocks as the file has them
        try:
            peer, peer_name = LLM(str(args.gguf), dtype=args.dtype,
                                  kv_cache_memory=1 << 28), "file layout"
        finally:
            GGMLBlockMethod.pack = packing
    # the in-process executor runs the call here: the worker's model itself comes back
    model = llm.llm_engine.executor.collective_rpc(lambda worker: worker.model_runner.model)[0]
    layers = [(name, m) for name, m in _quantizable(model) if m.quant_weight is not None]
    act = next(p for p in model.parameters() if p.is_floating_point()).dtype

    # 1. the step
    for _ in range(args.rounds):
        wall, cpu = decode_ms(llm, rng, args.steps)
        line = f"quantized {wall:.2f} ms/step ({cpu:.2f} CPU)"
        if peer is not None:
            wall, cpu = decode_ms(peer, rng, args.steps)
            line += f"   {peer_name} {wall:.2f} ms/step ({cpu:.2f} CPU)"
        print(line, flush=True)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        decode_ms(llm, rng, args.steps)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))

    # 2. each weight shape alone
    total_bytes = 0
    seen: dict[tuple, int] = {}
    for name, layer in layers:
        qw = layer.quant_weight
        is_embedding = "embed" in name
        if not is_embedding:
            total_bytes += qw.nbytes
        key = (tuple(qw.shape), tuple(qw.methods), is_embedding)
        seen[key] = seen.get(key, 0) + 1
    print(f"\n{len(layers)} quantized layers, activation dtype {act}, threads "
          f"{torch.get_num_threads()}")
    print(f"{'shape':>14} {'methods':>14} {'count':>5} {'MB':>6} {'µs quant':>9} {'GB/s':>6} "
          f"{'µs dequant':>10}")
    kernel_us = 0.0
    for (shape, methods, is_embedding), count in sorted(seen.items()):
        if is_embedding:
            continue
        name, layer = next((n, m) for n, m in layers if tuple(m.quant_weight.shape) == shape
                           and tuple(m.quant_weight.methods) == methods)
        qw = layer.quant_weight
        x = torch.randn(1, shape[1]).to(act)
        dense = qw.dequantize(act)
        reps = 200
        timings = []
        for quantized in (True, False):
            for i in range(10 + reps):
                if i == 10:
                    start = time.perf_counter()
                if quantized:
                    qw.linear(x, None)
                else:
                    F.linear(x, dense)
            timings.append((time.perf_counter() - start) / reps * 1e6)
        kernel_us += timings[0] * count
        print(f"{str(list(shape)):>14} {','.join(methods):>14} {count:5d} "
              f"{qw.nbytes / 1e6:6.2f} {timings[0]:9.1f} {qw.nbytes / timings[0] / 1e3:6.1f} "
              f"{timings[1]:10.1f}")
    # 3. the floor
    print(f"\none token reads {total_bytes / 1e6:.1f} MB of quantized blocks: floor "
          f"{total_bytes / args.dram_gbs / 1e6:.2f} ms at {args.dram_gbs:g} GB/s; the linear "
          f"kernels alone take {kernel_us / 1000:.2f} ms (weights hot in cache or not)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
