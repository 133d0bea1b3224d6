"""This engine against llama.cpp (llama-cpp-python) on the same GGUF file.

    python benchmarks/bench_vs_llamacpp.py --gguf SmolLM2-135M-Instruct.Q4_1.gguf
    python benchmarks/bench_vs_llamacpp.py --gguf a.Q4_1.gguf,b.Q8_0.gguf --rounds 2
    python benchmarks/bench_vs_llamacpp.py --gguf model.Q4_1.gguf --write-q8_0 model.Q8_0.gguf

llama.cpp runs from its own virtual environment (`.venv-llamacpp/` at the
repository root, ``--llamacpp-venv`` for another), built from source with native
CPU flags on first use: ``CMAKE_ARGS="-DGGML_NATIVE=ON" pip install
llama-cpp-python==0.3.36`` (several minutes). The engine loads the file with
``LLM(path)`` (dtype auto: bfloat16 activations on a CPU with native bf16; the
weights stay in their GGUF blocks). ``--write-q8_0 OUT`` first writes a Q8_0 copy
of the first file (its weights dequantized, then quantized by the `gguf` package).

Each side is one long-lived worker process per file, loading the model once; the
parent sends each measurement to the two in turn, swapping which goes first every
round; the side not being measured is paused (SIGSTOP to its process group), so
that neither one's idle threads (llama.cpp's polling thread pool, the engine's
OpenMP threads) run during the other's turn. Every timed request has a prompt
neither side has seen (both cache prefixes). Both sides use two threads. Measurements, per round and side:

- decode, ms/token: (time for 129 output tokens - time for 1) / 128, on a fresh
  32-token prompt each;
- TTFT, ms: one fresh 256-token prompt, 1 output token;
- serial throughput, output tokens/s: ``--serial-requests`` requests (32-256
  prompt tokens, 32-96 output tokens, greedy, EOS ignored) one after another;
- batched throughput (engine only; llama-cpp-python runs one sequence):
  ``--requests`` such requests given at once.

The llama.cpp worker reports its build's CPU features (``llama_print_system_info``),
printed before the timings. On an AMX CPU, llama-cpp-python 0.3.36 built with
``-DGGML_NATIVE=ON`` (AMX on) dies with SIGSEGV in ggml's AMX mul_mat on our Xeon
VM, so there the peer is a native build without ggml's AMX path
(``--llamacpp-venv``); the output says when llama.cpp's AMX path is off.

Peak RSS is measured apart, in a fresh process per side: load, then one request
of 256 + 64 tokens, with the same KV capacity on both sides (2048 tokens):
``VmHWM`` (not ``ru_maxrss``, which Linux carries over exec from the parent).
The engine is measured twice: with its defaults (256 sequences,
4096-token steps, the model's context: what a user who passes nothing gets) and
sized like llama.cpp's side (`LIKE_LLAMACPP`: one sequence, 512-token steps, a
2048-token context). ``benchmarks/profile_memory.py`` says where the engine's
memory goes. The CPU model and flags are printed first.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

from _peer_process import RESULT_PREFIX, Side, reply, take_turn

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_VENV = ROOT / ".venv-llamacpp"
LLAMA_CPP_VERSION = "0.3.36"
THREADS = 2
N_CTX = 4096
RSS_CTX = 2048
DECODE_PROMPT, DECODE_TOKENS, TTFT_PROMPT = 32, 129, 256
# what llama-cpp-python's Llama(n_ctx=2048, n_batch=512) serves: one sequence,
# prompt steps of up to 512 tokens, a 2048-token context. The engine's defaults
# (256 sequences, 4096-token steps, the model's whole context) size its warm-up
# and its step buffers for batches; both are measured.
LIKE_LLAMACPP = {"max_num_seqs": 1, "max_num_batched_tokens": 512, "max_model_len": RSS_CTX}


def note(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def cpu_description() -> dict:
    """CPU model (lscpu) and the flags the kernels choose paths by."""
    model = next((line.split(":", 1)[1].strip() for line in
                  subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
                  if line.startswith("Model name")), "unknown")
    flags = set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    wanted = ("avx2", "avx512f", "avx512vl", "avx512_vnni", "avx512_bf16", "avx_vnni",
              "amx_tile", "amx_int8", "amx_bf16")
    return {"model": model, "cores": os.cpu_count(),
            "flags": [f for f in wanted if f in flags]}


def ensure_llamacpp_venv(venv: Path) -> Path:
    """The venv's python, building llama-cpp-python there from source when missing."""
    python = venv / "bin" / "python"
    check = [str(python), "-c", "import llama_cpp"]
    if python.exists() and subprocess.run(check, capture_output=True).returncode == 0:
        return python
    note(f"building llama-cpp-python {LLAMA_CPP_VERSION} in {venv} (several minutes)")
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    env = dict(os.environ, CMAKE_ARGS="-DGGML_NATIVE=ON")
    subprocess.run([str(python), "-m", "pip", "install", f"llama-cpp-python=={LLAMA_CPP_VERSION}"],
                   check=True, env=env)
    return python


def write_q8_0(source: Path, out: Path) -> Path:
    """A Q8_0 copy of `source`: its metadata as is, every tensor the source
    stores quantized dequantized and quantized to Q8_0 (F32 tensors stay F32)."""
    import gguf
    import numpy as np

    reader = gguf.GGUFReader(str(source))
    arch = reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(str(out), arch)
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        value_type = field.types[0]
        if value_type == gguf.GGUFValueType.ARRAY:
            writer.add_key_value(key, field.contents(), value_type, sub_type=field.types[-1])
        else:
            writer.add_key_value(key, field.contents(), value_type)
    for tensor in reader.tensors:
        shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
        if tensor.tensor_type == gguf.GGMLQuantizationType.F32:
            writer.add_tensor(tensor.name, np.array(tensor.data, dtype=np.float32))
            continue
        values = gguf.dequantize(tensor.data, tensor.tensor_type).reshape(shape)
        blocks = gguf.quants.quantize(values.astype(np.float32), gguf.GGMLQuantizationType.Q8_0)
        writer.add_tensor(tensor.name, blocks, raw_shape=blocks.shape,
                          raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


# ---------------------------------------------------------------------- workers


def _peak_rss_mib() -> float:
    """This process's own peak resident memory, ``VmHWM``: not ``ru_maxrss``, which
    Linux carries across exec from the process that started it (a worker spawned by
    a parent that had just written a 500 MiB file reported 504 MiB on both sides)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _rss_now_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def kv_cache_bytes(path: str, tokens: int) -> int:
    """Bytes of a bf16 KV cache (llama.cpp's is f16: the same size) of `tokens`
    tokens for the model in the GGUF file `path`."""
    sys.path.insert(0, str(ROOT))
    from engine.model_loader.gguf import GGUFFile

    cfg = GGUFFile.open(path).hf_config()  # the parse the engine then reuses
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    return tokens * 2 * cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * head_dim * 2


def engine_generator(path: str, kv_tokens: int | None, quantization: str | None = None,
                     settings: dict | None = None):
    sys.path.insert(0, str(ROOT))
    from engine import LLM, SamplingParams

    kwargs = dict(settings or {})
    if kv_tokens is not None:  # the same KV capacity as llama.cpp's n_ctx
        kwargs["kv_cache_memory"] = kv_cache_bytes(path, kv_tokens)
    llm = LLM(path, seed=0, quantization=quantization, **kwargs)

    def generate(prompts, out_lens, batched=True):
        params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in out_lens]
        if batched:
            return [list(o.outputs[0].token_ids) for o in llm.generate(prompts, params)]
        return [list(llm.generate([p], [s])[0].outputs[0].token_ids)
                for p, s in zip(prompts, params, strict=True)]

    info = {"quantized_layers": len(llm.llm_engine.quantized_layers())}
    return generate, info


def llamacpp_generator(path: str, kv_tokens: int | None):
    from llama_cpp import Llama

    llm = Llama(model_path=path, n_ctx=kv_tokens or N_CTX, n_threads=THREADS,
                n_threads_batch=THREADS, n_batch=512, seed=0, verbose=False)

    def one(prompt, n):
        out = []
        # generate() samples until told to stop: EOS is ignored by counting tokens
        for token in llm.generate(prompt, temp=0.0, top_k=1, reset=True):
            out.append(token)
            if len(out) == n:
                break
        return out

    def generate(prompts, out_lens, batched=False):
        return [one(p, n) for p, n in zip(prompts, out_lens, strict=True)]

    import llama_cpp

    return generate, {"llama_cpp_python": llama_cpp.__version__,
                      "system_info": llama_cpp.llama_print_system_info().decode().strip()}


def describe_llamacpp(ready: dict) -> str:
    """The llama.cpp build's CPU features, and whether its AMX path is on."""
    info = ready.get("system_info", "")
    amx = "AMX_INT8 = 1" in info
    line = f"llama.cpp {ready.get('llama_cpp_python', '?')} CPU backend: {info}"
    if not amx and "amx_int8" in cpu_description()["flags"]:
        line += ("\nllama.cpp's AMX path is OFF in this build although the CPU has AMX: "
                 "llama-cpp-python 0.3.36 built with -DGGML_NATIVE=ON (AMX on) dies with SIGSEGV "
                 "in ggml's AMX mul_mat on this machine, so the peer is a native build without "
                 "AMX (its AVX512-VNNI/BF16 paths)")
    return line


def run_worker(side: str, path: str, kv_tokens: int | None, rss_only: bool,
               vocab: int = 40000) -> int:
    if side == "engine":
        generate, info = engine_generator(path, kv_tokens)
    elif side == "engine-like-llamacpp":  # peak RSS only: llama.cpp's sizes, not the defaults
        generate, info = engine_generator(path, kv_tokens, settings=LIKE_LLAMACPP)
    elif side == "engine-dequantized":  # the engine before this change: weights widened at load
        generate, info = engine_generator(path, kv_tokens, quantization="none")
    else:
        generate, info = llamacpp_generator(path, kv_tokens)
    if rss_only:
        rng = random.Random(7)
        generate([[rng.randrange(10, vocab) for _ in range(256)]], [64])
        reply({"peak_rss_mib": _peak_rss_mib(), "rss_mib": _rss_now_mib(), **info})
        return 0
    reply({"ready": True, "peak_rss_mib": _peak_rss_mib(), **info})
    for line in sys.stdin:
        cmd = json.loads(line)
        start = time.perf_counter()
        tokens = generate(cmd["prompts"], cmd["out_lens"], cmd.get("batched", False))
        elapsed = time.perf_counter() - start
        reply({"seconds": elapsed, "tokens": sum(len(t) for t in tokens),
                "peak_rss_mib": _peak_rss_mib()})
    return 0



class Prompts:
    """Fresh random prompts: no two calls share a token prefix."""

    def __init__(self, vocab: int, seed: int) -> None:
        self.rng = random.Random(seed)
        self.vocab = vocab

    def one(self, length: int) -> list[int]:
        return [self.rng.randrange(10, self.vocab) for _ in range(length)]

    def workload(self, n: int) -> tuple[list[list[int]], list[int]]:
        return ([self.one(self.rng.randint(32, 256)) for _ in range(n)],
                [self.rng.randint(32, 96) for _ in range(n)])


def measure(sides: dict[str, Side], prompts: Prompts, rounds: int, requests: int,
            serial_requests: int) -> dict:
    runs = {s: {"decode_ms": [], "ttft_ms": [], "serial_tok_s": [], "batched_tok_s": []}
            for s in sides}
    names = list(sides)
    for r in range(rounds):
        order = names if r % 2 == 0 else names[::-1]
        # the same prompts for both sides (each has its own cache), new ones every
        # round and every call: neither side ever gets a cached prefix
        decode_one, decode_many = prompts.one(DECODE_PROMPT), prompts.one(DECODE_PROMPT)
        ttft = prompts.one(TTFT_PROMPT)
        work, out_lens = prompts.workload(serial_requests)
        batch_work, batch_lens = prompts.workload(requests)
        for name in order:
            side = take_turn(sides, name)  # the other side paused
            note(f"  round {r + 1}: {name}")
            one = side.ask(prompts=[decode_one], out_lens=[1])["seconds"]
            many = side.ask(prompts=[decode_many], out_lens=[DECODE_TOKENS])["seconds"]
            runs[name]["decode_ms"].append((many - one) / (DECODE_TOKENS - 1) * 1000)
            runs[name]["ttft_ms"].append(side.ask(prompts=[ttft], out_lens=[1])["seconds"] * 1000)
            res = side.ask(prompts=work, out_lens=out_lens)
            runs[name]["serial_tok_s"].append(res["tokens"] / res["seconds"])
            if name == "engine":
                res = side.ask(prompts=batch_work, out_lens=batch_lens, batched=True)
                runs[name]["batched_tok_s"].append(res["tokens"] / res["seconds"])
    return runs


def vocab_size(path: Path) -> int:
    """The number of tokens in the GGUF file's vocabulary: prompts draw their ids
    below it (the peer's environment has no `gguf` package: the driver reads it)."""
    import gguf

    return len(gguf.GGUFReader(str(path)).fields["tokenizer.ggml.tokens"].data)


def rss_of(side: str, python: str, path: Path, env: dict) -> dict:
    cmd = [python, str(Path(__file__).resolve()), "--worker", side, "--path", str(path),
           "--kv-tokens", str(RSS_CTX), "--rss-only", "--vocab", str(vocab_size(path))]
    out = subprocess.run(cmd, env=env, cwd=str(ROOT), capture_output=True, text=True, check=True)
    line = next(line for line in out.stdout.splitlines() if line.startswith(RESULT_PREFIX))
    return json.loads(line[len(RESULT_PREFIX):])


def summarise(runs: dict, rss: dict, peer: str) -> dict:
    e, lc = runs["engine"], runs[peer]
    return {
        "decode_ms": {"engine": min(e["decode_ms"]), peer: min(lc["decode_ms"]),
                      "engine_runs": e["decode_ms"], "llama_runs": lc["decode_ms"]},
        "ttft_ms": {"engine": min(e["ttft_ms"]), peer: min(lc["ttft_ms"]),
                    "engine_runs": e["ttft_ms"], "llama_runs": lc["ttft_ms"]},
        "serial_tok_s": {"engine": max(e["serial_tok_s"]), peer: max(lc["serial_tok_s"]),
                         "engine_runs": e["serial_tok_s"], "llama_runs": lc["serial_tok_s"]},
        "batched_tok_s": {"engine": max(e["batched_tok_s"]), "engine_runs": e["batched_tok_s"]},
        "peak_rss_mib": {"engine": rss["engine"]["peak_rss_mib"],
                         peer: rss[peer]["peak_rss_mib"]},
        "rss_after_mib": {"engine": rss["engine"]["rss_mib"], peer: rss[peer]["rss_mib"]},
        "like_llamacpp_rss_mib": {"peak": rss["engine-like-llamacpp"]["peak_rss_mib"],
                                  "after": rss["engine-like-llamacpp"]["rss_mib"]},
    }


def print_summary(name: str, s: dict, peer: str) -> None:
    d, t, se, b, m = (s[k] for k in ("decode_ms", "ttft_ms", "serial_tok_s", "batched_tok_s",
                                      "peak_rss_mib"))
    rng = lambda runs: f"{min(runs):.1f}-{max(runs):.1f}"  # noqa: E731
    print(f"\n{name}")
    print(f"| measure | engine | {peer} | engine / {peer} | per-round range (engine; {peer}) |")
    print("|---|---:|---:|---:|---|")
    print(f"| decode, ms/token (best) | {d['engine']:.2f} | {d[peer]:.2f} | "
          f"{d['engine'] / d[peer]:.2f}x | {rng(d['engine_runs'])}; {rng(d['llama_runs'])} |")
    print(f"| TTFT, fresh {TTFT_PROMPT}-token prompt, ms | {t['engine']:.0f} | {t[peer]:.0f} | "
          f"{t['engine'] / t[peer]:.2f}x | {rng(t['engine_runs'])}; {rng(t['llama_runs'])} |")
    print(f"| serial throughput, tok/s | {se['engine']:.1f} | {se[peer]:.1f} | "
          f"{se['engine'] / se[peer]:.2f}x | {rng(se['engine_runs'])}; {rng(se['llama_runs'])} |")
    print(f"| batched throughput (engine) vs {peer} serial, tok/s | {b['engine']:.1f} | "
          f"{se[peer]:.1f} | {b['engine'] / se[peer]:.2f}x | {rng(b['engine_runs'])} |")
    print(f"| peak RSS, MiB ({RSS_CTX}-token KV) | {m['engine']:.0f} | {m[peer]:.0f} | "
          f"{m['engine'] / m[peer]:.2f}x | |")
    a = s["rss_after_mib"]
    print(f"| RSS after the request, MiB | {a['engine']:.0f} | {a[peer]:.0f} | "
          f"{a['engine'] / a[peer]:.2f}x | |")
    like = s["like_llamacpp_rss_mib"]
    print(f"| peak RSS, MiB, engine sized like llama.cpp ({LIKE_LLAMACPP}) | {like['peak']:.0f} "
          f"| {m[peer]:.0f} | {like['peak'] / m[peer]:.2f}x | |")


def print_rss(name: str, rss: dict, peer: str) -> None:
    """The peak RSS rows alone (``--rss-only``)."""
    base = rss[peer]["peak_rss_mib"]
    print(f"\n{name}: peak RSS, MiB ({RSS_CTX}-token KV; after the request in brackets)")
    print(f"| side | peak | / {peer} |")
    print("|---|---:|---:|")
    for side in ("engine", "engine-like-llamacpp", peer):
        r = rss[side]
        print(f"| {side} | {r['peak_rss_mib']:.0f} ({r['rss_mib']:.0f}) | "
              f"{r['peak_rss_mib'] / base:.2f}x |")


def start_side(name: str, python: str, path: Path, env: dict) -> Side:
    """One measured side in its own process (see run_worker)."""
    cmd = [python, str(Path(__file__).resolve()), "--worker", name, "--path", str(path)]
    return Side(name, cmd, env, ROOT)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gguf", help="comma-separated GGUF files")
    ap.add_argument("--write-q8_0", type=Path, help="first write a Q8_0 copy of the first file here "
                                                     "and measure it too")
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds per side")
    ap.add_argument("--requests", type=int, default=32, help="requests of the batched run")
    ap.add_argument("--serial-requests", type=int, default=12,
                    help="requests of the serial run (one after another: a rate, so fewer "
                         "requests keep a two-file, two-round run within minutes)")
    ap.add_argument("--llamacpp-venv", type=Path, default=DEFAULT_VENV)
    ap.add_argument("--peer", choices=("llama.cpp", "engine-dequantized"), default="llama.cpp",
                    help="the other side: llama.cpp, or this engine with quantization='none' "
                         "(every weight widened at load, the engine's behaviour before)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--worker", choices=("engine", "engine-dequantized", "engine-like-llamacpp",
                                         "llama.cpp"),
                    help=argparse.SUPPRESS)
    ap.add_argument("--path", help=argparse.SUPPRESS)
    ap.add_argument("--kv-tokens", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--vocab", type=int, default=40000, help=argparse.SUPPRESS)
    ap.add_argument("--rss-only", action="store_true",
                    help="only the peak RSS rows (fresh processes, no timings: minutes, and "
                         "independent of the machine's load)")
    args = ap.parse_args()
    if args.worker:
        return run_worker(args.worker, args.path, args.kv_tokens, args.rss_only, args.vocab)
    if not args.gguf:
        ap.error("--gguf is required")

    cpu = cpu_description()
    print(f"CPU: {cpu['model']} ({cpu['cores']} logical CPUs); flags: {' '.join(cpu['flags'])}")
    print(f"load average before: {os.getloadavg()}")
    files = [Path(p) for p in args.gguf.split(",")]
    if args.write_q8_0:
        note(f"writing {args.write_q8_0} (Q8_0 copy of {files[0].name})")
        files.append(write_q8_0(files[0], args.write_q8_0))
    peer = args.peer
    peer_python = (str(ensure_llamacpp_venv(args.llamacpp_venv)) if peer == "llama.cpp"
                   else sys.executable)
    # the compiled kernels, built only when this checkout's are not cached yet
    # (``python -m engine.kernels build`` would rebuild them: minutes)
    subprocess.run([sys.executable, "-c", "import engine.kernels as k; "
                    "k.library_path().exists() or k.build()"], check=True, cwd=str(ROOT),
                   capture_output=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(THREADS), HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", ENGINE_CPU_KERNELS="build")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    pythons = {"engine": sys.executable, peer: peer_python}
    results = {"cpu": cpu, "peer": peer, "load_before": os.getloadavg(), "rounds": args.rounds,
               "files": {}}
    for path in files:
        note(f"{path.name}: peak RSS, one fresh process per side")
        rss = {side: rss_of(side, py, path, env) for side, py in pythons.items()}
        rss["engine-like-llamacpp"] = rss_of("engine-like-llamacpp", sys.executable, path, env)
        if args.rss_only:
            results["files"][path.name] = {"rss": rss}
            print_rss(path.name, rss, peer)
            continue
        note(f"{path.name}: starting both sides")
        sides: dict[str, Side] = {}
        try:
            for side, py in pythons.items():
                sides[side] = start_side(side, py, path, env)
            prompts = Prompts(vocab_size(path), args.seed)
            for side in sides.values():  # warm-up
                side.ask(prompts=[prompts.one(16)], out_lens=[4])
            if peer == "llama.cpp":
                print(describe_llamacpp(sides[peer].ready))
            load_start = os.getloadavg()
            runs = measure(sides, prompts, args.rounds, args.requests, args.serial_requests)
            summary = summarise(runs, rss, peer)
            summary.update(load=[load_start, os.getloadavg()],
                           workers={k: s.ready for k, s in sides.items()})
            results["files"][path.name] = summary
            print_summary(f"{path.name} (load average {load_start[0]:.1f} -> "
                          f"{os.getloadavg()[0]:.1f})", summary, peer)
        finally:
            for side in sides.values():
                side.close()
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
