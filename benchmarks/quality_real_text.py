"""Teacher-forced greedy agreement of a quantized GGUF model with its own float32
dequantization, on real text: what the tests' tiny random models cannot say.

    python benchmarks/quality_real_text.py --gguf SmolLM2-135M-Instruct.Q4_1.gguf
    python benchmarks/quality_real_text.py --gguf model.Q8_0.gguf --variants auto,float32

The text is this repository's README and docs/quantization.md, tokenized by the
file's own tokenizer. Windows of `--window` tokens start every `--stride` tokens;
in each, every prefix from `--window`/2 tokens on is a prompt whose greedy next
token is compared with the reference's: the same file with ``quantization="none"``
and ``dtype="float32"`` (every tensor dequantized, float32 products). Prefix
caching is off, so every prompt is one prefill of all its rows.

Variants (each in its own process, one after another):

- ``auto``: ``dtype="auto"`` as a user runs it (on a CPU without bfloat16
  arithmetic: float32, activations rounded to int8 per 32 values in the block
  kernels' products, which take up to 16 rows: prompts go to float tiles, the LM
  head of the last row to the int8 kernel);
- ``float32``: ``dtype="float32"``, the blocks multiplied with float activations;
- ``int8-all``: ``auto`` with every product on the int8 block kernels, however
  many rows (what an int8 prompt path would compute);
- ``bfloat16``: ``dtype="bfloat16"``.

``ENGINE_CPU_NATIVE_BF16=0`` is set for ``auto`` and ``int8-all`` so that they
take the float32 route on every CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TEXTS = [ROOT / "README.md", ROOT / "docs" / "quantization.md"]


def run_variant(args: argparse.Namespace) -> None:
    os.environ["ENGINE_CPU_NATIVE_BF16"] = "0" if args.variant in ("auto", "int8-all") else \
        os.environ.get("ENGINE_CPU_NATIVE_BF16", "")
    if not os.environ["ENGINE_CPU_NATIVE_BF16"]:
        del os.environ["ENGINE_CPU_NATIVE_BF16"]
    from engine import kernels

    if not kernels.kernels_available():  # the quantized paths are the kernels'
        kernels.build()
        if not kernels.kernels_available():
            sys.exit("the CPU kernels are not available: nothing here would be measured")
    if args.variant == "int8-all":
        import engine.quantization.ggml as ggml

        ggml.GGMLBlockMethod._row_limit = lambda self, *a: 1 << 30  # type: ignore[method-assign]
    from engine import LLM, SamplingParams

    options = {"ref": {"dtype": "float32", "quantization": "none"},
               "auto": {"dtype": "auto"}, "int8-all": {"dtype": "auto"},
               "float32": {"dtype": "float32"}, "bfloat16": {"dtype": "bfloat16"}}[args.variant]
    with LLM(args.gguf, enable_prefix_caching=False, max_num_seqs=8,
             max_model_len=max(2048, 2 * args.window), **options) as llm:
        ids = llm.get_tokenizer().encode("\n".join(p.read_text() for p in TEXTS))
        params = SamplingParams(temperature=0, max_tokens=1)
        tokens: list[int] = []
        for start in range(0, args.windows * args.stride, args.stride):
            window = ids[start:start + args.window]
            prompts = [window[:i] for i in range(args.window // 2, len(window))]
            tokens += [o.outputs[0].token_ids[0]
                       for o in llm.generate(prompts, params, use_tqdm=False)]
    print(json.dumps(tokens))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", required=True)
    parser.add_argument("--variants", default="auto,int8-all,float32")
    parser.add_argument("--window", type=int, default=200)
    parser.add_argument("--stride", type=int, default=300)
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        run_variant(args)
        return
    base = [sys.executable, __file__, "--gguf", args.gguf, "--window", str(args.window),
            "--stride", str(args.stride), "--windows", str(args.windows)]
    results = {}
    for variant in ["ref", *args.variants.split(",")]:
        out = subprocess.run([*base, "--variant", variant], capture_output=True, text=True,
                             check=True).stdout
        results[variant] = json.loads(out.strip().splitlines()[-1])
    ref = results.pop("ref")
    print(f"{Path(args.gguf).name}: {len(ref)} teacher-forced positions of real text, "
          f"greedy agreement with the float32 dequantization")
    for variant, tokens in results.items():
        agree = sum(a == b for a, b in zip(tokens, ref, strict=True)) / len(ref)
        print(f"  {variant:9s} {agree:.2%}")


if __name__ == "__main__":
    main()
