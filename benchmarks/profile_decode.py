"""Where a decode step's (or a prompt's) time goes: the engine under torch's profiler.

    python benchmarks/profile_decode.py                       # bf16, one sequence
    python benchmarks/profile_decode.py --dtype float32 --batch 32 --context 256
    python benchmarks/profile_decode.py --prefill --context 256   # TTFT of fresh prompts
    python benchmarks/profile_decode.py --prefill --context 256 --batch 8   # 2,048-token steps
    python benchmarks/profile_decode.py --prefill --context 256 --threads 1  # CPU time per op
    python benchmarks/profile_decode.py --prefill --context 256 --threads 1 --by-layer
    python benchmarks/profile_decode.py --prefill --context 256 --threads 1 --against-sdpa
    python benchmarks/profile_decode.py --workload            # bench_vs_vllm's workload
    python benchmarks/profile_decode.py --dtype float32 --breakdown --threads 1  # the floor,
                                        # each GEMV kind's GB/s, the rest of the step

Builds (once, cached in --model-dir) one of `bench_vs_vllm.py`'s random-weight
Llamas (`--model smol`: SmolLM-135M's shape; `bench`: the 26M one), starts `--batch` requests with `--context`-token
prompts, lets them decode a few tokens to warm up, then profiles `--steps` engine
steps (one new token per sequence each) and prints the operators by self CPU time
and the per-step wall and CPU time. Python-side cost shows as the gap between the
step's wall time and the operators' total. With --breakdown it first measures the
floor (a plain streaming read of 512 MiB, on one thread and on --threads), then
times each kind of linear layer of the loaded model (qkv, o, gate_up, down, the LM
head) the way a decode step runs it, every layer's weight in turn, and prints each
kind's time per step and the weight bytes it streams per second, then the profiled
step's operators grouped (GEMVs, attention, norms, rotary, SiLU-and-mul, the
rest) against the step's time: what is left is Python and the sampler's small ops.

With --prefill, each timed round is one step of --batch fresh --context-token
prompts (1 output token each); the wall time and the process's CPU time per step
are printed. On a loaded machine the CPU time moves less than the wall time, and
with --threads 1 the operators' times in the table are CPU time too (a parallel
region whose other thread is descheduled waits for it, which counts as wall time).
--by-layer adds a table of CPU time per decoder layer: the whole layer, its
attention block (q/k/v, rotary, cache write, attention, output projection), its
MLP block (gate/up with SiLU, down) and the rest (the two residual-add + RMSNorms).
--against-sdpa alternates, in the same process, rounds whose prefills take the
compiled prefill kernel as the engine chooses with rounds forced onto SDPA (the
path before the AMX kernel), and prints both sides' CPU time per round.
"""

from __future__ import annotations

import argparse
import functools
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
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--context", type=int, default=32)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--model", choices=("smol", "bench"), default="smol",
                    help="smol: SmolLM-135M's shape; bench: bench_generate.py's 26M Llama")
    ap.add_argument("--model-dir", type=Path, help="where the model is cached "
                    "(default: /tmp/engine-profile-<model>)")
    ap.add_argument("--rows", type=int, default=25)
    ap.add_argument("--workload", action="store_true",
                    help="profile bench_vs_vllm.py's whole batched workload for --model "
                         "(prefills, chunked prefills and decodes) instead of decode steps")
    ap.add_argument("--by-layer", action="store_true",
                    help="also time each decoder layer's attention and MLP blocks")
    ap.add_argument("--against-sdpa", action="store_true",
                    help="with --prefill: alternate rounds with prefill attention on SDPA")
    ap.add_argument("--breakdown", action="store_true",
                    help="decode: the streaming floor, each linear kind's GB/s and the "
                         "step's time by operator group")
    ap.add_argument("--prefill", action="store_true",
                    help="profile prefill steps of --batch fresh --context-token prompts "
                         "(1 output token each; --batch 1 is what TTFT measures)")
    args = ap.parse_args()

    import bench_generate
    import torch
    from bench_vs_vllm import SMOL

    if args.threads:
        torch.set_num_threads(args.threads)
    shape = SMOL if args.model == "smol" else bench_generate.MODEL
    args.model_dir = args.model_dir or Path(f"/tmp/engine-profile-{args.model}")
    if not (args.model_dir / "config.json").exists():
        args.model_dir.mkdir(parents=True, exist_ok=True)
        bench_generate.build_model(args.model_dir, 0, shape)
    from engine import LLM, SamplingParams

    budget = {"max_num_batched_tokens": max(2048, args.batch * args.context)} \
        if args.prefill else {}
    llm = LLM(args.model_dir, dtype=args.dtype, kv_cache_memory=1 << 30, **budget)
    llm_engine = llm.llm_engine
    if args.workload:
        return profile_workload(args, llm, shape)
    if args.prefill:
        return profile_prefill(args, llm, shape)
    rng = random.Random(0)
    prompts = [[rng.randrange(3, shape["vocab_size"]) for _ in range(args.context)]
               for _ in range(args.batch)]
    params = SamplingParams(temperature=0.0, max_tokens=10_000, ignore_eos=True)
    for p in prompts:
        llm_engine.add_request(p, params)
    for _ in range(5):  # prefill, then a few decode steps
        llm_engine.step()
    if args.breakdown:
        print_floor(torch.get_num_threads())
    walls, cpus = [], []
    for _ in range(args.steps):
        start, cpu = time.perf_counter(), time.process_time()
        llm_engine.step()
        walls.append(time.perf_counter() - start)
        cpus.append(time.process_time() - cpu)
    walls.sort()
    cpus.sort()
    if args.breakdown:
        linears = print_linear_kinds(llm, args.batch, args.steps)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for _ in range(args.steps):
            llm_engine.step()
        profiled = (time.perf_counter() - start) / args.steps
    averages = prof.key_averages()
    print(averages.table(sort_by="self_cpu_time_total", row_limit=args.rows))
    print(f"{args.dtype}, batch {args.batch}, context {args.context}, threads "
          f"{torch.get_num_threads()}: wall best {walls[0] * 1000:.2f} ms/step, median "
          f"{walls[len(walls) // 2] * 1000:.2f}; CPU time best {cpus[0] * 1000:.2f}, median "
          f"{cpus[len(cpus) // 2] * 1000:.2f} ({profiled * 1000:.2f} ms wall under the profiler)")
    if args.breakdown:
        print_groups(averages, args.steps, profiled, linears)
    return 0


# operator groups of a decode step (profiler names, matched as substrings)
GROUPS = {
    "linear kernels (GEMV)": ("fp32_gemv", "bf16_gemv", "amx_linear", "_linear_pointwise",
                              "aten::addmm", "aten::mm", "aten::linear"),
    "attention": ("paged_decode_attention", "prefill_attention", "reshape_and_cache",
                  "scaled_dot_product"),
    "norms": ("rms_norm",),
    "rotary": ("rotary_embedding",),
    "SiLU-and-mul": ("silu_and_mul",),
}


def print_floor(threads: int) -> None:
    """The machine's streaming read rate: torch.sum over 512 MiB in huge pages
    (what the weights get, engine.ops.weight_memory), best of 5, on one thread
    and on `threads`."""
    import torch

    from engine.ops.weight_memory import empty_weight

    data = empty_weight(128 << 20, dtype=torch.float32).fill_(1.0)
    for n in sorted({1, threads}):
        torch.set_num_threads(n)
        best = min(_timed(data.sum) for _ in range(5))
        print(f"floor: streaming read of 512 MiB on {n} thread(s): "
              f"{data.numel() * 4 / best / 1e9:.1f} GB/s")
    torch.set_num_threads(threads)


def _timed(fn) -> float:
    """Seconds `fn` takes: CPU time with one torch thread (what a loaded machine
    disturbs least), wall time with more (the threads' CPU times would add up)."""
    import torch

    clock = time.thread_time if torch.get_num_threads() == 1 else time.perf_counter
    start = clock()
    fn()
    return clock() - start


def print_linear_kinds(llm, batch: int, rounds: int) -> float:
    """Each kind of linear layer (qkv, o, gate_up, down, LM head) run alone, every
    layer's module in turn on a [batch, in] input, the best of `rounds`: ms per
    step and weight GB/s. Returns the sum, in seconds per step."""
    import torch

    model = llm.llm_engine.executor.worker.model_runner.model
    kinds: dict[str, list] = {}
    for name, module in model.named_modules():
        kind = name.rpartition(".")[2]
        if kind in ("qkv_proj", "o_proj", "gate_up_proj", "down_proj", "lm_head"):
            kinds.setdefault(kind, []).append(module)
    total = 0.0
    with torch.inference_mode():
        for kind, modules in kinds.items():
            weight = modules[0].weight
            x = torch.randn(batch, weight.shape[1], dtype=weight.dtype)
            calls = [functools.partial(m.compute_logits if kind == "lm_head" else m, x)
                     for m in modules]

            def run(calls=calls) -> None:
                for call in calls:
                    call()

            run()  # warm
            best = min(_timed(run) for _ in range(rounds))
            nbytes = sum(m.weight.numel() * m.weight.element_size() for m in modules)
            total += best
            print(f"{kind:13s} x{len(modules):3d} {tuple(weight.shape)!s:14s} "
                  f"{best * 1000:7.2f} ms/step {nbytes / best / 1e9:6.1f} GB/s "
                  f"({nbytes / 1e6:.0f} MB)")
    print(f"{'linears':13s}      {'':14s} {total * 1000:7.2f} ms/step")
    return total


def print_groups(averages, steps: int, step_wall: float, linears: float) -> None:
    """The profiled step's self CPU time by operator group, per step."""
    groups = dict.fromkeys([*GROUPS, "other operators"], 0.0)
    for event in averages:
        group = next((g for g, names in GROUPS.items()
                      if any(n in event.key for n in names)), "other operators")
        groups[group] += event.self_cpu_time_total / 1e6 / steps
    for group, seconds in groups.items():
        print(f"{group:22s} {seconds * 1000:7.2f} ms/step")
    rest = step_wall - sum(groups.values())
    print(f"{'outside operators':22s} {rest * 1000:7.2f} ms/step (Python, scheduling; "
          f"under the profiler)")
    print(f"linear kinds timed alone: {linears * 1000:.2f} ms/step")


def profile_prefill(args, llm, shape) -> int:
    """Steps of --batch fresh --context-token prompts with 1 output token each (no
    prefix-cache hit): a few to warm up, --steps timed (wall and CPU time), then
    --steps profiled. The engine is made with a token budget that holds the batch."""
    import torch
    from bench_vs_vllm import FreshPrompts

    from engine import SamplingParams

    fresh = FreshPrompts(shape["vocab_size"], 0)
    params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)

    def one() -> tuple[float, float]:
        prompts = fresh(*[args.context] * args.batch)
        start, cpu = time.perf_counter(), time.process_time()
        llm.generate(prompts, params, use_tqdm=False)
        return time.perf_counter() - start, time.process_time() - cpu

    for _ in range(3):
        one()
    if args.against_sdpa:
        return against_sdpa(args, one)
    rounds = [one() for _ in range(args.steps)]
    wall, cpu = sorted(r[0] for r in rounds), sorted(r[1] for r in rounds)
    hooks = label_layers(llm) if args.by_layer else []
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(args.steps):
            one()
    for hook in hooks:
        hook.remove()
    averages = prof.key_averages()
    print(averages.table(sort_by="self_cpu_time_total", row_limit=args.rows))
    if args.by_layer:
        print_layer_table(averages, args.steps)
    what = ("TTFT" if args.batch == 1
            else f"{args.batch} x {args.context} = {args.batch * args.context}-token step")
    mid = len(rounds) // 2
    print(f"{args.dtype}, fresh {args.context}-token prompts, {what}, threads "
          f"{torch.get_num_threads()}: wall best {wall[0] * 1000:.1f} ms, median "
          f"{wall[mid] * 1000:.1f} ms; CPU time best {cpu[0] * 1000:.1f} ms, median "
          f"{cpu[mid] * 1000:.1f} ms")
    return 0


def against_sdpa(args, one) -> int:
    """--steps rounds per side, alternating: prefill attention as the engine routes
    it, then forced onto SDPA (no compiled prefill kernel); CPU time per round."""
    from engine.attention.backends import torch_sdpa

    routed = (torch_sdpa.prefill_on_amx, torch_sdpa.PREFILL_KERNEL_DTYPES)
    sides: dict[str, list[float]] = {"engine": [], "SDPA": []}
    try:
        for _ in range(args.steps):
            for side in sides:
                if side == "SDPA":
                    torch_sdpa.prefill_on_amx = lambda _cache: False
                    torch_sdpa.PREFILL_KERNEL_DTYPES = ()
                sides[side].append(one()[1])
                torch_sdpa.prefill_on_amx, torch_sdpa.PREFILL_KERNEL_DTYPES = routed
    finally:
        torch_sdpa.prefill_on_amx, torch_sdpa.PREFILL_KERNEL_DTYPES = routed
    for side, cpu in sides.items():
        cpu.sort()
        print(f"{side:6s}: CPU time per round best {cpu[0] * 1000:.1f} ms, median "
              f"{cpu[len(cpu) // 2] * 1000:.1f} ms, range {cpu[0] * 1000:.1f}-"
              f"{cpu[-1] * 1000:.1f} ms ({args.dtype}, fresh {args.context}-token prompts x "
              f"{args.batch})")
    return 0


def label_layers(llm) -> list:
    """Profiler ranges around each decoder layer's attention and MLP blocks (forward
    hooks on the modules); returns the hook handles."""
    import torch

    model = llm.llm_engine.executor.worker.model_runner.model
    handles = []
    for i, layer in enumerate(model.model.layers):
        for part, module in (("total", layer), ("attention", layer.self_attn),
                             ("mlp", layer.mlp)):
            ranges = []

            def enter(_module, _args, name=f"layer {i:2d} {part}", ranges=ranges):
                ranges.append(torch.autograd.profiler.record_function(name).__enter__())

            def leave(_module, _args, _out, ranges=ranges):
                ranges.pop().__exit__(None, None, None)

            handles += [module.register_forward_pre_hook(enter),
                        module.register_forward_hook(leave)]
    return handles


def print_layer_table(averages, steps: int) -> None:
    """Per decoder layer, CPU time per step: the layer, its attention and MLP blocks,
    and the rest of it (the norms)."""
    ms = {e.key: e.cpu_time_total / steps / 1000 for e in averages
          if e.key.startswith("layer ")}
    layers = sorted({key.rsplit(" ", 1)[0] for key in ms})
    print(f"{'':10s} {'layer ms':>9s} {'attention':>10s} {'mlp':>8s} {'norms':>8s}")
    sums = [0.0] * 4
    for name in layers:
        total, attn, mlp = (ms.get(f"{name} {part}", 0.0) for part in ("total", "attention", "mlp"))
        row = (total, attn, mlp, total - attn - mlp)
        sums = [a + b for a, b in zip(sums, row, strict=True)]
        print(f"{name:10s} " + " ".join(f"{v:{w}.3f}" for v, w in zip(row, (9, 10, 8, 8),
                                                                        strict=True)))
    print(f"{'all':10s} " + " ".join(f"{v:{w}.2f}" for v, w in zip(sums, (9, 10, 8, 8),
                                                                   strict=True)))


def profile_workload(args, llm, shape) -> int:
    """bench_vs_vllm's throughput workload with fresh prompts: once to warm up,
    then once timed step by step (prefill-holding steps apart from decode-only
    ones), then under the profiler."""
    import torch
    from bench_vs_vllm import WORKLOADS, FreshPrompts, request_lengths

    from engine import SamplingParams

    _, n, prompt_range, output_range = WORKLOADS[args.model]
    prompt_lens, out_lens = request_lengths(n, prompt_range, output_range, 0)
    fresh = FreshPrompts(shape["vocab_size"], 0)
    llm_engine = llm.llm_engine

    scheduler = llm_engine.scheduler
    schedule = scheduler.schedule
    last: dict = {}

    def recording_schedule(*a, **kw):  # remember each step's shape
        out = schedule(*a, **kw)
        last["prefill"] = out.num_batched_tokens > len(out.scheduled)
        return out

    scheduler.schedule = recording_schedule

    def run(timed: bool):
        # fresh prompts every run: a repeated prompt would be a prefix-cache hit
        for prompt, out_len in zip(fresh(*prompt_lens), out_lens, strict=True):
            llm_engine.add_request(prompt, SamplingParams(temperature=0.0, max_tokens=out_len,
                                                          ignore_eos=True))
        kinds = {"with prefill": [0, 0.0], "decode only": [0, 0.0]}
        while llm_engine.has_unfinished_requests():
            start = time.perf_counter()
            llm_engine.step()
            if timed:
                kind = kinds["with prefill" if last.get("prefill") else "decode only"]
                kind[0] += 1
                kind[1] += time.perf_counter() - start
        return kinds

    start = time.perf_counter()
    run(False)
    print(f"first (cold) run: {time.perf_counter() - start:.2f} s")
    start = time.perf_counter()
    kinds = run(True)
    total = time.perf_counter() - start
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        run(False)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))
    print(f"{args.dtype}, {args.model} workload ({n} requests, {sum(out_lens)} output tokens): "
          f"{total:.2f} s, {sum(out_lens) / total:.1f} tok/s")
    for name, (steps, seconds) in kinds.items():
        print(f"  {name:13s} {steps:4d} steps, {seconds:6.2f} s, "
              f"{seconds / max(steps, 1) * 1000:7.2f} ms/step")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
