"""Structured outputs: cost per generated token, constrained against unconstrained.

    python benchmarks/bench_structured.py             # 5 alternating rounds
    python benchmarks/bench_structured.py --rounds 3 --max-tokens 64
    python benchmarks/bench_structured.py --libraries   # llguidance vs outlines-core setup

`--libraries` times what each grammar library needs before the first constrained
token, on the default model's tokenizer and this file's schema: llguidance's
tokenizer view plus one grammar compile and matcher, and (when `outlines_core` is
importable, e.g. ``pip install --target DIR outlines-core`` and PYTHONPATH=DIR)
outlines-core's regex-from-schema plus its token index. It also times
llguidance's mask for each token of a 128-token valid output.

The embedded default model (vocab 4096), float32. Each round runs, for batch
sizes 1 and 16, the same prompts unconstrained (ignore_eos, exactly
--max-tokens tokens each) and constrained by a JSON schema (an array of at least 40
objects with a bounded string, an enum array and an integer: longer than
--max-tokens, so both sides produce the same number of tokens), alternating the two sides. Per-token time is the wall time
of the `generate` call divided by the tokens it produced. Reported: the median of
the per-round ratios constrained/unconstrained and their range, plus the
one-time costs (llguidance's tokenizer view, one grammar compile) and `uptime`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SCHEMA = {
    "type": "array",
    "items": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 12},
            "tags": {"type": "array", "items": {"enum": ["io", "net", "math", "text"]}},
            "size": {"type": "integer", "minimum": 0, "maximum": 100000},
        },
        "required": ["name", "tags"],
        "additionalProperties": False,
    },
    "minItems": 40,  # long enough that every request runs to --max-tokens
}
PROMPTS = ["def main():", "import json\n", "class Config:", "# TODO: ", "x = {", "return "]


def _run(llm, batch: int, max_tokens: int, constrained: bool, round_no: int) -> tuple[float, int]:
    from engine.sampling_params import SamplingParams, StructuredOutputsParams

    structured = StructuredOutputsParams(json=SCHEMA) if constrained else None
    params = [SamplingParams(temperature=1.0, seed=1000 * round_no + i, max_tokens=max_tokens,
                             ignore_eos=not constrained, structured_outputs=structured)
              for i in range(batch)]
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(batch)]
    start = time.perf_counter()
    outs = llm.generate(prompts, params)
    wall = time.perf_counter() - start
    return wall, sum(len(o.outputs[0].token_ids) for o in outs)


def _processor_time(llm, batch: int, max_tokens: int) -> tuple[float, int]:
    """Seconds spent in the structured-outputs processor (grammar compile, token
    consumption, masks) over one constrained batch, and the tokens produced: the
    overhead measured directly, unlike wall-time ratios on a busy machine."""
    from engine.structured_outputs.processor import StructuredOutputsLogitsProcessor as P

    spent = [0.0]

    def timed(method):
        def wrapper(self, *args):
            start = time.perf_counter()
            try:
                return method(self, *args)
            finally:
                spent[0] += time.perf_counter() - start
        return wrapper

    originals = P.apply, P.update_state
    P.apply, P.update_state = timed(P.apply), timed(P.update_state)
    try:
        _, tokens = _run(llm, batch, max_tokens, True, 99)
    finally:
        P.apply, P.update_state = originals
    return spent[0], tokens


def _byte_vocabulary(model: str) -> dict[bytes, list[int]]:
    """token bytes -> ids of a byte-level BPE tokenizer.json (special tokens left out)."""
    from tokenizers import Tokenizer

    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    tok = Tokenizer.from_file(str(Path(model) / "tokenizer.json"))
    special = {t.content for t in tok.get_added_tokens_decoder().values()}
    vocab: dict[bytes, list[int]] = {}
    for text, token_id in tok.get_vocab().items():
        if text not in special and all(c in chars for c in text):
            vocab.setdefault(bytes(chars[c] for c in text), []).append(token_id)
    return vocab


def libraries(model: str, vocab_size: int, eos: int) -> None:
    """Setup cost of llguidance and outlines-core for SCHEMA, and llguidance's
    per-token mask time."""
    import llguidance
    import torch

    from engine.sampling_params import StructuredOutputsParams
    from engine.structured_outputs import compile_grammar
    from engine.structured_outputs.processor import ll_tokenizer

    start = time.perf_counter()
    ll_tok = ll_tokenizer(model, vocab_size)
    view = time.perf_counter() - start
    start = time.perf_counter()
    matcher = llguidance.LLMatcher(ll_tok, compile_grammar(StructuredOutputsParams(json=SCHEMA)))
    compiled = time.perf_counter() - start
    print(f"llguidance {llguidance.__version__}: tokenizer view {view * 1e3:.0f} ms, "
          f"grammar + matcher {compiled * 1e3:.1f} ms")
    words = (ll_tok.vocab_size + 31) // 32
    mask = torch.empty(words, dtype=torch.int32)
    generator = torch.Generator().manual_seed(0)
    times = []
    for _ in range(128):
        start = time.perf_counter()
        matcher.unsafe_compute_mask_ptr(mask.data_ptr(), words * 4)
        times.append(time.perf_counter() - start)
        bits = [(int(mask[w]) >> j) & 1 for w in range(words) for j in range(32)]
        allowed = [i for i, b in enumerate(bits[:vocab_size]) if b and i != eos]
        if not allowed:
            break
        pick = allowed[int(torch.randint(len(allowed), (1,), generator=generator))]
        matcher.consume_token(pick)
    print(f"llguidance mask: median {statistics.median(times) * 1e6:.0f} us/token, "
          f"max {max(times) * 1e6:.0f} us over {len(times)} tokens")
    try:
        from outlines_core import Index, Vocabulary
        from outlines_core.json_schema import build_regex_from_schema
    except ImportError:
        print("outlines-core: not importable (install it with --target and add it to "
              "PYTHONPATH to compare)")
        return
    import json

    vocabulary = Vocabulary(eos, _byte_vocabulary(model))
    start = time.perf_counter()
    Index(build_regex_from_schema(json.dumps(SCHEMA)), vocabulary)
    print(f"outlines-core: regex + index {(time.perf_counter() - start) * 1e3:.0f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--libraries", action="store_true",
                        help="only compare the grammar libraries' setup and mask costs")
    args = parser.parse_args()
    if args.libraries:
        from engine.engine_args import default_model_dir
        from engine.tokenizer import load_tokenizer

        model = str(default_model_dir())
        tokenizer = load_tokenizer(model)
        libraries(model, tokenizer.vocab_size, tokenizer.eos_token_id)
        return

    import torch

    from engine import LLM
    from engine.sampling_params import StructuredOutputsParams
    from engine.structured_outputs import compile_grammar
    from engine.structured_outputs.processor import ll_tokenizer

    torch.set_num_threads(1)
    llm = LLM(dtype="float32", kv_cache_memory=2**26)
    model = llm.config.model_config.model
    start = time.perf_counter()
    ll_tokenizer(model, int(llm.config.model_config.hf_config["vocab_size"]))
    tokenizer_s = time.perf_counter() - start
    start = time.perf_counter()
    compile_grammar(StructuredOutputsParams(json=SCHEMA))
    compile_s = time.perf_counter() - start
    print(f"one-time: llguidance tokenizer view {tokenizer_s * 1e3:.0f} ms, "
          f"grammar compile {compile_s * 1e3:.1f} ms")
    for batch in args.batches:
        _run(llm, batch, 16, True, -1)  # warm-up, both sides
        _run(llm, batch, 16, False, -1)
        ratios, per_tok = [], {True: [], False: []}
        for r in range(args.rounds):
            order = (False, True) if r % 2 == 0 else (True, False)
            got = {}
            for constrained in order:
                wall, tokens = _run(llm, batch, args.max_tokens, constrained, r)
                got[constrained] = wall / max(tokens, 1)
                per_tok[constrained].append(got[constrained])
            ratios.append(got[True] / got[False])
        slow, fast = statistics.median(per_tok[True]), statistics.median(per_tok[False])
        print(f"batch {batch:3d}: unconstrained {fast * 1e3:.2f} ms/token, constrained "
              f"{slow * 1e3:.2f} ms/token, ratio median {statistics.median(ratios):.2f}x "
              f"(rounds {min(ratios):.2f}-{max(ratios):.2f}x), overhead "
              f"{(slow - fast) * 1e6:.0f} us/token")
    for batch in args.batches:
        spent, tokens = _processor_time(llm, batch, args.max_tokens)
        print(f"batch {batch:3d}: mask work inside the logits processor "
              f"{spent / tokens * 1e6:.0f} us/token ({tokens} tokens)")
    llm.shutdown()
    print("load:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())


if __name__ == "__main__":
    main()
