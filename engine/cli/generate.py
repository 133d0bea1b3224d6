"""`engine generate`: complete prompts with a model folder (or the default model)."""

from __future__ import annotations

import argparse
import json
import sys

from engine.engine_args import EngineArgs


def add_parser(subparsers: argparse._SubParsersAction, parents: list) -> None:
    p = subparsers.add_parser(
        "generate",
        parents=parents,
        help="complete prompts",
        description="Complete each --prompt with the model and print the completions.",
    )
    p.add_argument("--prompt", action="append", required=True, metavar="TEXT",
                   help="a prompt (repeatable; prompts are batched together)")
    p.add_argument("--max-tokens", type=int, default=64, metavar="N")
    # Sampled but seeded by default: the same command prints the same text, and small
    # models do not fall into the loops that greedy decoding gives them.
    p.add_argument("--temperature", type=float, default=0.7, metavar="T",
                   help="sampling temperature; 0 means greedy (default 0.7)")
    p.add_argument("--top-p", type=float, default=0.95, metavar="P", help="default 0.95")
    p.add_argument("--top-k", type=int, default=0, metavar="K", help="0 means off")
    p.add_argument("--seed", type=int, default=0, metavar="S",
                   help="per-request seed (default 0: reproducible output)")
    p.add_argument("--ignore-eos", action="store_true", help="keep going past end-of-sequence")
    p.add_argument("--json", action="store_true",
                   help="print a JSON array: prompt, text, token_ids, finish_reason")
    # --seed above is the per-request sampling seed; the engine's global seed keeps its default
    EngineArgs.add_cli_args(p.add_argument_group("engine options"), exclude=("seed",))
    # one-shot: a warm-up would only add its own steps to the one batch this run makes
    p.set_defaults(func=run, skip_warm_up=True)


def run(args: argparse.Namespace) -> int:
    from engine.llm import LLM
    from engine.sampling_params import SamplingParams

    try:
        params = SamplingParams(
            temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
            max_tokens=args.max_tokens, seed=args.seed, ignore_eos=args.ignore_eos,
        )
        engine_args = EngineArgs.from_cli_args(args, seed=0)
        llm = LLM(**vars(engine_args))
        outputs = llm.generate(args.prompt, params)
    except (ValueError, FileNotFoundError, OSError) as exc:
        print(f"engine generate: error: {exc}", file=sys.stderr)
        return 1
    if args.json:
        rows = [
            {"prompt": out.prompt, "text": out.outputs[0].text,
             "token_ids": out.outputs[0].token_ids,
             "finish_reason": out.outputs[0].finish_reason}
            for out in outputs
        ]
        print(json.dumps(rows, ensure_ascii=False))
        return 0
    for i, out in enumerate(outputs):
        if len(outputs) > 1:
            print(f"{'-' * 20} prompt {i + 1} of {len(outputs)} {'-' * 20}")
        print(f"{out.prompt}{out.outputs[0].text}")
    return 0
