"""How resident memory grows with the number of distinct prompt-chunk shapes.

Runs `LLM.generate` in waves of prompts of random lengths (every wave new
lengths, so new matmul shapes) and prints the process's RSS after each wave, in
the dtype given. With ``--same-length`` every prompt has one length: a flat line
there and a rising one with varied lengths points at per-shape caches (oneDNN
creates, and keeps in its primitive cache, one primitive per matmul shape).

    python benchmarks/bf16_shape_memory.py --dtype bfloat16 --waves 12
    python benchmarks/bf16_shape_memory.py --dtype float32 --waves 12
    ONEDNN_PRIMITIVE_CACHE_CAPACITY=0 python benchmarks/bf16_shape_memory.py ...

Results: docs/benchmarks.md, "bf16 memory and prompt shapes".
"""

from __future__ import annotations

import argparse
import random
import time

import psutil


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
    args = parser.parse_args()

    import torch

    from engine import LLM, SamplingParams

    torch.set_num_threads(max(1, torch.get_num_threads()))
    llm = LLM(args.model, dtype=args.dtype, kv_cache_memory=64 * 2**20)
    vocab = llm.llm_engine.vocab_size
    rng = random.Random(args.seed)
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    process = psutil.Process()
    lengths_seen: set[int] = set()
    print(f"dtype {args.dtype}, {args.per_wave} prompts per wave, lengths "
          f"{args.min_len}-{args.max_len}{' (one length)' if args.same_length else ''}")
    start = time.monotonic()
    first = None
    for wave in range(args.waves):
        prompts = []
        for _ in range(args.per_wave):
            n = args.max_len if args.same_length else rng.randint(args.min_len, args.max_len)
            lengths_seen.add(n)
            prompts.append([rng.randrange(3, vocab) for _ in range(n)])
        for prompt in prompts:  # one at a time: each prefill is its own matmul shape
            llm.generate([prompt], params)
        rss = process.memory_info().rss / 2**20
        first = rss if first is None else first
        print(f"wave {wave:2d}: RSS {rss:7.1f} MiB ({rss - first:+6.1f} since wave 0), "
              f"{len(lengths_seen)} lengths so far, {time.monotonic() - start:5.1f} s",
              flush=True)
    llm.shutdown()


if __name__ == "__main__":
    main()
