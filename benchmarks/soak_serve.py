"""Soak test: mixed valid, invalid and abandoned requests against `engine serve`.

    python benchmarks/soak_serve.py                    # 10 minutes, bfloat16
    python benchmarks/soak_serve.py --duration 60      # a short run

Starts one `engine serve` on 127.0.0.1 in bfloat16 (the embedded default model
unless --model names a folder; a model whose context is shorter than --context
is served from a copy whose config.json says --context positions: RoPE has no
learned positions, so the random test model runs at any length), then
`--concurrency` clients send requests until `--duration` seconds have passed,
each request drawn at random (fixed --seed); valid prompts are 16-1500 tokens
long by default, so the server sees new prompt shapes all along:

- valid: completions (plain and streamed), chat with a request template,
  several prompts in one request, seeded sampling;
- invalid: out-of-vocabulary and huge token ids, a seed outside 64 bits, lone
  surrogates, malformed JSON, a wrong field type, a prompt far past the context,
  a chat template that raises or builds a 100 MB string;
- abandoned: a stream dropped after a few events, a non-streamed request whose
  client gives up after 0.2 s.

At the end it waits for the engine to go idle and reports requests served,
answers by kind and HTTP status, the server's RSS (with its children) at the start
and the end, and `/health`'s KV-cache usage and unfinished requests, which must be
back to 0. Exit code 1 when the server died, answered a 5xx, or did not return
to idle. Not part of the test suite (it runs for minutes).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
from bench_generate import note
from bench_serve import free_port, start_server  # the one way the benchmarks start a server

ROOT = Path(__file__).resolve().parent.parent
TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def rss_mib(pid: int) -> float:
    """The server's resident memory, its worker processes included."""
    process = psutil.Process(pid)
    total = process.memory_info().rss
    for child in process.children(recursive=True):
        try:
            total += child.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total / 2**20


class Soak:
    """The request mix and its tallies."""

    def __init__(self, url: str, vocab_size: int, max_model_len: int, seed: int) -> None:
        self.url = url
        self.vocab = vocab_size
        self.max_model_len = max_model_len
        self.rng = random.Random(seed)
        self.counts: collections.Counter[tuple[str, str]] = collections.Counter()
        self.kinds = [
            # (kind, weight, coroutine factory)
            ("valid completion", 6, self.valid_completion),
            ("valid stream", 6, self.valid_stream),
            ("valid chat", 3, self.valid_chat),
            ("valid batch of 3", 2, self.valid_batch),
            ("abandoned stream", 4, self.abandoned_stream),
            ("abandoned request", 2, self.abandoned_request),
            ("invalid: out-of-vocabulary id", 1, lambda c: self.post(
                c, "/v1/completions", {"prompt": [5, self.vocab], "max_tokens": 4})),
            ("invalid: streamed oov id", 1, lambda c: self.post(
                c, "/v1/completions", {"prompt": [self.vocab + 7], "stream": True})),
            ("invalid: id 2**62", 1, lambda c: self.post(
                c, "/v1/completions", {"prompt": [2**62], "max_tokens": 4})),
            ("invalid: seed 2**64", 1, lambda c: self.post(
                c, "/v1/completions", {"prompt": "x", "seed": 2**64, "temperature": 1})),
            ("invalid: lone surrogate", 1, lambda c: self.post(
                c, "/v1/completions", {"prompt": "ab\ud800", "max_tokens": 4})),
            ("invalid: malformed json", 1, lambda c: self.post(
                c, "/v1/completions", b'{"prompt": "x",')),
            ("invalid: wrong type", 1, lambda c: self.post(
                c, "/v1/completions", {"prompt": "x", "max_tokens": "many"})),
            ("invalid: past the context", 1, lambda c: self.post(
                c, "/v1/completions", {"prompt": "word " * (self.max_model_len * 40)})),
            ("invalid: template raises", 1, lambda c: self.post(
                c, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                                            "chat_template": "{{ (10**400) * 1.0 }}"})),
            ("invalid: 100 MB template", 1, lambda c: self.post(
                c, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                                            "chat_template": "{{ 'a' * 10**8 }}"})),
        ]
        self.weights = [w for _, w, _ in self.kinds]

    min_prompt_len, max_prompt_len = 16, 1500  # --min/max-prompt-len

    def prompt(self) -> list[int]:
        # room for the 400 tokens of the longest requests
        longest = max(self.min_prompt_len, min(self.max_prompt_len, self.max_model_len - 480))
        shortest = min(self.min_prompt_len, longest)
        return [self.rng.randrange(3, self.vocab)
                for _ in range(self.rng.randint(shortest, longest))]

    async def post(self, client: httpx.AsyncClient, path: str, body: dict | bytes) -> str:
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        response = await client.post(f"{self.url}{path}", content=content,
                                     headers={"Content-Type": "application/json"})
        return str(response.status_code)

    async def valid_completion(self, client: httpx.AsyncClient) -> str:
        return await self.post(client, "/v1/completions", {
            "prompt": self.prompt(), "max_tokens": self.rng.randint(4, 32),
            "temperature": self.rng.choice([0, 0.8]), "seed": self.rng.randrange(2**32)})

    async def valid_batch(self, client: httpx.AsyncClient) -> str:
        return await self.post(client, "/v1/completions", {
            "prompt": [self.prompt() for _ in range(3)], "max_tokens": 8, "temperature": 0})

    async def valid_chat(self, client: httpx.AsyncClient) -> str:
        return await self.post(client, "/v1/chat/completions", {
            "messages": [{"role": "user", "content": "Write a parser."}], "max_tokens": 16,
            "chat_template": TEMPLATE, "temperature": 0})

    async def valid_stream(self, client: httpx.AsyncClient) -> str:
        body = {"prompt": self.prompt(), "max_tokens": self.rng.randint(8, 48),
                "stream": True, "temperature": 0}
        async with client.stream("POST", f"{self.url}/v1/completions", json=body) as response:
            lines = [line async for line in response.aiter_lines() if line]
        if response.status_code == 200 and lines[-1:] != ["data: [DONE]"]:
            return "stream without [DONE]"
        if any('"error"' in line for line in lines):
            return "stream with an error event"
        return str(response.status_code)

    async def abandoned_stream(self, client: httpx.AsyncClient) -> str:
        body = {"prompt": self.prompt(), "max_tokens": 400, "ignore_eos": True, "stream": True}
        async with client.stream("POST", f"{self.url}/v1/completions", json=body) as response:
            keep = self.rng.randint(0, 3)
            read = 0
            async for line in response.aiter_lines():
                if line:
                    read += 1
                if read >= keep:
                    break
        return "dropped"

    async def abandoned_request(self, client: httpx.AsyncClient) -> str:
        body = {"prompt": self.prompt(), "max_tokens": 400, "ignore_eos": True}
        try:
            await client.post(f"{self.url}/v1/completions", json=body, timeout=0.2)
        except httpx.TimeoutException:
            return "gave up"
        return "finished before the client gave up"

    async def worker(self, deadline: float) -> None:
        async with httpx.AsyncClient(timeout=120) as client:
            while time.monotonic() < deadline:
                kind, _, run = self.rng.choices(self.kinds, self.weights)[0]
                try:
                    outcome = await run(client)
                except httpx.HTTPError as exc:
                    outcome = f"transport error {type(exc).__name__}"
                self.counts[(kind, outcome)] += 1


async def soak(url: str, vocab: int, max_model_len: int, duration: float, concurrency: int,
               seed: int, pid: int | None = None, prompt_lens: tuple[int, int] = (16, 1500)
               ) -> Soak:
    run = Soak(url, vocab, max_model_len, seed)
    run.min_prompt_len, run.max_prompt_len = prompt_lens
    deadline = time.monotonic() + duration
    run.rss_timeline = []  # (seconds since the start, MiB), sampled every tenth of the run

    async def sample() -> None:
        start = time.monotonic()
        while pid is not None and time.monotonic() < deadline:
            run.rss_timeline.append((round(time.monotonic() - start), round(rss_mib(pid))))
            await asyncio.sleep(duration / 10)

    await asyncio.gather(sample(), *(run.worker(deadline) for _ in range(concurrency)))
    return run


def wait_idle(url: str, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        health = httpx.get(f"{url}/health", timeout=10).json()
        if health.get("num_unfinished_requests") == 0 or time.monotonic() > deadline:
            return health
        time.sleep(0.2)


def long_context_copy(model: Path, context: int, folder: Path) -> Path:
    """`model` itself when its config.json allows `context` positions, else a copy
    in `folder` (its files linked, config.json rewritten) that does."""
    config = json.loads((model / "config.json").read_text())
    if int(config.get("max_position_embeddings", 0)) >= context:
        return model
    folder.mkdir(parents=True, exist_ok=True)
    for item in model.iterdir():
        if item.name != "config.json" and not (folder / item.name).exists():
            (folder / item.name).symlink_to(item.resolve())
    config["max_position_embeddings"] = context
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=600.0, metavar="S",
                        help="seconds of load (default: 600)")
    parser.add_argument("--concurrency", type=int, default=16, metavar="N",
                        help="clients sending requests at once (default: 16)")
    parser.add_argument("--model", default=None, metavar="DIR",
                        help="model folder (default: the embedded model)")
    parser.add_argument("--dtype", default="bfloat16",
                        help="passed to engine serve (default: bfloat16, whose oneDNN and "
                             "attention kernels are built per shape)")
    parser.add_argument("--context", type=int, default=2048, metavar="N",
                        help="serve a copy of the model with an N-token context when its "
                             "own is shorter (default 2048; 0: the model as it is)")
    parser.add_argument("--kv-cache-memory", default=None, metavar="SIZE",
                        help="passed to engine serve (default: its own)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--min-prompt-len", type=int, default=16, metavar="N")
    parser.add_argument("--max-prompt-len", type=int, default=1500, metavar="N",
                        help="valid prompts are min..max tokens (default 16..1500; capped "
                             "so that prompt and output fit the context)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args()

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = Path(os.environ.get("TMPDIR", "/tmp")) / f"soak_serve_{port}.log"
    model = Path(args.model) if args.model else ROOT / "engine" / "default_model"
    if args.context:
        model = long_context_copy(model, args.context, log.with_suffix(".model"))
    extra = ("--dtype", args.dtype)
    if args.kv_cache_memory is not None:
        extra += ("--kv-cache-memory", args.kv_cache_memory)
    note(f"starting engine serve on {url} with {model} (log: {log})")
    proc = start_server(model, port, extra, log)
    try:
        card = httpx.get(f"{url}/v1/models", timeout=10).json()["data"][0]
        config = json.loads((Path(card["root"]) / "config.json").read_text())
        vocab, max_model_len = int(config["vocab_size"]), int(card["max_model_len"])
        asyncio.run(soak(url, vocab, max_model_len, 5, 2, args.seed + 1))  # warm-up
        wait_idle(url)
        rss_start = rss_mib(proc.pid)
        note(f"soaking for {args.duration:g} s with {args.concurrency} clients")
        started = time.monotonic()
        run = asyncio.run(soak(url, vocab, max_model_len, args.duration, args.concurrency,
                               args.seed, proc.pid,
                               (args.min_prompt_len, args.max_prompt_len)))
        elapsed = time.monotonic() - started
        alive = proc.poll() is None
        health = wait_idle(url) if alive else {}
        rss_end = rss_mib(proc.pid) if alive else float("nan")
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
    by_status: collections.Counter[str] = collections.Counter()
    for (_, outcome), count in run.counts.items():
        by_status[outcome] += count
    served = sum(c for (kind, outcome), c in run.counts.items()
                 if kind.startswith("valid") and outcome == "200")
    failures = [f"{kind}: {outcome}" for (kind, outcome) in run.counts
                if outcome.startswith("5") or "error" in outcome or "without" in outcome
                or (kind.startswith("valid") and outcome != "200")
                or (kind.startswith("invalid") and outcome != "400")]
    idle = health.get("kv_cache_usage") == 0.0 and health.get("num_unfinished_requests") == 0
    # RSS once warmed up (the first sample at or after 60 s): growth from there on
    # is what a long-running server would keep adding
    warm = next((m for t, m in run.rss_timeline if t >= 60), None)
    result = {
        "duration_s": round(elapsed, 1), "concurrency": args.concurrency,
        "dtype": args.dtype, "max_model_len": max_model_len,
        "prompt_lens": [args.min_prompt_len, min(args.max_prompt_len, max_model_len - 480)],
        "requests": sum(run.counts.values()), "valid_requests_served": served,
        "requests_per_s": round(sum(run.counts.values()) / elapsed, 2),
        "by_status": dict(sorted(by_status.items())),
        "by_kind": {f"{k} -> {o}": c for (k, o), c in sorted(run.counts.items())},
        "rss_start_mib": round(rss_start, 1), "rss_end_mib": round(rss_end, 1),
        "rss_after_first_minute_mib": warm,
        "rss_growth_after_first_minute_pct": (round(100 * (rss_end - warm) / warm, 1)
                                              if warm else None),
        "rss_timeline_mib": run.rss_timeline,
        "server_alive": alive, "exit_code": proc.returncode,
        "kv_cache_usage_end": health.get("kv_cache_usage"),
        "unfinished_end": health.get("num_unfinished_requests"),
        "aborted_total": health.get("num_aborted_requests"),
        "unexpected": failures,
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"dtype {args.dtype}, max_model_len {max_model_len}, valid prompts of "
              f"{result['prompt_lens'][0]}-{result['prompt_lens'][1]} tokens")
        print(f"{result['requests']} requests in {elapsed:.0f} s ({result['requests_per_s']}/s, "
              f"{args.concurrency} clients); {served} valid requests served")
        print("by status: " + ", ".join(f"{k} {v}" for k, v in result["by_status"].items()))
        for key, count in result["by_kind"].items():
            print(f"  {count:6d}  {key}")
        print(f"server RSS: {rss_start:.0f} MiB at the start, {rss_end:.0f} MiB at the end; "
              "during the run (s: MiB): "
              + ", ".join(f"{t}: {m}" for t, m in run.rss_timeline))
        if warm:
            print(f"server RSS after the first minute {warm} MiB, at the end {rss_end:.0f} "
                  f"MiB: {result['rss_growth_after_first_minute_pct']:+.1f}%")
        print(f"at the end: kv_cache_usage {health.get('kv_cache_usage')}, unfinished "
              f"{health.get('num_unfinished_requests')}, aborted in total "
              f"{health.get('num_aborted_requests')}; server exit code {proc.returncode}")
        if failures:
            print("UNEXPECTED: " + "; ".join(failures))
    return 0 if alive and idle and not failures else 1


if __name__ == "__main__":
    sys.exit(main())
