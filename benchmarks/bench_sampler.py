"""Micro-benchmark of the sampler and the incremental detokenizer.

Sampler: one step on [batch, vocab] float32 logits (default 256 x 32000) for
an all-greedy batch, an unseeded temperature batch, top-k, top-p, a mixed
batch (greedy, temperature, top-k, top-p, min-p, penalties, logprobs) and an
all-seeded batch. Each figure is also given as a ratio to `logits.argmax(-1)`
and to a straightforward reference (torch sort + softmax + multinomial, the
way transformers' warpers do it), measured in the same run.

Detokenizer: tokens/s of `IncrementalDetokenizer.add` against calling
`tokenizer.decode(all_ids)` after every token, on a byte-level BPE tokenizer
trained here from the Python standard library (text with multi-byte
characters included).

    python benchmarks/bench_sampler.py [--batch 256] [--vocab 32000] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import sysconfig
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from engine.sample import Sampler, SamplingState  # noqa: E402
from engine.sampling_params import SamplingParams  # noqa: E402
from engine.tokenizer import IncrementalDetokenizer, Tokenizer  # noqa: E402


def timed(fn, repeat: int) -> float:
    """Median seconds of `fn()` over `repeat` runs (after one warm-up)."""
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def reference_sample(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """Sort-based top-p + multinomial, the textbook way."""
    x = logits / temperature
    ordered, index = x.sort(dim=-1, descending=True)
    probs = ordered.softmax(dim=-1)
    drop = probs.cumsum(dim=-1) - probs > top_p
    ordered = ordered.masked_fill(drop, -float("inf"))
    x = torch.full_like(x, -float("inf")).scatter(1, index, ordered)
    return torch.multinomial(x.softmax(dim=-1), 1).squeeze(1)


def scenarios(batch: int) -> dict[str, list[SamplingParams]]:
    mixed_kinds = [
        SamplingParams(temperature=0),
        SamplingParams(temperature=0.8),
        SamplingParams(temperature=0.7, top_k=40),
        SamplingParams(temperature=1.0, top_p=0.9),
        SamplingParams(temperature=0.9, min_p=0.05),
        SamplingParams(temperature=0.8, repetition_penalty=1.1, frequency_penalty=0.2),
        SamplingParams(temperature=0.8, top_p=0.95, logprobs=5),
        SamplingParams(temperature=0.8, top_p=0.95, seed=1),
    ]
    return {
        "greedy": [SamplingParams(temperature=0)] * batch,
        "temperature": [SamplingParams(temperature=0.8)] * batch,
        "top-k 50": [SamplingParams(temperature=0.8, top_k=50)] * batch,
        "top-p 0.9": [SamplingParams(temperature=0.8, top_p=0.9)] * batch,
        "mixed": [mixed_kinds[i % len(mixed_kinds)] for i in range(batch)],
        "seeded": [SamplingParams(temperature=0.8, top_p=0.9, seed=i) for i in range(batch)],
    }


def bench_sampler(batch: int, vocab: int, repeat: int) -> None:
    gen = torch.Generator().manual_seed(0)
    # peaked like a trained model's logits, not flat like a random one's
    logits = torch.randn(batch, vocab, generator=gen) * 3.0
    prompt = torch.randint(0, vocab, (256,), generator=gen).tolist()
    output = torch.randint(0, vocab, (64,), generator=gen).tolist()
    argmax_s = timed(lambda: logits.argmax(dim=-1).tolist(), repeat)
    ref_s = timed(lambda: reference_sample(logits, 0.8, 0.9).tolist(), max(2, repeat // 3))
    print(f"sampler on [{batch}, {vocab}] float32, {torch.get_num_threads()} threads")
    print(f"  {'argmax (peer)':<14} {argmax_s * 1e3:8.2f} ms")
    print(f"  {'sort top-p ref':<14} {ref_s * 1e3:8.2f} ms  (sort + softmax + multinomial)")
    sampler = Sampler()
    for name, params in scenarios(batch).items():
        states = [SamplingState.create(p, prompt, i, output_token_ids=list(output), eos_token_ids={2})
                  for i, p in enumerate(params)]
        seconds = timed(lambda states=states: sampler(logits, states), repeat)
        print(f"  {name:<14} {seconds * 1e3:8.2f} ms  = {seconds / argmax_s:5.2f}x argmax, "
              f"{ref_s / seconds:6.1f}x faster than the sort reference")


def train_tokenizer(vocab: int = 8192) -> Tokenizer:
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers, trainers

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts = [p.read_text(encoding="utf-8", errors="ignore") for p in sorted(stdlib.glob("*.py"))[:80]]
    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    backend.train_from_iterator(texts, trainer=trainer)
    return Tokenizer(backend, special_tokens={"bos": "<s>", "eos": "</s>"})


def bench_detokenizer(repeat: int) -> None:
    tok = train_tokenizer()
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    text = (stdlib / "textwrap.py").read_text() + " 中文字符 naïve 🙂🚀 " * 40
    all_ids = tok.encode(text)
    prompt = tok.encode("Write some code:")
    params = SamplingParams(max_tokens=None, ignore_eos=True)
    print(f"detokenizer, byte-level BPE vocab {tok.vocab_size}")
    for length in (256, 1024, 4096):
        ids = (all_ids * (length // len(all_ids) + 1))[:length]

        def incremental(ids=ids):
            detok = IncrementalDetokenizer(tok, prompt, params)
            for t in ids:
                detok.add(t)
            return detok.output_text

        def full_decode(ids=ids):
            text = ""
            for n in range(1, len(ids) + 1):
                text = tok.decode(ids[:n])
            return text

        assert incremental() == full_decode()
        inc_s = timed(incremental, repeat)
        full_s = timed(full_decode, max(1, repeat // 3))
        print(f"  {length:5d} tokens: incremental {length / inc_s:10.0f} tok/s, "
              f"full decode each step {length / full_s:10.0f} tok/s "
              f"({full_s / inc_s:5.1f}x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=9)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    bench_sampler(args.batch, args.vocab, args.repeat)
    bench_detokenizer(max(3, args.repeat // 3))


if __name__ == "__main__":
    main()
