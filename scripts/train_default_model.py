#!/usr/bin/env python3
"""Train the small model that ships inside the package as the engine's default.

The training text is the running Python's own standard library source (every
``*.py`` file under ``sysconfig.get_paths()["stdlib"]``, sorted by path), which
every machine has, so the run needs no download. A fixed subset of files (every
``--val-every``-th) is held out for validation.

Steps:
1. train a byte-level BPE tokenizer (``tokenizers``) with ``<s>``, ``</s>``, ``<pad>``;
2. encode every file, each followed by ``</s>``, into one token stream;
3. train a ``transformers.LlamaForCausalLM`` (tied embeddings) with AdamW,
   linear warmup and cosine decay, on random windows drawn with a seeded generator;
4. write a Hugging Face-format folder: ``config.json``, ``model.safetensors``,
   ``tokenizer.json``, ``tokenizer_config.json``, ``special_tokens_map.json``,
   ``generation_config.json`` and a ``README.md`` model card.

The result is deterministic given ``--seed`` and ``--threads``: same data order,
same initialisation, ``torch.use_deterministic_algorithms(True)``.

This is a development tool: it uses ``transformers``; the engine never does.

    python scripts/train_default_model.py --out engine/default_model
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import sysconfig
import time
from pathlib import Path

SPECIAL_TOKENS = ["<s>", "</s>", "<pad>"]  # ids 0, 1, 2
BOS_ID, EOS_ID, PAD_ID = 0, 1, 2
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "engine" / "default_model"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch and tokenizers threads")
    p.add_argument("--steps", type=int, default=800, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per step")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per training sequence")
    p.add_argument("--context", type=int, default=512, help="max_position_embeddings")
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate")
    p.add_argument("--warmup", type=int, default=50, help="linear warmup steps")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--bf16-autocast", action=argparse.BooleanOptionalAction, default=True,
                   help="run matmuls in bfloat16 while training (about 1.5x faster on CPUs "
                        "with AMX/AVX512-BF16); weights stay and are saved in float32")
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--intermediate", type=int, default=704)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--val-every", type=int, default=25, help="hold out every N-th file")
    p.add_argument("--max-files", type=int, default=0, help="use only the first N files (0: all)")
    p.add_argument("--tokenizer-bytes", type=int, default=8_000_000,
                   help="train the tokenizer on about this many bytes of training text")
    p.add_argument("--eval-windows", type=int, default=256,
                   help="held-out windows of --seq-len tokens to evaluate on")
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--max-minutes", type=float, default=0.0,
                   help="stop early after this many minutes of training (0: never); "
                        "breaks determinism, for trial runs only")
    return p.parse_args(argv)


# --------------------------------------------------------------------------
# data


def stdlib_files(max_files: int = 0) -> list[Path]:
    """Every ``*.py`` file of the standard library (site-packages excluded), sorted."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(
        (p for p in root.rglob("*.py") if "site-packages" not in p.relative_to(root).parts),
        key=lambda p: p.relative_to(root).as_posix(),
    )
    return files[:max_files] if max_files else files


def read_text(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")


def split_files(files: list[Path], val_every: int) -> tuple[list[Path], list[Path]]:
    """A fixed split: every ``val_every``-th file (by sorted position) is held out."""
    train = [f for i, f in enumerate(files) if i % val_every != val_every // 2]
    val = [f for i, f in enumerate(files) if i % val_every == val_every // 2]
    return train, val


def tokenizer_sample(files: list[Path], budget: int) -> list[str]:
    """Files spread evenly over the training set, up to about ``budget`` bytes."""
    total = sum(f.stat().st_size for f in files)
    stride = max(1, round(total / max(budget, 1)))
    return [read_text(f) for f in files[::stride]]


def train_tokenizer(texts: list[str], vocab_size: int):
    """Byte-level BPE: every byte is in the alphabet, so any text round-trips."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def encode_stream(tok, files: list[Path]):
    """All files as one int64 tensor of token ids, each file followed by ``</s>``."""
    import torch

    ids: list[int] = []
    for enc in tok.encode_batch([read_text(f) for f in files], add_special_tokens=False):
        ids.extend(enc.ids)
        ids.append(EOS_ID)
    return torch.tensor(ids, dtype=torch.long)


# --------------------------------------------------------------------------
# model and training


def build_model(args: argparse.Namespace, vocab_size: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=args.context,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        initializer_range=0.02,
        tie_word_embeddings=True,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
    )
    torch.manual_seed(args.seed)
    return LlamaForCausalLM(config).to(torch.float32)


def lr_at(step: int, args: argparse.Namespace) -> float:
    """Linear warmup to ``--lr``, then cosine decay to a tenth of it."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0))))


def make_optimizer(model, args: argparse.Namespace):
    import torch

    # weight decay on matrices only: norms' gains stay free
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay},
         {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.95), eps=1e-8,
    )


def sample_batch(stream, generator, batch_size: int, seq_len: int):
    import torch

    starts = torch.randint(0, len(stream) - seq_len, (batch_size,), generator=generator)
    return torch.stack([stream[s : s + seq_len] for s in starts.tolist()])


def train(model, stream, args: argparse.Namespace) -> list[float]:
    """Run ``--steps`` AdamW steps; returns the training loss of every step."""
    import torch

    generator = torch.Generator().manual_seed(args.seed)
    optimizer = make_optimizer(model, args)
    model.train()
    losses: list[float] = []
    start = time.perf_counter()
    for step in range(args.steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args)
        batch = sample_batch(stream, generator, args.batch_size, args.seq_len)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16_autocast):
            loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
        elapsed = time.perf_counter() - start
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            tok_s = (step + 1) * args.batch_size * args.seq_len / elapsed
            print(f"step {step + 1}/{args.steps}  loss {loss.item():.4f}  "
                  f"lr {lr_at(step, args):.2e}  {tok_s:,.0f} tok/s  {elapsed:.0f}s", flush=True)
        if args.max_minutes and elapsed > args.max_minutes * 60:
            print(f"stopping after {step + 1} steps (--max-minutes)", flush=True)
            break
    model.eval()
    return losses


def evaluate(model, stream, args: argparse.Namespace) -> float:
    """Mean next-token loss (nats/token) over non-overlapping held-out windows."""
    import torch

    n = min(args.eval_windows, (len(stream) - 1) // args.seq_len)
    if n == 0:
        raise ValueError("held-out text is shorter than one --seq-len window")
    windows = stream[: n * args.seq_len].view(n, args.seq_len)
    total = 0.0
    with torch.no_grad():
        for chunk in windows.split(args.batch_size):
            total += model(input_ids=chunk, labels=chunk).loss.item() * len(chunk)
    return total / n


# --------------------------------------------------------------------------
# output folder


def save_folder(model, tok, out: Path, card: str) -> None:
    """Write the Hugging Face-format folder, float32 weights."""
    from transformers import GenerationConfig

    out.mkdir(parents=True, exist_ok=True)
    model.generation_config = GenerationConfig(
        bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID
    )
    model.save_pretrained(out, safe_serialization=True)
    # Readers differ on the key's name (transformers 5 writes "dtype"): give both.
    config = json.loads((out / "config.json").read_text())
    config["torch_dtype"] = config["dtype"] = "float32"
    config["architectures"] = ["LlamaForCausalLM"]
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")

    tok.save(str(out / "tokenizer.json"))
    special = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}
    tokenizer_config = {
        **special,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": model.config.max_position_embeddings,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    (out / "README.md").write_text(card)


def model_card(args: argparse.Namespace, stats: dict, argv: list[str]) -> str:
    command = " ".join(["python", "scripts/train_default_model.py", *argv])
    return f"""# engine default model

A small Llama-architecture causal language model trained on the Python standard
library's source code. It ships inside the `engine` package and is what
`engine.LLM()` and `engine generate` use when no model is given. It completes
Python-looking text; it knows nothing else.

| | |
|---|---|
| architecture | `LlamaForCausalLM`, {args.layers} layers, hidden {args.hidden}, MLP {args.intermediate}, {args.heads} heads, {args.kv_heads} KV heads, tied embeddings |
| parameters | {stats['params']:,} |
| context | {args.context} positions (trained on {args.seq_len}-token windows) |
| tokenizer | byte-level BPE (`tokenizers`), vocab {stats['vocab']}, `<s>`=0 `</s>`=1 `<pad>`=2; no BOS is added |
| weights | float32, `model.safetensors` |
| data | every `*.py` file of Python {stats['python']} stdlib ({stats['files']} files); every {args.val_every}-th file held out ({stats['val_files']} files) |
| tokens | {stats['train_tokens']:,} train / {stats['val_tokens']:,} held-out |
| training | {stats['steps']} steps x {args.batch_size} x {args.seq_len} tokens, AdamW (lr {args.lr}, wd {args.weight_decay}), {args.warmup} warmup steps, cosine to lr/10, {'bf16 autocast' if args.bf16_autocast else 'float32'}; seed {args.seed}; {args.threads} CPU thread(s), {stats['minutes']:.1f} min |
| held-out loss | {stats['val_loss']:.4f} nats/token (perplexity {math.exp(stats['val_loss']):.2f}) |

Reproduce (deterministic for a given seed, thread count and library versions: torch {stats['torch']}, transformers {stats['transformers']}, tokenizers {stats['tokenizers']}):

```
{command}
```
"""


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    # must be set before tokenizers starts its thread pool
    os.environ.setdefault("RAYON_RS_NUM_CPUS", str(args.threads))
    import tokenizers
    import torch
    import transformers

    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    t0 = time.perf_counter()

    files = stdlib_files(args.max_files)
    train_files, val_files = split_files(files, args.val_every)
    print(f"{len(train_files)} training files, {len(val_files)} held out", flush=True)
    tok = train_tokenizer(tokenizer_sample(train_files, args.tokenizer_bytes), args.vocab_size)
    train_stream = encode_stream(tok, train_files)
    val_stream = encode_stream(tok, val_files)
    print(f"tokenizer vocab {tok.get_vocab_size()}; {len(train_stream):,} train tokens, "
          f"{len(val_stream):,} held-out tokens ({time.perf_counter() - t0:.0f}s)", flush=True)

    model = build_model(args, tok.get_vocab_size())
    params = sum(p.numel() for p in model.parameters())
    print(f"model: {params:,} parameters", flush=True)
    t1 = time.perf_counter()
    losses = train(model, train_stream, args)
    minutes = (time.perf_counter() - t1) / 60
    val_loss = evaluate(model, val_stream, args)
    print(f"held-out loss {val_loss:.4f} nats/token (perplexity {math.exp(val_loss):.2f}); "
          f"final train loss {losses[-1]:.4f}", flush=True)

    stats = dict(
        params=params, vocab=tok.get_vocab_size(), files=len(files), val_files=len(val_files),
        train_tokens=len(train_stream), val_tokens=len(val_stream), steps=len(losses),
        minutes=minutes, val_loss=val_loss, python=sysconfig.get_python_version(),
        torch=torch.__version__, transformers=transformers.__version__,
        tokenizers=tokenizers.__version__,
    )
    save_folder(model, tok, args.out, model_card(args, stats, argv))
    (args.out / "training_stats.json").write_text(
        json.dumps({**stats, "train_losses_tail": losses[-5:]}, indent=2) + "\n"
    )
    size = sum(f.stat().st_size for f in args.out.iterdir())
    print(f"wrote {args.out} ({size / 1e6:.1f} MB) in {time.perf_counter() - t0:.0f}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
