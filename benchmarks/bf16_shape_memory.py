"""How resident memory grows with the number of distinct prompt-chunk shapes.

Runs `LLM.generate` in waves of prompts of random lengths (every wave new
lengths, so new matmul shapes) and prints the process's RSS after each wave, in
the dtype given. With ``--same-length`` every prompt has one length: a flat line
there and a rising one with varied lengths points at per-shape caches (oneDNN
creates, and keeps in its primitive cache, one primitive per matmul shape).

    python benchmarks/bf16_shape_memory.py --dtype bfloat16 --waves 12
    python benchmarks/bf16_shape_memory.py --dtype float32 --waves 12
    ONEDNN_PRIMITIVE_CACHE_CAPACITY=0 python benchmarks/bf16_shape_memory.py ...

The KV cache is allocated untouched (calloc) and becomes resident as requests
fill blocks it has not used before: that is growth up to the cache's size, not
per shape, so the KV cache is written once before wave 0 (--untouched-kv-cache
leaves it as the engine does). Besides RSS, the heap glibc's malloc has handed
out (``mallinfo2``) is printed where glibc is the C library: per-shape caches
(oneDNN primitives, torch's kernels) live there.

Results: docs/benchmarks.md, "bf16 memory and prompt shapes".
"""

from __future__ import annotations

import argparse
import ctypes
import random
import time

import psutil


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]


def heap_in_use_mib() -> float | None:
    """Bytes glibc's malloc has handed out and not got back (all arenas and
    mmapped chunks), in MiB; None without glibc."""
    try:
        mallinfo2 = ctypes.CDLL("libc.so.6").mallinfo2
    except (OSError, AttributeError):
        return None
    mallinfo2.restype = _MallInfo2
    info = mallinfo2()
    return (info.uordblks + info.hblkhd) / 2**20


def touch_kv_cache(llm) -> int:
    """Write every page of the KV cache once (see the module's docstring); bytes."""
    from engine.attention.layer import get_attention_layers

    model = llm.llm_engine.executor.worker.model_runner.model
    caches = [layer.kv_cache for layer in get_attention_layers(model)]
    for cache in caches:
        cache.zero_()
    return sum(c.numel() * c.element_size() for c in caches)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="default: the embedded default model")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--waves", type=int, default=12)
    parser.add_argument("--per-wave", type=int, default=16)
    parser.add_argument("--min-len", type=int, default=16)
    parser.add_argument("--max-len", type=int, default=480)
    parser.add_argument("--same-length", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--untouched-kv-cache", action="store_true",
                        help="leave the KV cache untouched, as the engine allocates it")
    args = parser.parse_args()

    import torch

    from engine import LLM, SamplingParams

    torch.set_num_threads(max(1, torch.get_num_threads()))
    llm = LLM(args.model, dtype=args.dtype, kv_cache_memory=64 * 2**20)
    vocab = llm.llm_engine.vocab_size
    if not args.untouched_kv_cache:
        print(f"KV cache: {touch_kv_cache(llm) / 2**20:.0f} MiB written before wave 0")
    rng = random.Random(args.seed)
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    process = psutil.Process()
    lengths_seen: set[int] = set()
    print(f"dtype {args.dtype}, {args.per_wave} prompts per wave, lengths "
          f"{args.min_len}-{args.max_len}{' (one length)' if args.same_length else ''}")
    start = time.monotonic()
    first = first_heap = None
    for wave in range(args.waves):
        prompts = []
        for _ in range(args.per_wave):
            n = args.max_len if args.same_length else rng.randint(args.min_len, args.max_len)
            lengths_seen.add(n)
            prompts.append([rng.randrange(3, vocab) for _ in range(n)])
        for prompt in prompts:  # one at a time: each prefill is its own matmul shape
            llm.generate([prompt], params)
        rss = process.memory_info().rss / 2**20
        heap = heap_in_use_mib()
        first = rss if first is None else first
        first_heap = heap if first_heap is None else first_heap
        heap_note = "" if heap is None else f", malloc heap {heap - first_heap:+6.1f}"
        print(f"wave {wave:2d}: RSS {rss:7.1f} MiB ({rss - first:+6.1f} since wave 0"
              f"{heap_note}), {len(lengths_seen)} lengths so far, "
              f"{time.monotonic() - start:5.1f} s", flush=True)
    llm.shutdown()


if __name__ == "__main__":
    main()
