"""Beyond one process: data-parallel serving and the Ray executor, each against
its one-machine baseline, in alternating rounds.

    python benchmarks/bench_distributed.py                 # both parts
    python benchmarks/bench_distributed.py --part dp       # DP=2 vs DP=1 serving
    python benchmarks/bench_distributed.py --part tp       # Ray TP=2 vs mp TP=2

Model: benchmarks/bench_serve.py's random Llama (--quick shape by default here:
hidden 256, 4 layers, vocab 8192; --full for the 25M-parameter one).

dp: two `engine serve` subprocesses on the same model, one with
``--data-parallel-size 2`` and one without; each round sends the same workload
(--requests concurrent streaming requests, prompt lengths 32-128, 32-64 output
tokens, greedy, ignore_eos) to one then the other (the order flips every round).
Throughput is output tokens / wall time of the round (bench_serve's client).
Both servers run with OMP_NUM_THREADS=1 (one torch thread per engine).

tp: two `LLM`s in this process with tensor_parallel_size=2, one with the
default local worker processes (mp) and one with Ray actors (a private local Ray
instance); each round runs `LLM.generate` on the same batch on both, order
flipped every round, and checks that both produce the same tokens.

Ratios are per round (the other side measured right before or after), reported
as the median with the range over rounds; the machine's load average is printed
at the start and the end. Results: docs/benchmarks.md ("Distributed").
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from bench_serve import FULL, QUICK, build_model, free_port, note, serve_round, workload  # noqa: E402


def load_average() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def ratio_summary(ratios: list[float]) -> str:
    return (f"{statistics.median(ratios):.2f}x (rounds: "
            + ", ".join(f"{r:.2f}" for r in ratios) + f"; range {min(ratios):.2f}-"
            f"{max(ratios):.2f})")


# ------------------------------------------------------------------ data parallel


def start_server(model: Path, extra: list[str]) -> tuple[subprocess.Popen, str]:
    import httpx

    port = free_port()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    # one torch thread per engine on both sides: on a loaded small machine, OpenMP
    # thread teams that spin for cores other processes hold make every op crawl,
    # and the replicas of DP=2 are meant to run side by side, not share a team
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.Popen([sys.executable, "-m", "engine", "serve", "--model", str(model),
                             "--port", str(port), "--dtype", "float32", "--disable-log-stats",
                             *extra], env=env, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server {extra} exited with {proc.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"the server {extra} did not become ready in 300 s")


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def data_parallel(model: Path, shape: dict, args: argparse.Namespace) -> None:
    prompts, outputs = workload(args.requests, shape["vocab_size"], (32, 128), (32, 64), seed=0)
    note("starting the DP=1 and DP=2 servers")
    servers = {}
    try:
        servers[1] = start_server(model, [])
        servers[2] = start_server(model, ["--data-parallel-size", "2"])
        for dp in (1, 2):  # warm-up
            asyncio.run(serve_round(servers[dp][1], prompts[:4], outputs[:4]))
        rates: dict[int, list[float]] = {1: [], 2: []}
        for r in range(args.rounds):
            order = (1, 2) if r % 2 == 0 else (2, 1)
            for dp in order:
                result = asyncio.run(serve_round(servers[dp][1], prompts, outputs))
                rates[dp].append(result["tok_per_s"])
            note(f"round {r + 1}: DP=1 {rates[1][-1]:.0f} tok/s, DP=2 {rates[2][-1]:.0f} tok/s")
    finally:
        for proc, _ in servers.values():
            stop_server(proc)
    ratios = [b / a for a, b in zip(rates[1], rates[2], strict=True)]
    print(f"DP serving, {args.requests} concurrent requests, {sum(outputs)} output tokens "
          "per round")
    print(f"  DP=1: best {max(rates[1]):.0f} tok/s, median {statistics.median(rates[1]):.0f}")
    print(f"  DP=2: best {max(rates[2]):.0f} tok/s, median {statistics.median(rates[2]):.0f}")
    print(f"  DP=2 / DP=1: {ratio_summary(ratios)}")


# ------------------------------------------------------------------ Ray vs mp TP=2


def tensor_parallel(model: Path, shape: dict, args: argparse.Namespace) -> None:
    from engine import LLM, SamplingParams

    prompts, outputs = workload(args.batch, shape["vocab_size"], (32, 128), (32, 32), seed=1)
    params = SamplingParams(temperature=0.0, max_tokens=outputs[0], ignore_eos=True)
    note("starting TP=2 over local processes (mp) and over Ray actors")
    llms = {
        "mp": LLM(str(model), tensor_parallel_size=2, dtype="float32",
                  kv_cache_memory=64 * 2**20),
        "ray": LLM(str(model), tensor_parallel_size=2, dtype="float32",
                   kv_cache_memory=64 * 2**20, distributed_executor_backend="ray"),
    }
    try:
        for llm in llms.values():  # warm-up
            llm.generate(prompts[:2], params)
        rates: dict[str, list[float]] = {"mp": [], "ray": []}
        tokens: dict[str, list[list[int]]] = {}
        for r in range(args.rounds):
            order = ("mp", "ray") if r % 2 == 0 else ("ray", "mp")
            for name in order:
                start = time.perf_counter()
                outs = llms[name].generate(prompts, params)
                wall = time.perf_counter() - start
                tokens[name] = [o.outputs[0].token_ids for o in outs]
                rates[name].append(sum(len(t) for t in tokens[name]) / wall)
            if tokens["mp"] != tokens["ray"]:
                raise SystemExit("Ray and mp TP=2 produced different tokens")
            note(f"round {r + 1}: mp {rates['mp'][-1]:.0f} tok/s, ray {rates['ray'][-1]:.0f} tok/s")
    finally:
        for llm in llms.values():
            llm.shutdown()
    ratios = [b / a for a, b in zip(rates["mp"], rates["ray"], strict=True)]
    print(f"TP=2 offline generate, batch {args.batch}, {outputs[0]} output tokens each")
    print(f"  mp:  best {max(rates['mp']):.0f} tok/s, median {statistics.median(rates['mp']):.0f}")
    print(f"  ray: best {max(rates['ray']):.0f} tok/s, median {statistics.median(rates['ray']):.0f}")
    print(f"  Ray / mp: {ratio_summary(ratios)}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--part", choices=("dp", "tp", "all"), default="all")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=32, help="dp: concurrent requests")
    parser.add_argument("--batch", type=int, default=16, help="tp: prompts per generate call")
    parser.add_argument("--full", action="store_true", help="the 25M-parameter model")
    args = parser.parse_args()
    shape = FULL if args.full else QUICK
    print(f"load average at start: {load_average()} ({os.cpu_count()} CPUs)")
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp)
        params = build_model(model, shape)
        print(f"model: random Llama, {params / 1e6:.1f}M parameters")
        if args.part in ("dp", "all"):
            data_parallel(model, shape, args)
        if args.part in ("tp", "all"):
            tensor_parallel(model, shape, args)
    print(f"load average at end: {load_average()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
