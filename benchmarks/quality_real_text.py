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
- ``bfloat16``: ``dtype="bfloat16"``;
- ``llama.cpp`` and ``llama.cpp-decode`` (with ``--llamacpp-venv``): the peer on
  the same file and the same token ids, each window one prompt evaluation with
  every position's logits (its prompt route: activations rounded to 8 bits per
  block as well), or one token at a time (its decode route).

``ENGINE_CPU_NATIVE_BF16=0`` is set for ``auto`` and ``int8-all`` so that they
take the float32 route on every CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
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
        windows = [ids[start:start + args.window]
                   for start in range(0, args.windows * args.stride, args.stride)]
        if args.ids_file:
            args.ids_file.write_text(json.dumps(windows))
        for window in windows:
            prompts = [window[:i] for i in range(args.window // 2, len(window))]
            tokens += [o.outputs[0].token_ids[0]
                       for o in llm.generate(prompts, params, use_tqdm=False)]
    print(json.dumps(tokens))


LLAMACPP = """
import json, sys
import numpy as np
from llama_cpp import Llama

gguf, ids_file, window, one_at_a_time = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "1"
llm = Llama(model_path=gguf, n_ctx=window + 8, n_threads=2, n_threads_batch=2, n_batch=512,
            logits_all=True, seed=0, verbose=False)
tokens = []
for ids in json.load(open(ids_file)):
    llm.reset()
    if one_at_a_time:
        for token in ids:
            llm.eval([token])
    else:
        llm.eval(ids)
    scores = np.asarray(llm.scores[:len(ids)])
    # the greedy token after each prefix window[:i], i from window // 2 on
    tokens += [int(scores[i - 1].argmax()) for i in range(window // 2, len(ids))]
print(json.dumps(tokens))
"""


def run_llamacpp(args: argparse.Namespace, ids_file: Path, one_at_a_time: bool) -> list[int]:
    """The peer's greedy tokens on the windows `ref` wrote to `ids_file`."""
    python = args.llamacpp_venv / "bin" / "python"
    out = subprocess.run([str(python), "-c", LLAMACPP, args.gguf, str(ids_file),
                          str(args.window), "1" if one_at_a_time else "0"],
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", required=True)
    parser.add_argument("--variants", default="auto,int8-all,float32")
    parser.add_argument("--window", type=int, default=200)
    parser.add_argument("--stride", type=int, default=300)
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--llamacpp-venv", type=Path,
                        help="a venv with llama-cpp-python: adds the llama.cpp variants")
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--ids-file", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        run_variant(args)
        return
    base = [sys.executable, __file__, "--gguf", args.gguf, "--window", str(args.window),
            "--stride", str(args.stride), "--windows", str(args.windows)]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        ids_file = Path(tmp) / "windows.json"
        for variant in ["ref", *args.variants.split(",")]:
            out = subprocess.run([*base, "--variant", variant, "--ids-file", str(ids_file)],
                                 capture_output=True, text=True, check=True).stdout
            results[variant] = json.loads(out.strip().splitlines()[-1])
        if args.llamacpp_venv:
            results["llama.cpp"] = run_llamacpp(args, ids_file, one_at_a_time=False)
            results["llama.cpp-decode"] = run_llamacpp(args, ids_file, one_at_a_time=True)
    ref = results.pop("ref")
    print(f"{Path(args.gguf).name}: {len(ref)} teacher-forced positions of real text, "
          f"greedy agreement with the float32 dequantization")
    for variant, tokens in results.items():
        agree = sum(a == b for a, b in zip(tokens, ref, strict=True)) / len(ref)
        print(f"  {variant:16s} {agree:.2%}")


if __name__ == "__main__":
    main()
