"""Where the time to first token of a fresh prompt goes, end to end.

    python benchmarks/profile_ttft.py                          # bf16, two threads
    python benchmarks/profile_ttft.py --dtype float32
    python benchmarks/profile_ttft.py --threads 1              # CPU time = work
    python benchmarks/profile_ttft.py --no-linears --no-first  # the breakdown alone

What `bench_vs_vllm.py` calls TTFT: one `LLM.generate` of one request with a fresh
`--context`-token prompt (token ids never sent before: no prefix-cache hit) and
`max_tokens=1`, in a process that has already served other prompts. The model is
`profile_decode.py`'s (SmolLM-135M's shape, random weights, cached in --model-dir).

It prints, per part, the wall time and the process's CPU time per call (median of
--rounds, each part timed by wrapping the function that runs it):

- the whole `generate()` call, the engine step inside it, the model runner's
  `execute_model` inside that, and inside it the input preparation, the model's
  forward, the LM head (one row) and the sampler;
- inside the forward, summed over the layers: the norms, q/k/v, rotary, the KV
  write, attention, the output projection, gate/up with SiLU-and-mul, down; what
  the parts leave of the forward is Python (module calls, views, slicing);
- uninstrumented rounds (the same calls without the wrappers, on the model's fast
  path where it has one: engine.ops.fast_path) so the wrappers' cost and the
  modules' Python, which the instrumented rounds run (``ENGINE_FAST_PATH=0`` for
  them), show.

Then (unless --no-linears) each linear kind's achieved GFLOP/s in the model against
the same modules called back to back in a tight loop and a plain oneDNN product of
that shape, and the machine's peak (a 2,048-cube product on the packed weight) on
one thread and on --threads; then (unless --no-first) first-call costs: the first
fresh prompt after the engine is built, and a prompt length not seen before, with
the page faults each call took.

Set ``GOMP_SPINCOUNT=20000`` (or ``OMP_WAIT_POLICY``) to compare runs: otherwise
`import engine` picks the OpenMP wait policy from the machine's load at start, and
the two choices differ by a third of a two-thread prompt's time.

With two threads, a part's CPU time counts both threads (an OpenMP thread waiting
for work spins: that counts); with --threads 1 it is the part's work, which a
loaded machine disturbs least.
"""

from __future__ import annotations

import argparse
import functools
import os
import resource
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import engine  # noqa: E402,F401 - before torch: it sets the OpenMP wait policy


class Timers:
    """Wall and process CPU time per named part, summed over a call and kept per call."""

    def __init__(self) -> None:
        self.current: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
        self.calls: dict[str, list[tuple[float, float]]] = defaultdict(list)
        self.enabled = False

    def wrap(self, name: str, fn):
        """`fn` timed under `name` while enabled."""

        @functools.wraps(fn)
        def timed(*args, **kwargs):
            if not self.enabled:
                return fn(*args, **kwargs)
            wall, cpu = time.perf_counter(), time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                acc = self.current[name]
                acc[0] += time.perf_counter() - wall
                acc[1] += time.process_time() - cpu

        return timed

    def end_call(self) -> None:
        """Close one generate() call: its sums become one sample per part."""
        for name, (wall, cpu) in self.current.items():
            self.calls[name].append((wall, cpu))
        self.current.clear()

    def median(self, name: str) -> tuple[float, float]:
        """Median wall and CPU seconds per call of `name` (zeros when never run)."""
        samples = self.calls.get(name)
        if not samples:
            return 0.0, 0.0
        return (statistics.median(s[0] for s in samples),
                statistics.median(s[1] for s in samples))


LAYER_PARTS = ("input norm", "qkv", "rotary", "KV write", "attention (incl. KV write)",
               "o_proj", "post-attention norm", "gate_up + SiLU", "down")


def instrument(llm, timers: Timers) -> None:
    """Wrap the request path's functions, from generate() down to each layer's parts."""
    from engine.attention.backends import torch_sdpa

    llm.generate = timers.wrap("generate()", llm.generate)
    llm_engine = llm.llm_engine
    llm_engine.step = timers.wrap("engine step", llm_engine.step)
    runner = llm_engine.executor.worker.model_runner
    runner.execute_model = timers.wrap("execute_model", runner.execute_model)
    runner._prepare_inputs = timers.wrap("input preparation", runner._prepare_inputs)
    runner.sampler = timers.wrap("sampler", runner.sampler)
    model = runner.model
    model.forward = timers.wrap("model forward", model.forward)
    model.compute_logits = timers.wrap("LM head (1 row)", model.compute_logits)
    inner = model.model
    inner.embed_tokens.forward = timers.wrap("embedding", inner.embed_tokens.forward)
    inner.norm.forward = timers.wrap("final norm", inner.norm.forward)
    inner.layers[0].self_attn.rotary_emb.forward = timers.wrap(
        "rotary", inner.layers[0].self_attn.rotary_emb.forward)  # shared by every layer
    torch_sdpa.write_kv_cache = timers.wrap("KV write", torch_sdpa.write_kv_cache)
    for layer in inner.layers:
        attn, mlp = layer.self_attn, layer.mlp
        for name, module in (("input norm", layer.input_layernorm),
                             ("post-attention norm", layer.post_attention_layernorm),
                             ("qkv", attn.qkv_proj), ("o_proj", attn.o_proj),
                             ("attention (incl. KV write)", attn.attn),
                             ("down", mlp.down_proj)):
            module.forward = timers.wrap(name, module.forward)
        mlp.gate_up_proj.silu_and_mul = timers.wrap("gate_up + SiLU",
                                                    mlp.gate_up_proj.silu_and_mul)


def print_breakdown(timers: Timers, plain: list[tuple[float, float]]) -> None:
    """The parts' median wall and CPU ms per generate() call, nested as they run."""
    med = timers.median
    rows: list[tuple[str, float, float]] = []

    def row(label: str, wall: float, cpu: float) -> None:
        rows.append((label, wall * 1000, cpu * 1000))

    gen, step, execute = med("generate()"), med("engine step"), med("execute_model")
    forward, head, sampler, prep = (med("model forward"), med("LM head (1 row)"),
                                    med("sampler"), med("input preparation"))
    row("generate() without the wrappers", statistics.median(p[0] for p in plain),
        statistics.median(p[1] for p in plain))
    row("generate() (instrumented)", *gen)
    row("  outside the engine step (add_request, outputs)", gen[0] - step[0], gen[1] - step[1])
    row("  engine step", *step)
    row("    outside execute_model (scheduler, detokenizer)", step[0] - execute[0],
        step[1] - execute[1])
    row("    execute_model", *execute)
    row("      input preparation", *prep)
    row("      model forward", *forward)
    parts = {name: med(name) for name in ("embedding", *LAYER_PARTS, "final norm")}
    kv = parts["KV write"]
    attn = parts.pop("attention (incl. KV write)")
    parts["attention"] = (attn[0] - kv[0], attn[1] - kv[1])
    for name in ("embedding", "input norm", "qkv", "rotary", "KV write", "attention",
                 "o_proj", "post-attention norm", "gate_up + SiLU", "down", "final norm"):
        row(f"        {name}", *parts[name])
    inside = [sum(p[i] for p in parts.values()) for i in (0, 1)]
    row("        Python between the parts", forward[0] - inside[0], forward[1] - inside[1])
    row("      LM head (1 row)", *head)
    row("      sampler", *sampler)
    row("      rest of execute_model (states, outputs)",
        execute[0] - prep[0] - forward[0] - head[0] - sampler[0],
        execute[1] - prep[1] - forward[1] - head[1] - sampler[1])
    width = max(len(r[0]) for r in rows)
    print(f"{'part (median per call)':{width}s} {'wall ms':>9s} {'CPU ms':>9s}")
    for label, wall, cpu in rows:
        print(f"{label:{width}s} {wall:9.2f} {cpu:9.2f}")


def linear_kinds(model) -> dict[str, tuple[list, int, int]]:
    """The model's linear modules by kind: (modules, in features, out features)."""
    kinds: dict[str, tuple[list, int, int]] = {}
    for layer in model.model.layers:
        for kind, module in (("qkv", layer.self_attn.qkv_proj), ("o_proj", layer.self_attn.o_proj),
                             ("gate_up + SiLU", layer.mlp.gate_up_proj),
                             ("down", layer.mlp.down_proj)):
            kinds.setdefault(kind, ([], module.input_size, module.output_size))[0].append(module)
    return kinds


def best_of(fn, rounds: int, clock) -> float:
    fn()
    best = float("inf")
    for _ in range(rounds):
        start = clock()
        fn()
        best = min(best, clock() - start)
    return best


def print_linears(llm, timers: Timers, context: int, threads: int) -> None:
    """Each linear kind in the model (median of the instrumented calls) against the
    same modules back to back and one oneDNN product of the shape, in GFLOP/s; then
    the peak of a 2,048-cube product."""
    import torch

    model = llm.llm_engine.executor.worker.model_runner.model
    dtype = model.model.embed_tokens.weight.dtype
    clock = time.perf_counter
    print(f"\n{'linear kind':16s} {'shape':>18s} {'in model':>20s} {'back to back':>20s} "
          f"{'plain oneDNN':>20s}")
    with torch.inference_mode():
        for kind, (modules, n_in, n_out) in linear_kinds(model).items():
            flops = 2 * context * n_in * n_out * len(modules)
            in_model = timers.median(kind)[0]
            x = torch.randn(context, n_in, dtype=dtype)
            if kind == "gate_up + SiLU":
                calls = [functools.partial(layer.mlp.gate_up_proj.silu_and_mul, x,
                                           layer.mlp.act_fn) for layer in model.model.layers]
            else:
                calls = [functools.partial(m, x) for m in modules]
            loop = best_of(lambda calls=calls: [c() for c in calls], 5, clock)
            weights = [torch.ops.mkldnn._reorder_linear_weight(
                torch.randn(n_out, n_in, dtype=dtype), None) for _ in range(8)]
            plain = best_of(lambda w=weights, x=x: [torch.ops.mkldnn._linear_pointwise(
                x, p, None, "none", [], "") for p in w], 5, clock) / 8 * len(modules)
            print(f"{kind:16s} {f'{context}x{n_in}->{n_out} x{len(modules)}':>18s} "
                  + " ".join(f"{t * 1000:8.2f} ms {flops / t / 1e9:6.0f} GF/s"
                             for t in (in_model, loop, plain)))
        n = 2048
        a = torch.randn(n, n, dtype=dtype)
        packed = torch.ops.mkldnn._reorder_linear_weight(torch.randn(n, n, dtype=dtype), None)
        for t in sorted({1, threads}):
            torch.set_num_threads(t)
            best = best_of(lambda: torch.ops.mkldnn._linear_pointwise(a, packed, None, "none",
                                                                      [], ""), 3, clock)
            print(f"peak: {n}-cube {dtype} product on {t} thread(s): "
                  f"{2 * n**3 / best / 1e9:.0f} GFLOP/s")
        torch.set_num_threads(threads)


def timed_call(llm, prompts, params) -> tuple[float, float, int]:
    """Wall, CPU seconds and minor page faults of one generate() call."""
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    wall, cpu = time.perf_counter(), time.process_time()
    llm.generate(prompts, params, use_tqdm=False)
    return (time.perf_counter() - wall, time.process_time() - cpu,
            resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults)


def main() -> int:
    if os.environ.get("ENGINE_FAST_PATH") == "0":
        print("ENGINE_FAST_PATH=0: the uninstrumented rounds run the modules too")
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--model-dir", type=Path, default=Path("/tmp/engine-profile-smol"))
    ap.add_argument("--no-linears", action="store_true", help="skip the linear-kind table")
    ap.add_argument("--no-first", action="store_true", help="skip the first-call costs")
    args = ap.parse_args()

    import bench_generate
    import torch
    from bench_vs_vllm import KV_CACHE_GIB, SMOL, FreshPrompts

    from engine import LLM, SamplingParams
    from engine.ops.fast_path import FAST_PATH_ENV

    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    if not (args.model_dir / "config.json").exists():
        args.model_dir.mkdir(parents=True, exist_ok=True)
        bench_generate.build_model(args.model_dir, 0, SMOL)
    start = time.perf_counter()
    llm = LLM(args.model_dir, dtype=args.dtype, kv_cache_memory=KV_CACHE_GIB << 30, seed=0)
    # `import engine` chose how OpenMP threads wait from the load at that moment:
    # passive waiting costs a two-thread prompt about a third of its time
    omp_wait = os.environ.get("OMP_WAIT_POLICY") or f"spin {os.environ.get('GOMP_SPINCOUNT')}"
    print(f"engine built in {time.perf_counter() - start:.1f} s; {args.dtype}, "
          f"{threads} thread(s), OpenMP wait {omp_wait}, fresh {args.context}-token prompts, "
          f"max_tokens=1, load average {os.getloadavg()[0]:.1f}")
    fresh = FreshPrompts(SMOL["vocab_size"], 0)
    params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    first = [timed_call(llm, fresh(args.context), params) for _ in range(3)]

    timers = Timers()
    instrument(llm, timers)
    plain = []
    for _ in range(args.rounds):  # alternate: uninstrumented, instrumented
        plain.append(timed_call(llm, fresh(args.context), params)[:2])
        # the instrumented call runs the layers through their modules (the wrapped
        # parts): the model's fast path would call its ops' kernels directly
        os.environ[FAST_PATH_ENV] = "0"
        timers.enabled = True
        try:
            llm.generate(fresh(args.context), params, use_tqdm=False)
        finally:
            timers.enabled = False
            os.environ.pop(FAST_PATH_ENV)
        timers.end_call()
    print_breakdown(timers, plain)
    walls = sorted(p[0] for p in plain)
    print(f"uninstrumented generate(): wall best {walls[0] * 1000:.1f} ms, range "
          f"{walls[0] * 1000:.1f}-{walls[-1] * 1000:.1f} ms over {len(walls)} rounds")
    if not args.no_linears:
        print_linears(llm, timers, args.context, threads)
    if not args.no_first:
        print("\nfirst calls (wall ms, CPU ms, minor page faults):")
        for i, (wall, cpu, faults) in enumerate(first):
            print(f"  fresh prompt {i + 1} after the engine was built: {wall * 1000:7.1f} "
                  f"{cpu * 1000:7.1f} {faults:6d}")
        for when in ("the first", "the second"):
            length = args.context + 37  # a prompt length not sent before
            wall, cpu, faults = timed_call(llm, fresh(length), params)
            print(f"  {when} {length}-token prompt: {wall * 1000:7.1f} {cpu * 1000:7.1f} "
                  f"{faults:6d}")
        wall, cpu, faults = timed_call(llm, fresh(args.context), params)
        print(f"  a {args.context}-token prompt again: {wall * 1000:7.1f} {cpu * 1000:7.1f} "
              f"{faults:6d}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
