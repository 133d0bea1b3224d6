"""`engine chat`: talk to a chat model in the terminal (see docs/chat.md).

Interactive when stdin is a terminal: replies stream as they are generated, the
conversation is kept across turns, ``/exit`` (or Ctrl-D) ends the session,
``/clear`` forgets the conversation and Ctrl-C stops the current reply without
ending it. When stdin is not a terminal,
the whole input is one user message and the reply is printed.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path
from typing import Any

from engine.cli.common import (
    add_model_argument,
    announce_loading,
    announce_out_of_tree_plugins,
    for_stdout,
    resolve_model_argument,
)
from engine.engine_args import EngineArgs

PROMPT = ">>> "
EXIT_COMMANDS = ("/exit", "/quit")
CLEAR_COMMAND = "/clear"  # forget the conversation (the system message stays)
CHAT_MAX_NUM_SEQS = 1


def add_parser(subparsers: argparse._SubParsersAction, parents: list) -> None:
    """Add the `chat` subcommand to the `engine` parser."""
    p = subparsers.add_parser(
        "chat",
        parents=parents,
        help="chat with a model in the terminal",
        description="Chat with a model that has a chat template. Interactive on a terminal "
                    "(/exit or Ctrl-D ends, Ctrl-C stops the current reply); otherwise stdin "
                    "is one user message and the reply is printed.",
    )
    add_model_argument(p)
    p.add_argument("--system", metavar="TEXT", default=None,
                   help="a system message that starts the conversation")
    p.add_argument("--chat-template", metavar="FILE", default=None,
                   help="a Jinja chat template file to use instead of the model's own")
    p.add_argument("--max-tokens", type=int, default=512, metavar="N",
                   help="longest reply in tokens (default 512)")
    p.add_argument("--temperature", type=float, default=0.7, metavar="T",
                   help="sampling temperature; 0 means greedy (default 0.7)")
    p.add_argument("--top-p", type=float, default=0.95, metavar="P", help="default 0.95")
    p.add_argument("--seed", "--sampling-seed", dest="sampling_seed", type=int, default=None,
                   metavar="S", help="sampling seed: the same seed and conversation give the "
                                     "same replies (default: none, replies vary)")
    p.add_argument("--ignore-eos", action="store_true",
                   help="keep replying past end-of-sequence (until --max-tokens)")
    p.add_argument("--save-history", metavar="FILE", default=None,
                   help="after every turn, write the conversation to FILE as JSON")
    engine_options = p.add_argument_group("engine options")
    # one conversation is one sequence at a time: the warm-up then runs no decode
    # batch it will never see, and the KV cache holds room for that one
    engine_options.add_argument(
        "--max-num-seqs", type=int, default=CHAT_MAX_NUM_SEQS, metavar="N",
        help=f"sequences the engine runs at once (default {CHAT_MAX_NUM_SEQS}: a chat is "
             "one conversation)")
    # --seed above is the replies' sampling seed; the engine's global seed keeps its default
    EngineArgs.add_cli_args(engine_options, exclude=("seed", "max_num_seqs"))
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Build the engine, then chat until /exit (or answer stdin once)."""
    from engine.sampling_params import SamplingParams

    try:
        resolve_model_argument(args, "chat")
        template = _read_template(args.chat_template)
        params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                                top_p=args.top_p, seed=args.sampling_seed,
                                ignore_eos=args.ignore_eos)
        engine_args = EngineArgs.from_cli_args(args)
        announce_out_of_tree_plugins("chat")
        announce_loading("chat", args.model)
        from engine.llm import LLM  # imports torch: after the line that says we are loading

        llm = LLM(**vars(engine_args))
    except (ValueError, FileNotFoundError, OSError) as exc:
        print(f"engine chat: error: {exc}", file=sys.stderr)
        return 1
    try:
        session = ChatSession(llm, params, system=args.system, chat_template=template,
                              history_file=args.save_history)
        try:
            session.check_template()
        except ValueError as exc:
            print(f"engine chat: error: {exc}", file=sys.stderr)
            return 1
        if not sys.stdin.isatty():
            return session.answer_once(sys.stdin.read())
        return session.interact()
    finally:
        llm.shutdown()


def _read_template(path: str | None) -> str | None:
    if path is None:
        return None
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"--chat-template {path}: cannot read: {exc}") from None


class ChatSession:
    """A conversation with one model: the messages so far and how to extend them."""

    def __init__(self, llm: Any, params: Any, *, system: str | None = None,
                 chat_template: str | None = None, history_file: str | None = None) -> None:
        self.llm = llm
        self.params = params
        self.chat_template = chat_template
        self.history_file = history_file
        self.messages: list[dict[str, str]] = []
        if system:
            self.messages.append({"role": "system", "content": system})

    def check_template(self) -> None:
        """Raise ValueError now (not at the first turn) when the model has no chat
        template or the template rejects this conversation's shape."""
        try:
            self.llm.get_tokenizer().apply_chat_template(
                self.messages + [{"role": "user", "content": "hi"}],
                chat_template=self.chat_template)
        except ValueError as exc:
            from engine.engine_args import DEFAULT_MODEL_DIR

            if Path(self.llm.config.model_config.model) == DEFAULT_MODEL_DIR:
                raise ValueError(
                    f"{exc}. The embedded default model completes Python code and cannot "
                    "chat: pass --model with a chat model folder or a name from the Hugging "
                    "Face cache (e.g. --model Qwen/Qwen2.5-0.5B-Instruct)") from None
            raise

    def prompt_ids(self) -> list[int]:
        """The next reply's prompt: the whole conversation, rendered."""
        return self.llm.get_tokenizer().apply_chat_template(
            self.messages, chat_template=self.chat_template, add_generation_prompt=True)

    def answer_once(self, text: str) -> int:
        """Non-interactive: `text` is one user message; print the whole reply."""
        self.messages.append({"role": "user", "content": text})
        out = self.llm.generate([self.prompt_ids()], self.params)[0]
        reply = out.outputs[0].text
        self.messages.append({"role": "assistant", "content": reply})
        self._save()
        print(for_stdout(reply))
        return 0

    def interact(self) -> int:
        """Read a line, stream the reply, repeat, until /exit or end of input."""
        try:
            import readline  # noqa: F401 - line editing and history for input()
        except ImportError:  # pragma: no cover - not on every platform
            pass
        print("engine chat: /exit or Ctrl-D to quit, Ctrl-C stops a reply, /clear starts over",
              file=sys.stderr)
        while True:
            try:
                line = input(PROMPT)
            except EOFError:
                print()
                return 0
            except KeyboardInterrupt:
                print("\n(type /exit to quit)")
                continue
            if line.strip() in EXIT_COMMANDS:
                return 0
            if not line.strip():
                continue
            if line.strip() == CLEAR_COMMAND:
                self.messages = [m for m in self.messages if m["role"] == "system"]
                print("(conversation cleared)")
                continue
            self.messages.append({"role": "user", "content": line})
            try:
                reply, stopped = self._stream_reply()
            except ValueError as exc:  # e.g. the conversation outgrew the context
                self.messages.pop()
                print(f"engine chat: error: {exc} (/clear starts over)", file=sys.stderr)
                continue
            self.messages.append({"role": "assistant", "content": reply})
            self._save()
            print("\n[stopped]" if stopped else "")

    def _stream_reply(self) -> tuple[str, bool]:
        """Generate the reply, printing it as it comes. Ctrl-C is turned into a flag
        that is checked after every engine step, the reply's own or not (a long
        conversation's prompt takes several steps before the first token), so the
        engine is never interrupted in the middle of one. Returns the reply text and
        whether it was stopped."""
        stop = {"requested": False}

        def on_sigint(signum: int, frame: Any) -> None:
            stop["requested"] = True

        previous = signal.signal(signal.SIGINT, on_sigint)
        engine = self.llm.llm_engine
        text, done = "", False
        try:
            request_id = engine.add_request(self.prompt_ids(), self.params)
            try:
                while not done and not stop["requested"]:
                    for out in engine.step():
                        if out.request_id != request_id:
                            continue
                        done = out.finished
                        delta = out.outputs[0].text_delta
                        if delta:
                            text += delta
                            sys.stdout.write(for_stdout(delta))
                            sys.stdout.flush()
            finally:
                if not done:
                    engine.abort_request(request_id)
        finally:
            signal.signal(signal.SIGINT, previous)
        return text, stop["requested"] and not done

    def _save(self) -> None:
        if self.history_file:
            Path(self.history_file).write_text(
                json.dumps(self.messages, ensure_ascii=False, indent=1), encoding="utf-8")
