"""Where a quantized GGUF model's decode step goes, and how near the kernels run to DRAM.

    python benchmarks/profile_quant_decode.py --gguf SmolLM2-135M-Instruct.Q4_1.gguf
    python benchmarks/profile_quant_decode.py --gguf model.Q8_0.gguf --peer-dequantized
    ENGINE_QUANT_KERNEL_PATH=portable python benchmarks/profile_quant_decode.py --gguf ...

Views of one sequence decoding (fresh 32-token prompt, greedy):

1. the engine step: ms/step plain and the operators by self CPU time under
   torch's profiler (Python cost shows as the gap between the two);
2. the step split by what it does: the quantized products by layer kind (qkv,
   o, gate_up, down, the LM head; from the blocks' shape), the embedding,
   attention (the KV-cache write and the paged decode kernel), norms, rotary,
   the MLP activation, the sampler, other operators, and the rest: Python and
   the framework (the plain step's time less the operators' self time). Each
   product kind with the bytes of blocks it reads per token and the rate it
   reads them at inside the step; the formats the file stores the embedding
   and LM head in, and whether the head shares the embedding's table;
3. each quantized layer kind on its own, in the order a step runs them (all
   layers, so the blocks come from memory as in a step, not from a cache one
   weight fits): wall and process CPU µs per token and the GB/s of blocks, and
   the Python cost of one call through the layer (`QuantizedWeight.linear`
   against the bare operator on one row, CPU time);
4. what this machine streams: a plain read (torch's float32 sum) of a buffer of
   the model's block bytes and of 1 GB, on 1 and on 2 threads;
5. the bytes one token reads (every quantized block once) and the floor that
   puts on decode at the measured 2-thread read rate (or ``--dram-gbs``).

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
    ap.add_argument("--dram-gbs", type=float, help="read bandwidth for the floor (default: measured, 2 threads)")
    peers = ap.add_mutually_exclusive_group()
    peers.add_argument("--peer-dequantized", action="store_true")
    peers.add_argument("--peer-file-layout", action="store_true")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()

    import torch

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
    plain_wall, _ = decode_ms(llm, rng, args.steps)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                record_shapes=True) as prof:
        profiled_wall, _ = decode_ms(llm, rng, args.steps)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))

    # 2. the step split by what it does
    kinds = {tuple(m.quant_weight.shape): layer_kind(name) for name, m in layers
             if "embed" not in name}
    kind_bytes: dict[str, int] = {}
    for name, m in layers:
        if "embed" not in name:
            kind = layer_kind(name)
            kind_bytes[kind] = kind_bytes.get(kind, 0) + m.quant_weight.nbytes
    per_step: dict[str, float] = {}
    # the step count under the profiler: the decode steps plus the few of decode_ms' warm-up
    steps = args.steps + 4
    for event in prof.key_averages(group_by_input_shape=True):
        if event.key == "engine_kernels::ggml_linear":
            rows, cols = event.input_shapes[2][0], event.input_shapes[1][1]
            # the blocks' rows and x's width name the layer kind
            what = next((k for (n, w), k in kinds.items() if n == rows and w == cols), "other ggml_linear")
        else:
            what = operator_kind(event.key)
        per_step[what] = per_step.get(what, 0.0) + event.self_cpu_time_total / 1000 / steps
    operators = sum(per_step.values())
    # the rest is taken within the profiled run itself (the profiler adds its
    # own cost to every operator call, so it overstates the Python part)
    print(f"\nthe step split (ms per step of {profiled_wall:.2f} wall under the profiler, "
          f"{plain_wall:.2f} without; operators' self time):")
    for what, ms in sorted(per_step.items(), key=lambda kv: -kv[1]):
        read = kind_bytes.get(what)
        rate = f"   {read / 1e6:6.1f} MB at {read / ms / 1e6:5.1f} GB/s" if read else ""
        print(f"  {what:>26} {ms:7.3f} ms {100 * ms / profiled_wall:5.1f}%{rate}")
    rest = profiled_wall - operators
    print(f"  {'Python, framework (rest)':>26} {rest:7.3f} ms {100 * rest / profiled_wall:5.1f}%")
    embed_name, embed = next((n, m) for n, m in layers if "embed" in n)
    head = next((m for n, m in layers if layer_kind(n) == "lm_head"), None)
    print(f"  formats: embedding {embed.quant_weight.methods} ({embed_name}), LM head "
          f"{head.quant_weight.methods if head else 'not quantized'}"
          f"{' (the same table)' if head is not None and head.quant_weight is embed.quant_weight else ''};"
          f" the file: {file_types(args.gguf)}")

    # 3. each layer kind alone, in the order a step runs them
    print(f"\n{len(layers)} quantized layers, activation dtype {act}, threads {torch.get_num_threads()}")
    order = [(layer_kind(n), m.quant_weight) for n, m in layers if "embed" not in n]
    x_for = {w: torch.randn(1, w).to(act) for w in {qw.shape[1] for _, qw in order}}
    spent = {kind: [0.0, 0.0] for kind in kind_bytes}
    reps = 20
    for i in range(reps + 2):
        for kind, qw in order:
            start, cpu = time.perf_counter(), time.process_time()
            qw.linear(x_for[qw.shape[1]], None)
            if i >= 2:
                spent[kind][0] += time.perf_counter() - start
                spent[kind][1] += time.process_time() - cpu
    print(f"{'kind':>10} {'MB':>6} {'µs wall':>8} {'µs CPU':>8} {'GB/s (wall)':>11}")
    for kind, (wall, cpu) in spent.items():
        wall, cpu = wall / reps * 1e6, cpu / reps * 1e6
        print(f"{kind:>10} {kind_bytes[kind] / 1e6:6.2f} {wall:8.0f} {cpu:8.0f} "
              f"{kind_bytes[kind] / wall / 1e3:11.1f}")
    total_bytes = sum(kind_bytes.values())
    sweep = sum(w for w, _ in spent.values()) / reps
    print(f"{'all':>10} {total_bytes / 1e6:6.2f} {sweep * 1e6:8.0f} "
          f"{sum(c for _, c in spent.values()) / reps * 1e6:8.0f} {total_bytes / sweep / 1e9:11.1f}")
    _, small = min(order, key=lambda kq: kq[1].nbytes)
    through, bare = call_overhead_us(small, x_for[small.shape[1]])
    print(f"one call on {list(small.shape)}, one row: {through:.1f} µs CPU through the layer, "
          f"{bare:.1f} µs the bare operator: {through - bare:.1f} µs of Python a call, "
          f"{len(order)} calls a token")

    # 4. what the machine streams
    rates = {}
    threads = torch.get_num_threads()
    for size in (total_bytes, 10**9):
        for n in (1, 2):
            rates[size, n] = read_gbs(size, n)
            print(f"plain read of {size / 1e6:.0f} MB on {n} thread(s): {rates[size, n]:.1f} GB/s")
    torch.set_num_threads(threads)

    # 5. the floor
    gbs = args.dram_gbs or rates[total_bytes, 2]
    print(f"\none token reads {total_bytes / 1e6:.1f} MB of quantized blocks: floor "
          f"{total_bytes / gbs / 1e6:.2f} ms at {gbs:.1f} GB/s")
    return 0


LAYER_KINDS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj", "lm_head")


def layer_kind(name: str) -> str:
    """qkv, o, gate_up, down or lm_head, from a layer's module name."""
    return next((k.removesuffix("_proj") for k in LAYER_KINDS if name.endswith(k)), name)


# operator name -> what it is part of (those not named: "other operators")
OPERATOR_KINDS = {
    "engine_kernels::ggml_embedding": "embedding",
    "engine_kernels::paged_decode_attention": "attention",
    "engine_kernels::write_kv_cache": "attention",
    "aten::_scaled_dot_product_flash_attention_for_cpu": "attention",
    "engine_kernels::rms_norm": "norms", "engine_kernels::fused_add_rms_norm": "norms",
    "engine_kernels::rotary_embedding": "rotary",
    "engine_kernels::silu_and_mul": "MLP activation",
    "engine_kernels::argmax_rows": "sampler",
}


def operator_kind(key: str) -> str:
    return OPERATOR_KINDS.get(key, "other operators")


def file_types(path: Path) -> str:
    """The GGUF tensor types of the file's embedding and output tensors."""
    import gguf

    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors}
    return (f"token_embd {types.get('token_embd.weight', '-')}, "
            f"output {types.get('output.weight', 'none (tied to token_embd)')}")


def call_overhead_us(qw, x) -> tuple[float, float]:
    """Process CPU µs of one `QuantizedWeight.linear` call on `x`, and of the
    bare ``ggml_linear`` operator on the same blocks (the difference: Python)."""
    import torch

    from engine.quantization.ggml import kernel_path

    rows = qw.parts[0][1]
    stored, interleaved = rows.method._stored(rows)
    out = x.new_empty((x.shape[0], qw.shape[0]))
    op = torch.ops.engine_kernels.ggml_linear.default
    path = kernel_path(x.dtype)
    calls = [lambda: qw.linear(x, None),
             lambda: op(out, x, stored, rows.method.type_id, None, path, interleaved)]
    best = [float("inf")] * 2
    for _ in range(3):
        for i, call in enumerate(calls):
            for _ in range(100):
                call()
            cpu = time.process_time()
            for _ in range(2000):
                call()
            best[i] = min(best[i], (time.process_time() - cpu) / 2000 * 1e6)
    return best[0], best[1]


def read_gbs(size: int, threads: int) -> float:
    """GB/s of a plain read (a float32 sum) of `size` bytes on `threads` threads, best of 5."""
    import torch

    torch.set_num_threads(threads)
    buf = torch.ones(size // 4)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        buf.sum()
        best = min(best, time.perf_counter() - start)
    return size / best / 1e9


if __name__ == "__main__":
    raise SystemExit(main())
