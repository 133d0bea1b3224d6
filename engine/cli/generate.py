"""`engine generate`: complete prompts with a model folder (or the default model)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from engine.cli.common import (
    add_model_argument,
    announce_loading,
    announce_out_of_tree_plugins,
    for_stdout,
    json_for_stdout,
    resolve_model_argument,
)
from engine.engine_args import EngineArgs


def add_parser(subparsers: argparse._SubParsersAction, parents: list) -> None:
    p = subparsers.add_parser(
        "generate",
        parents=parents,
        help="complete prompts",
        description="Complete each --prompt with the model and print the completions. "
                    "For a chat (instruct) model, `engine chat` applies its chat template.",
    )
    add_model_argument(p)
    p.add_argument("--prompt", action="append", required=True, metavar="TEXT",
                   help="a prompt (repeatable; prompts are batched together)")
    p.add_argument("--max-tokens", type=int, default=64, metavar="N",
                   help="most tokens to generate per prompt (default 64)")
    # Sampled but seeded by default: the same command prints the same text, and small
    # models do not fall into the loops that greedy decoding gives them.
    p.add_argument("--temperature", type=float, default=0.7, metavar="T",
                   help="sampling temperature; 0 means greedy (default 0.7)")
    p.add_argument("--top-p", type=float, default=0.95, metavar="P", help="default 0.95")
    p.add_argument("--top-k", type=int, default=0, metavar="K", help="0 means off")
    p.add_argument("--seed", type=int, default=0, metavar="S",
                   help="sampling seed: the same seed, prompt and settings print the same "
                        "text (default 0)")
    p.add_argument("--ignore-eos", action="store_true", help="keep going past end-of-sequence")
    p.add_argument("--json", action="store_true",
                   help="print a JSON array: prompt, text, token_ids, finish_reason")
    # --seed above is the per-request sampling seed; the engine's global seed keeps its default
    EngineArgs.add_cli_args(p.add_argument_group("engine options"), exclude=("seed",))
    # one-shot: a warm-up would only add its own steps to the one batch this run makes
    p.set_defaults(func=run, skip_warm_up=True)


def run(args: argparse.Namespace) -> int:
    from engine.sampling_params import SamplingParams

    try:
        resolve_model_argument(args, "generate")
        params = SamplingParams(
            temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
            max_tokens=args.max_tokens, seed=args.seed, ignore_eos=args.ignore_eos,
        )
        engine_args = EngineArgs.from_cli_args(args, seed=0)
        announce_out_of_tree_plugins("generate")
        announce_loading("generate", args.model)
        from engine.llm import LLM  # imports torch: after the line that says we are loading

        llm = LLM(**vars(engine_args))
        outputs = llm.generate(args.prompt, params)
    except (ValueError, FileNotFoundError, OSError) as exc:
        print(f"engine generate: error: {exc}", file=sys.stderr)
        return 1
    _explain_empty_completions(llm, outputs, args)
    if args.json:
        rows = [
            {"prompt": out.prompt, "text": out.outputs[0].text,
             "token_ids": out.outputs[0].token_ids,
             "finish_reason": out.outputs[0].finish_reason}
            for out in outputs
        ]
        print(json_for_stdout(rows))
        return 0
    for i, out in enumerate(outputs):
        if len(outputs) > 1:
            print(f"{'-' * 20} prompt {i + 1} of {len(outputs)} {'-' * 20}")
        print(for_stdout(f"{out.prompt}{out.outputs[0].text}"))
    return 0


def _explain_empty_completions(llm: Any, outputs: list, args: argparse.Namespace) -> None:
    """A chat model given a bare question often ends its reply at once: say so on
    stderr instead of printing nothing, and point at `engine chat`."""
    empty = [o for o in outputs
             if not o.outputs[0].text and o.outputs[0].finish_reason == "stop"]
    if not empty:
        return
    which = "every prompt" if len(empty) == len(outputs) else f"{len(empty)} prompt(s)"
    hint = "--ignore-eos keeps generating"
    if llm.get_tokenizer().chat_template:
        model = args.model or "MODEL"
        hint = (f"this model has a chat template, so it expects a conversation: try "
                f"`engine chat {model}` (or --ignore-eos)")
    print(f"engine generate: the model ended at once (end-of-sequence, no text) for {which}; "
          f"{hint}", file=sys.stderr)
