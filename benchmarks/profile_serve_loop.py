"""Does `engine serve`'s event loop wait on the model step? The server under 64
concurrent streaming clients, with the time its asyncio loop is held up measured.

    python benchmarks/profile_serve_loop.py --model /path/to/SmolLM2-135M --dtype bfloat16

`engine serve` runs the engine's ``step()`` loop in a thread of the server process,
so the event loop (HTTP, SSE formatting, delivery to 64 streams) and the step's own
Python (scheduling, input preparation, sampling, detokenizing) take turns on one
GIL. This script starts the real server (the `engine serve` command, in a child
process) with three probes added, then sends it one round of bench_serve.py's
workload (fresh prompts) from this process:

- loop lag: a task that asks to sleep 1 ms and records how much later it woke up,
  i.e. how long the loop could not run anything (its own callbacks or the GIL);
- the engine thread's steps: count and wall time of each ``LLMEngine.step``;
- CPU seconds of the event-loop thread and of the engine thread over the round,
  read from /proc (how much of the wall time each one kept a core busy);
- each step's composition: prompt tokens, decode rows, prompts it finishes (the
  first tokens it hands out) and its wall time, and when requests were added to
  the engine, so the TTFT deciles can be read against the steps that made them.

A loop lag of the order of a step, and a loop thread near a full core, would say
that moving the engine core into its own process pays; a lag far below the
inter-token latency says it would not.

    python benchmarks/profile_serve_loop.py --model M --prefill-cost 1024,2048,4096

does not start a server: it asks whether a big step is dearer per prompt token
than a small one. In this process, one engine prefills the workload's 64 fresh
prompts (all added at once, prefill steps only) with each step budget in turn,
alternating the order every round, and prints wall and process CPU time per
prompt token (CPU time is what the machine's other load changes least) and the
minor page faults of each round; ``--keep-freed-memory`` runs it with `engine
serve`'s malloc settings (engine._malloc).

    python benchmarks/profile_serve_loop.py --model M --account --dtype bfloat16

does not start a server either: it runs bench_vs_vllm.py's throughput workload
(32 requests given at once, fresh prompts every round) in this process with
`LLM.generate`, and accounts for every step: its prompt tokens and decode rows,
its wall and process CPU time, and that time split into the scheduler, input
preparation, the model's forward (attention layers apart), the LM head, the
sampler, detokenizing and stop checks, building the outputs, and the rest of the
step's Python (the fast path op by op, ``ENGINE_FAST_PATH=ops``, so that a decode
step's attention is timed apart); the time between steps (the generate loop) is
summed apart. Then
the same decode batch is timed alone, to compare a decode step of the round with
its isolated cost.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import engine  # noqa: E402,F401,I001 - before torch: it sets the OpenMP wait policy
import bench_serve  # noqa: E402
from bench_vs_vllm import SMOL, WORKLOADS, FreshPrompts, cpu_description, request_lengths  # noqa: E402,E501

from engine._malloc import keep_freed_memory  # noqa: E402
from engine.cli.main import main as cli_main  # noqa: E402
from engine.core.engine import LLMEngine  # noqa: E402
from engine.core.scheduler import Scheduler  # noqa: E402
from engine.entrypoints.async_engine import AsyncEngine  # noqa: E402
from engine.kernels import kernels_available  # noqa: E402
from engine.llm import LLM  # noqa: E402
from engine.sample import Sampler  # noqa: E402
from engine.worker.model_runner import ModelRunner  # noqa: E402
from engine.attention.layer import Attention  # noqa: E402
from engine.ops.fast_path import FAST_PATH_ENV, forget_fast_paths  # noqa: E402
from engine.sampling_params import SamplingParams  # noqa: E402

STATS_PREFIX = "@@loop-stats "


def thread_cpu_s(native_id: int) -> float:
    """User + system CPU seconds of one thread of this process."""
    fields = Path(f"/proc/self/task/{native_id}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def minor_faults() -> int:
    """Minor page faults of this process so far (pages the kernel handed it)."""
    return int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[7])


def run_probed_server(argv: list[str]) -> int:
    """`engine serve argv` in this process, with the probes; the statistics of the
    busiest stretch (the measured round) are printed when the server stops."""
    steps: list[tuple[float, float]] = []  # (start, seconds)
    # per step: (start, seconds, prompt tokens, decode rows, prompts finished)
    composition: list[tuple[float, float, int, int, int]] = []
    added: list[float] = []  # when each request reached the engine
    planned: list[tuple[int, int, int]] = []  # the last schedule() of this step
    lags: list[tuple[float, float]] = []  # (when, lag seconds)
    cpu: dict[str, list[tuple[float, float]]] = {"loop": [], "engine": []}
    faults: list[tuple[float, int]] = []  # (when, the process's minor page faults so far)
    threads: dict[str, int] = {}
    original_step = LLMEngine.step

    def timed_step(self: LLMEngine):  # noqa: ANN202 - the same as LLMEngine.step's
        start = time.perf_counter()
        planned.clear()
        try:
            return original_step(self)
        finally:
            took = time.perf_counter() - start
            steps.append((start, took))
            if planned:
                composition.append((start, took, *planned[-1]))

    LLMEngine.step = timed_step
    original_schedule = Scheduler.schedule

    def schedule(self: Scheduler):  # noqa: ANN202 - the same as Scheduler.schedule's
        out = original_schedule(self)
        prompts = {seq.seq_id: seq.num_prompt_tokens for seq in self.running}
        prompt_tokens = decode_rows = finished = 0
        for item in out.scheduled:
            if item.num_computed_tokens >= prompts.get(item.seq_id, 0):
                decode_rows += 1
            else:
                prompt_tokens += len(item.token_ids)
                finished += item.sample
        planned.append((prompt_tokens, decode_rows, finished))
        return out

    Scheduler.schedule = schedule
    original_add = LLMEngine.add_request

    def add_request(self: LLMEngine, *args, **kwargs):  # noqa: ANN002,ANN003,ANN202
        added.append(time.perf_counter())
        return original_add(self, *args, **kwargs)

    LLMEngine.add_request = add_request
    original_start = AsyncEngine.start

    def start(self: AsyncEngine, on_state_change=None) -> None:  # noqa: ANN001
        original_start(self, on_state_change)
        threads["loop"] = threading.get_native_id()
        threads["engine"] = self._thread.native_id
        asyncio.get_running_loop().create_task(probe())

    async def probe() -> None:
        while True:
            before = time.perf_counter()
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            lags.append((now, now - before - 0.001))
            if len(lags) % 50 == 0:  # CPU time samples, to cut out the measured round
                for name, tid in threads.items():
                    try:
                        cpu[name].append((now, thread_cpu_s(tid)))
                    except OSError:
                        pass
                faults.append((now, minor_faults()))

    AsyncEngine.start = start
    try:
        return cli_main(["serve", *argv])
    finally:
        print(STATS_PREFIX + json.dumps({"steps": steps, "lags": lags, "cpu": cpu,
                                         "composition": composition, "added": added,
                                         "faults": faults}),
              flush=True)


def summarise(stats: dict, start: float, end: float) -> dict:
    """The probes' figures between `start` and `end` (this server's perf_counter)."""
    steps = [s for t, s in stats["steps"] if start <= t <= end]
    lags = sorted(lag for t, lag in stats["lags"] if start <= t <= end)
    out = {"round_s": round(end - start, 2), "steps": len(steps),
           "step_ms_mean": round(statistics.fmean(steps) * 1e3, 2) if steps else None,
           "step_ms_p50": round(statistics.median(steps) * 1e3, 2) if steps else None,
           "loop_lag_samples": len(lags)}
    if lags:
        out.update(loop_lag_ms_p50=round(statistics.median(lags) * 1e3, 2),
                   loop_lag_ms_p99=round(bench_serve.percentile(lags, 99) * 1e3, 2),
                   loop_lag_ms_max=round(lags[-1] * 1e3, 2),
                   loop_lagged_s_total=round(sum(lags), 2))
    added = [t for t in stats["added"] if start <= t <= end]
    if added:
        out["requests_added_ms_after_start_first_last"] = [round((added[0] - start) * 1e3, 1),
                                                          round((added[-1] - start) * 1e3, 1)]
    # the steps of the round up to the one that hands out the last first token
    table = [[round((t - start) * 1e3), round(took * 1e3, 1), prompt_tokens, decode_rows,
              finished, round((t + took - start) * 1e3)]
             for t, took, prompt_tokens, decode_rows, finished in stats["composition"]
             if start <= t <= end]
    last_prefill = max((i for i, row in enumerate(table) if row[2]), default=-1)
    table = table[:last_prefill + 1]
    out["steps_until_last_first_token"] = {
        "columns": ["start_ms", "wall_ms", "prompt_tokens", "decode_rows", "prompts_finished",
                    "end_ms"], "rows": table}
    inside = [f for t, f in stats["faults"] if start <= t <= end]
    if len(inside) >= 2:
        out["server_minor_page_faults"] = inside[-1] - inside[0]
    for name, samples in stats["cpu"].items():
        inside = [(t, c) for t, c in samples if start <= t <= end]
        if len(inside) >= 2:
            (t0, c0), (t1, c1) = inside[0], inside[-1]
            out[f"{name}_thread_cpu_share"] = round((c1 - c0) / (t1 - t0), 2)
    return out


def prefill_cost(model: Path, dtype: str, budgets: list[int], rounds: int, requests: int,
                 seed: int) -> dict:
    """Wall and CPU ms per prompt token of prefilling `requests` fresh prompts at
    once with each step budget (see the module docstring)."""
    llm = LLM(str(model), dtype=dtype, kv_cache_memory="2GiB", seed=0)
    eng = llm.llm_engine
    vocab = json.loads((model / "config.json").read_text())["vocab_size"]
    shapes, _ = bench_serve.workload(requests, vocab, (32, 256), (64, 128), seed)
    lengths = [len(p) for p in shapes]
    fresh = FreshPrompts(vocab, seed + 1)
    params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)

    def prefill(budget: int) -> tuple[float, float, int, int]:
        eng.scheduler.config.max_num_batched_tokens = budget
        for i, prompt in enumerate(fresh(*lengths)):
            eng.add_request(prompt, params, request_id=f"{budget}-{time.perf_counter()}-{i}")
        wall = cpu = 0.0
        steps = 0
        faults = minor_faults()
        while eng.has_unfinished_requests():  # max_tokens=1: every step is prefill
            c0, w0 = time.process_time(), time.perf_counter()
            eng.step()
            wall += time.perf_counter() - w0
            cpu += time.process_time() - c0
            steps += 1
        return wall, cpu, steps, minor_faults() - faults

    prefill(min(budgets))  # warm-up
    runs: dict[int, list[tuple[float, float, int, int]]] = {b: [] for b in budgets}
    for r in range(rounds):
        for budget in budgets if r % 2 == 0 else budgets[::-1]:
            runs[budget].append(prefill(budget))
    llm.shutdown()
    tokens = sum(lengths)
    return {"prompt_tokens": tokens,
            "per_budget": {b: {"steps": runs[b][0][2],
                               "wall_ms_per_token": [round(r[0] / tokens * 1e3, 3)
                                                     for r in runs[b]],
                               "cpu_ms_per_token": [round(r[1] / tokens * 1e3, 3)
                                                    for r in runs[b]],
                               "minor_page_faults": [r[3] for r in runs[b]]}
                           for b in budgets}}


# ---------------------------------------------------------------------- --account

# --narrow: the same layers and operators, next to no arithmetic
NARROW = dict(hidden_size=64, intermediate_size=128, num_attention_heads=2,
              num_key_value_heads=1, vocab_size=512)
ACCOUNT_PHASES = ("schedule", "prepare", "forward", "attention", "lm_head", "sampler",
                  "detokenize", "outputs")


class PhaseClock:
    """Self wall and process CPU time of nested phases within one step: a phase's
    time excludes the phases called inside it (attention inside the forward), so
    the phases and the step's remainder add up to the step."""

    def __init__(self) -> None:
        self.step: dict[str, list[float]] = {}  # phase -> [wall, cpu] of this step
        self._stack: list[list[float]] = []  # per open phase: [child wall, child cpu]

    def wrap(self, owner: object, name: str, phase: str) -> None:
        """Replace ``owner.name`` (a class's method or an instance's callable) by a
        timed call of it."""
        inner = getattr(owner, name)
        clock = self

        def timed(*args, **kwargs):  # noqa: ANN002,ANN003,ANN202 - whatever inner takes
            clock._stack.append([0.0, 0.0])
            w0, c0 = time.perf_counter(), time.process_time()
            try:
                return inner(*args, **kwargs)
            finally:
                wall, cpu = time.perf_counter() - w0, time.process_time() - c0
                child_wall, child_cpu = clock._stack.pop()
                acc = clock.step.setdefault(phase, [0.0, 0.0])
                acc[0] += wall - child_wall
                acc[1] += cpu - child_cpu
                if clock._stack:
                    clock._stack[-1][0] += wall
                    clock._stack[-1][1] += cpu

        setattr(owner, name, timed)


def account(model: Path, dtype: str, rounds: int, seed: int, compile_backend: str | None = None,
            ) -> dict:
    """bench_vs_vllm.py's smol throughput workload, in this process, with every
    step accounted for (see the module docstring). The fast path runs op by op
    (``ENGINE_FAST_PATH=ops`` unless the variable is set): a decode step's layers
    in one compiled call (docs/fast-path.md) would hide its attention inside the
    forward, so decode steps here take ~15% longer than in the benchmark."""
    unset = FAST_PATH_ENV not in os.environ
    if unset:
        os.environ[FAST_PATH_ENV] = "ops"
    try:
        return _account(model, dtype, rounds, seed, compile_backend)
    finally:
        if unset:
            os.environ.pop(FAST_PATH_ENV, None)


def _account(model: Path, dtype: str, rounds: int, seed: int,
             compile_backend: str | None) -> dict:
    _, n, prompt_range, output_range = WORKLOADS["smol"]
    prompt_lens, out_lens = request_lengths(n, prompt_range, output_range, seed)
    compilation = {"backend": compile_backend} if compile_backend else None
    llm = LLM(str(model), dtype=dtype, kv_cache_memory="2GiB", seed=0,
              compilation_config=compilation)
    eng = llm.llm_engine
    runner = eng.executor.worker.model_runner
    vocab = json.loads((model / "config.json").read_text())["vocab_size"]
    fresh = FreshPrompts(vocab, seed + 1)
    clock = PhaseClock()
    clock.wrap(Scheduler, "schedule", "schedule")
    clock.wrap(Scheduler, "update_from_output", "schedule")
    clock.wrap(ModelRunner, "_prepare_inputs", "prepare")
    clock.wrap(ModelRunner, "_update_states", "prepare")
    clock.wrap(runner.model, "forward", "forward")
    clock.wrap(Attention, "forward", "attention")
    # on the fast path (docs/fast-path.md) attention runs the function its
    # `fast_fn` returned when the path was built (at the warm-up): time those too,
    # and rebuild the path with them
    built_fast_fn = Attention.fast_fn

    def timed_fast_fn(self: Attention):  # noqa: ANN202 - what fast_fn returns
        run = built_fast_fn(self)
        if run is None:
            return None
        holder = SimpleNamespace(run=run)
        clock.wrap(holder, "run", "attention")
        return holder.run

    Attention.fast_fn = timed_fast_fn  # type: ignore[method-assign]
    forget_fast_paths(runner.model)
    clock.wrap(runner.model, "compute_logits", "lm_head")
    clock.wrap(Sampler, "__call__", "sampler")
    clock.wrap(LLMEngine, "_process_token", "detokenize")
    clock.wrap(LLMEngine, "_make_output", "outputs")
    steps: list[dict] = []
    original_step = LLMEngine.step
    planned: list[tuple[int, int]] = []

    def schedule_rows(self: Scheduler, out) -> None:  # noqa: ANN001
        prompts = {seq.seq_id: seq.num_prompt_tokens for seq in self.running}
        prompt_tokens = decode_rows = 0
        for item in out.scheduled:
            if item.num_computed_tokens >= prompts.get(item.seq_id, 0):
                decode_rows += 1
            else:
                prompt_tokens += len(item.token_ids)
        planned.append((prompt_tokens, decode_rows))

    timed_schedule = Scheduler.schedule

    def schedule(self: Scheduler):  # noqa: ANN202 - the same as Scheduler.schedule's
        out = timed_schedule(self)
        schedule_rows(self, out)
        return out

    Scheduler.schedule = schedule

    def step(self: LLMEngine):  # noqa: ANN202 - the same as LLMEngine.step's
        clock.step = {}
        planned.clear()
        w0, c0 = time.perf_counter(), time.process_time()
        try:
            return original_step(self)
        finally:
            wall, cpu = time.perf_counter() - w0, time.process_time() - c0
            prompt_tokens, decode_rows = planned[-1] if planned else (0, 0)
            steps.append({"start": w0, "wall": wall, "cpu": cpu, "prompt_tokens": prompt_tokens,
                          "decode_rows": decode_rows, "phases": clock.step})

    LLMEngine.step = step
    params = [SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True) for m in out_lens]
    llm.generate(fresh(*prompt_lens[:4]), params[:4], use_tqdm=False)  # warm-up
    report_rounds = []
    for _ in range(rounds):
        steps.clear()
        prompts = fresh(*prompt_lens)
        w0, c0 = time.perf_counter(), time.process_time()
        outs = llm.generate(prompts, params, use_tqdm=False)
        wall, cpu = time.perf_counter() - w0, time.process_time() - c0
        produced = sum(len(o.outputs[0].token_ids) for o in outs)
        report_rounds.append(summarise_account(list(steps), wall, cpu, produced))
    # the decode batches of the round alone: the same rows at about the same context,
    # each step timed; compare with the round's decode-only steps
    isolated = {}
    for rows in sorted({32, 16, 8}):
        batch = fresh(*sorted(prompt_lens)[:rows])
        steps.clear()
        llm.generate(batch, [SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)]
                     * rows, use_tqdm=False)
        decode = [s for s in steps if s["prompt_tokens"] == 0 and s["decode_rows"] == rows]
        if decode:
            isolated[rows] = {"steps": len(decode),
                              "wall_ms_median": round(statistics.median(
                                  s["wall"] for s in decode) * 1e3, 2),
                              "cpu_ms_median": round(statistics.median(
                                  s["cpu"] for s in decode) * 1e3, 2)}
    # one fresh 256-token prompt alone (TTFT's step), to set the round's big prompt
    # steps against: CPU ms per prompt token, best of three
    one = []
    for prompt in fresh(256, 256, 256):
        c0 = time.process_time()
        llm.generate([prompt], [SamplingParams(temperature=0.0, max_tokens=1)], use_tqdm=False)
        one.append((time.process_time() - c0) / 256 * 1e3)
    llm.shutdown()
    return {"requests": n, "prompt_tokens": sum(prompt_lens), "output_tokens": sum(out_lens),
            "one_256_token_prompt_cpu_ms_per_token": round(min(one), 3),
            "cpu_kernels": kernels_available(), "rounds": report_rounds, "decode_alone": isolated}


def summarise_account(steps: list[dict], wall: float, cpu: float, produced: int) -> dict:
    """One round's account: totals per phase, per kind of step, and the steps."""

    def totals(group: list[dict]) -> dict:
        out = {"steps": len(group), "wall_s": round(sum(s["wall"] for s in group), 3),
               "cpu_s": round(sum(s["cpu"] for s in group), 3)}
        phases = {}
        for phase in ACCOUNT_PHASES:
            w = sum(s["phases"].get(phase, (0.0, 0.0))[0] for s in group)
            c = sum(s["phases"].get(phase, (0.0, 0.0))[1] for s in group)
            phases[phase] = [round(w, 3), round(c, 3)]
        rest_w = out["wall_s"] - sum(v[0] for v in phases.values())
        rest_c = out["cpu_s"] - sum(v[1] for v in phases.values())
        phases["step_python_rest"] = [round(rest_w, 3), round(rest_c, 3)]
        out["phases_wall_cpu_s"] = phases
        return out

    prefill = [s for s in steps if s["prompt_tokens"]]
    decode = [s for s in steps if not s["prompt_tokens"]]
    in_steps = sum(s["wall"] for s in steps)
    per_token = [round(s["cpu"] / s["prompt_tokens"] * 1e3, 3) for s in prefill]
    return {
        "wall_s": round(wall, 3), "cpu_s": round(cpu, 3), "tok_per_s": round(produced / wall, 1),
        "prompt_steps_cpu_ms_per_prompt_token": per_token,
        "between_steps_wall_s": round(wall - in_steps, 3),
        "all_steps": totals(steps), "steps_with_prompt_tokens": totals(prefill),
        "decode_only_steps": totals(decode),
        "steps": [[round((s["start"] - steps[0]["start"]) * 1e3), s["prompt_tokens"],
                   s["decode_rows"], round(s["wall"] * 1e3, 1), round(s["cpu"] * 1e3, 1)]
                  for s in steps],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, help="model folder (default: a random SmolLM-135M-shape Llama)")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dump", type=Path, help="write the probes' raw figures here (JSON)")
    ap.add_argument("--serve-args", default="",
                    help="more `engine serve` flags, one string: A/B runs of a setting, "
                         "e.g. '--scheduling-policy fcfs'")
    ap.add_argument("--prefill-cost", metavar="BUDGETS",
                    help="no server: per-token cost of prefilling the prompts with each "
                         "step budget (comma-separated), in this process")
    ap.add_argument("--rounds", type=int, default=3, help="--prefill-cost rounds")
    ap.add_argument("--keep-freed-memory", action="store_true",
                    help="--prefill-cost: with engine serve's malloc settings (engine._malloc)")
    ap.add_argument("--account", action="store_true",
                    help="no server: bench_vs_vllm.py's throughput workload in this process, "
                         "every step's time accounted for")
    ap.add_argument("--narrow", action="store_true",
                    help="--account: SmolLM-135M's 30 layers at hidden size 64 (vocabulary 512), "
                         "where the kernels cost next to nothing: what is left is the per-step "
                         "and per-operator overhead (Python, dispatch, thread start-up)")
    ap.add_argument("--compile", metavar="BACKEND",
                    help="--account: with compilation_config={'backend': BACKEND} (inductor)")
    ap.add_argument("--server", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.server is not None:
        return run_probed_server(args.server)
    if args.account:
        # as bench_vs_vllm.py: the compiled kernels built now when missing, not in the
        # background while the plain PyTorch path is measured
        os.environ.setdefault("ENGINE_CPU_KERNELS", "build")
        print(f"CPU: {cpu_description()}; load average {os.getloadavg()}", file=sys.stderr)
        with tempfile.TemporaryDirectory() as tmp:
            model = args.model
            if model is None or args.narrow:
                model = Path(tmp, "smol")
                model.mkdir()
                bench_serve.build_model(model, {**SMOL, **NARROW} if args.narrow else SMOL,
                                        args.seed)
            report = account(model, args.dtype, args.rounds, args.seed, args.compile)
        for r in report["rounds"]:
            steps = r.pop("steps")
            print("steps (start ms, prompt tokens, decode rows, wall ms, cpu ms):",
                  file=sys.stderr)
            for row in steps:
                print("  " + "  ".join(f"{v:>7}" for v in row), file=sys.stderr)
        print(json.dumps({**report, "load_after": os.getloadavg()}, indent=1))
        return 0
    if args.prefill_cost:
        if args.model is None:
            raise SystemExit("--prefill-cost needs --model")
        budgets = [int(b) for b in args.prefill_cost.split(",")]
        if args.keep_freed_memory and not keep_freed_memory():
            raise SystemExit("--keep-freed-memory: this C library refused the settings")
        print(f"CPU: {cpu_description()}; load average {os.getloadavg()}", file=sys.stderr)
        report = prefill_cost(args.model, args.dtype, budgets, args.rounds, args.requests,
                              args.seed)
        print(json.dumps({**report, "keep_freed_memory": args.keep_freed_memory,
                          "load_after": os.getloadavg()}, indent=1))
        return 0

    print(f"CPU: {cpu_description()}; load average {os.getloadavg()}", file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None:
            model = Path(tmp, "smol")
            model.mkdir()
            bench_serve.build_model(model, SMOL, args.seed)
        vocab = json.loads((model / "config.json").read_text())["vocab_size"]
        shapes, outputs = bench_serve.workload(args.requests, vocab, (32, 256), (64, 128),
                                               args.seed)
        fresh = FreshPrompts(vocab, args.seed + 1)
        port = bench_serve.free_port()
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
        log = Path(tmp, "server.log")
        proc = bench_serve.launch_server(
            [sys.executable, __file__, "--server", "--model", str(model), "--port", str(port),
             "--dtype", args.dtype, "--seed", "0", *args.serve_args.split()], env, port, log)
        try:
            url = f"http://127.0.0.1:{port}"
            asyncio.run(bench_serve.serve_round(url, fresh(*[len(p) for p in shapes[:8]]),
                                                [8] * 8))
            # perf_counter is the same clock in both processes (CLOCK_MONOTONIC)
            start = time.perf_counter()
            result = asyncio.run(bench_serve.serve_round(url, fresh(*[len(p) for p in shapes]),
                                                         outputs))
            end = time.perf_counter()
        finally:
            bench_serve.stop_server(proc)
        stats = None
        for line in log.read_text().splitlines():
            if line.startswith(STATS_PREFIX):
                stats = json.loads(line[len(STATS_PREFIX):])
        if stats is None:
            raise SystemExit(f"the server printed no statistics:\n{log.read_text()[-3000:]}")
        if args.dump is not None:
            args.dump.write_text(json.dumps({"start": start, "end": end, **stats}))
    report = {"tok_per_s": round(result["tok_per_s"], 1),
              "ttft_ms_p50_p99": [round(result["ttft_p50_s"] * 1e3, 1),
                                  round(result["ttft_p99_s"] * 1e3, 1)],
              "ttft_ms_deciles": [round(t * 1e3) for t in result["ttft_deciles_s"]],
              "itl_ms_p50_p99": [round(result["itl_p50_s"] * 1e3, 1),
                                 round(result["itl_p99_s"] * 1e3, 1)],
              **summarise(stats, start, end), "load_after": os.getloadavg()}
    steps = report.pop("steps_until_last_first_token")
    print(json.dumps(report, indent=1))
    print("steps until the last first token (ms from the round's start):")
    print("  " + "  ".join(f"{c:>16s}" for c in steps["columns"]))
    for row in steps["rows"]:
        print("  " + "  ".join(f"{v:>16}" for v in row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
