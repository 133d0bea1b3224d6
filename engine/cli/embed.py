"""`engine embed`: embed texts with an embedding model folder."""

from __future__ import annotations

import argparse
import sys

from engine.cli.common import for_stdout, json_for_stdout
from engine.engine_args import EngineArgs


def add_parser(subparsers: argparse._SubParsersAction, parents: list) -> None:
    p = subparsers.add_parser(
        "embed",
        parents=parents,
        help="embed texts",
        description="Embed each TEXT with an embedding model (e.g. all-MiniLM-L6-v2).",
    )
    p.add_argument("texts", nargs="+", metavar="TEXT")
    p.add_argument("--json", action="store_true", help="print a JSON array: text, embedding")
    EngineArgs.add_cli_args(p.add_argument_group("engine options"))
    # one-shot: a warm-up would only add its own steps to the one batch this run makes
    p.set_defaults(func=run, skip_warm_up=True)


def run(args: argparse.Namespace) -> int:
    from engine.llm import LLM

    if args.model is None:
        # The embedded default model is a text generator: it has no pooling head.
        print("engine embed: error: the embedded default model generates text and cannot "
              "embed; pass an embedding model: --model DIR (a sentence-transformers or "
              "BERT-family folder) or --model NAME from the Hugging Face cache, e.g. "
              "--model sentence-transformers/all-MiniLM-L6-v2", file=sys.stderr)
        return 2
    try:
        outputs = LLM(**vars(EngineArgs.from_cli_args(args))).embed(args.texts)
    except (ValueError, FileNotFoundError, OSError) as exc:
        print(f"engine embed: error: {exc}", file=sys.stderr)
        return 1
    if args.json:
        rows = [{"text": out.prompt, "embedding": out.outputs.embedding} for out in outputs]
        print(json_for_stdout(rows))
        return 0
    for out in outputs:
        vec = out.outputs.embedding
        head = ", ".join(f"{x:+.4f}" for x in vec[:4])
        print(for_stdout(f"{out.prompt}\t[{head}, ...] ({len(vec)} dims)"))
    return 0
