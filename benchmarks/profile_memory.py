"""Where a GGUF run's resident memory goes: RSS at each stage of `LLM(path)` and a first request.

    python benchmarks/profile_memory.py --gguf SmolLM2-135M-Instruct.Q4_1.gguf
    python benchmarks/profile_memory.py --gguf model.gguf --kv-tokens 0   # the engine's defaults
    python benchmarks/profile_memory.py --gguf model.gguf --json out.json

One fresh process, stage by stage: the interpreter, ``import torch``, ``import
engine``, building `LLM(path)` (tokenizer, model built, weights read, quantized
layers finished, KV cache allocated, warm-up) and one request of 256 prompt + 64
output tokens, as `bench_vs_llamacpp.py`'s RSS measurement runs it. For each
stage: ``VmRSS`` at its end, split into ``RssAnon`` (heap, tensors) and
``RssFile`` (shared libraries, memory-mapped files), and the stage's own peak
(``VmHWM``, reset at the stage's start by writing 5 to /proc/self/clear_refs,
so a transient copy shows in the stage that made it). The process peak is the
largest stage peak. The stages inside `LLM()` are marked by wrapping the engine
functions that begin them (the script changes nothing they do).

``--fresh-prompts N`` then sends N requests of fresh 32-256-token prompts and
prints RSS every 20 (a process that keeps growing shows here, not in the peak
of one request).

``--kv-tokens N`` (default 2048, llama.cpp's ``n_ctx`` in the comparison) sets
``kv_cache_memory`` to N tokens of bf16 K and V; ``--kv-tokens 0`` keeps the
engine's default KV sizing (what a user who passes nothing gets). The run also
lists the modules a GGUF run imported that are big (transformers, jinja2,
pydantic, ...), and the engine settings that size buffers (``max_num_seqs``,
``max_num_batched_tokens``, ``max_model_len``, KV blocks).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import random
import sys
import time
from pathlib import Path

from bench_vs_llamacpp import LIKE_LLAMACPP, ROOT, kv_cache_bytes

sys.path.insert(0, str(ROOT))

_FIELDS = ("VmRSS", "RssAnon", "RssFile", "VmHWM")
# modules worth knowing about when a GGUF run imports them
_WATCHED = ("transformers", "jinja2", "pydantic", "safetensors", "gguf", "numpy", "tokenizers",
            "sympy", "torch._dynamo", "torch._inductor", "scipy", "tqdm", "openai", "fastapi",
            "huggingface_hub", "llguidance", "PIL", "triton")


def status() -> dict[str, float]:
    """The /proc/self/status memory fields, MiB."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in _FIELDS:
                out[key] = int(value.split()[0]) / 1024
    return out


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]


def malloc_free_mib() -> float:
    """Bytes glibc's malloc holds free in its arenas (``mallinfo2().fordblks``,
    all arenas), MiB: memory freed by the program but not given back to the
    kernel (part of it resident). NaN without glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _MallInfo2
    except (OSError, AttributeError):
        return float("nan")
    return libc.mallinfo2().fordblks / 2**20


def reset_peak() -> None:
    """Start a new VmHWM from the current RSS (Linux: clear_refs 5)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


class Stages:
    """Each stage's end-of-stage RSS and its own peak, printed as they end."""

    def __init__(self) -> None:
        self.rows: list[dict] = []
        self.start = time.perf_counter()

    def mark(self, name: str) -> None:
        """End the current stage as `name` and begin the next."""
        row = {"stage": name, **status(), "t_s": round(time.perf_counter() - self.start, 3)}
        row["peak"] = row.pop("VmHWM")
        row["malloc_free"] = malloc_free_mib()
        self.rows.append(row)
        print(f"{name:<34} rss {row['VmRSS']:7.1f}  anon {row['RssAnon']:7.1f}  "
              f"file {row['RssFile']:6.1f}  stage peak {row['peak']:7.1f}  "
              f"malloc free {row['malloc_free']:6.1f} MiB  "
              f"({row['t_s']:.1f} s)", flush=True)
        reset_peak()


def instrument(stages: Stages) -> None:
    """Mark a stage where each step of `LLM()` begins (the wrapped functions
    run as they are)."""
    import engine.model_loader.loader as loader
    import engine.tokenizer as tokenizer
    from engine.worker.model_runner import ModelRunner
    from engine.worker.worker import Worker

    def before(owner, attr: str, label: str) -> None:
        original = getattr(owner, attr)

        def wrapped(*args, **kwargs):
            stages.mark(label)
            return original(*args, **kwargs)

        setattr(owner, attr, wrapped)

    # each label names the stage that ends where the wrapped function starts
    before(tokenizer, "load_tokenizer", "LLM(): config, plugins")
    before(Worker, "load_model", "LLM(): tokenizer, worker set-up")
    before(loader.GGUFLoader, "iter_weights", "model built (float parameters)")
    before(loader, "finish_quantized_layers", "weights read")
    before(ModelRunner, "pack_weights", "quantized layers finished")
    before(Worker, "determine_available_memory", "weights packed, sampler built")
    before(Worker, "initialize_cache", "memory sizing")
    before(Worker, "compile_or_warm_up_model", "KV cache allocated")

    # the warm-up step by step: which step shape grows the process
    warm_up, execute = ModelRunner.warm_up, ModelRunner.execute_model
    in_warm_up = [False]

    def warm_up_marked(self, *args, **kwargs):
        in_warm_up[0] = True
        try:
            return warm_up(self, *args, **kwargs)
        finally:
            in_warm_up[0] = False

    def execute_marked(self, step, *args, **kwargs):
        out = execute(self, step, *args, **kwargs)
        if in_warm_up[0] and step.scheduled:
            prompts = sum(1 for s in step.scheduled if len(s.token_ids) > 1)
            stages.mark(f"  warm-up step: {len(step.scheduled)} seqs, "
                        f"{step.num_batched_tokens} tokens, {prompts} prompt(s)")
        return out

    ModelRunner.warm_up, ModelRunner.execute_model = warm_up_marked, execute_marked


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gguf", required=True, help="the GGUF file")
    ap.add_argument("--kv-tokens", type=int, default=2048,
                    help="KV capacity in tokens (0: the engine's default sizing)")
    ap.add_argument("--quantization", default=None, help="LLM(quantization=...)")
    ap.add_argument("--like-llamacpp", action="store_true",
                    help="one sequence, 512-token steps, a 2048-token context: what "
                         "llama-cpp-python's Llama(n_ctx=2048, n_batch=512) serves")
    ap.add_argument("--fresh-prompts", type=int, default=0,
                    help="then N requests of fresh 32-256-token prompts one after another, "
                         "RSS every 20: whether the process keeps growing")
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args()

    stages = Stages()
    stages.mark("interpreter")
    import torch  # noqa: F401

    stages.mark("import torch")
    import engine  # noqa: F401
    from engine import LLM, SamplingParams

    stages.mark("import engine")
    instrument(stages)
    kwargs = {}
    if args.kv_tokens:
        kwargs["kv_cache_memory"] = kv_cache_bytes(args.gguf, args.kv_tokens)
    if args.like_llamacpp:
        kwargs.update(LIKE_LLAMACPP)
    llm = LLM(args.gguf, seed=0, quantization=args.quantization, **kwargs)
    stages.mark("warm-up")
    rng = random.Random(7)
    prompt = [rng.randrange(10, 40000) for _ in range(256)]
    llm.generate([prompt], [SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True)])
    stages.mark("first request (256 + 64 tokens)")

    growth = [status()["VmRSS"]]
    for i in range(args.fresh_prompts):
        prompt = [rng.randrange(10, 40000) for _ in range(rng.randint(32, 256))]
        llm.generate([prompt], [SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True)])
        if i % 20 == 19 or i == args.fresh_prompts - 1:
            growth.append(status()["VmRSS"])
    if args.fresh_prompts:
        stages.mark(f"{args.fresh_prompts} fresh prompts")
        print(f"RSS after 0, 20, 40, ... of {args.fresh_prompts} fresh prompts (32-256 tokens), "
              f"MiB: {', '.join(f'{v:.0f}' for v in growth)}")
    peak = max(row["peak"] for row in stages.rows)
    worst = max(stages.rows, key=lambda row: row["peak"])
    config = llm.llm_engine.config
    settings = {
        "max_num_seqs": config.scheduler_config.max_num_seqs,
        "max_num_batched_tokens": config.scheduler_config.max_num_batched_tokens,
        "max_model_len": config.model_config.max_model_len,
        "kv_blocks": config.cache_config.num_blocks,
        "block_size": config.cache_config.block_size,
        "kv_tokens": (config.cache_config.num_blocks or 0) * config.cache_config.block_size,
        "dtype": str(llm.llm_engine.config.model_config.dtype),
    }
    layers = llm.llm_engine.quantized_layers()
    imported = sorted(m for m in _WATCHED if m in sys.modules)
    print(f"process peak {peak:.1f} MiB, in stage {worst['stage']!r}")
    print(f"settings: {settings}")
    print(f"quantized layers: {len(layers)}")
    print(f"watched modules imported: {', '.join(imported) or 'none'}")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": stages.rows, "peak_mib": peak,
                                               "fresh_prompts_rss_mib": growth,
                                               "settings": settings, "imported": imported},
                                              indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
