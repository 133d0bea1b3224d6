"""Where the time to `engine chat MODEL`'s prompt goes, phase by phase.

    python benchmarks/profile_first_prompt.py MODEL              # phases, wall and CPU
    python benchmarks/profile_first_prompt.py MODEL --cprofile 40  # and the top 40 functions
    python -X importtime benchmarks/profile_first_prompt.py MODEL 2> imports.txt

Runs the real `engine chat MODEL` command in this process (`engine.cli.main.main`)
with stdin taken for a terminal, and stops where the prompt would be printed. Each
phase (imports, engine arguments, model load, KV cache, warm-up steps, the chat
template check) is timed in wall-clock seconds and in this process's CPU seconds
(all threads): on a machine loaded by other jobs the CPU seconds move less than
the wall time. `bench_first_prompt.py` measures the whole command end to end.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

_START = (time.perf_counter(), time.process_time())
_phases: list[tuple[str, float, float]] = []


def _timed(owner: Any, name: str, label: Callable[..., str] | None = None) -> None:
    """Wrap ``owner.name`` so each call is recorded as a phase."""
    original = getattr(owner, name)

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        wall, cpu = time.perf_counter(), time.process_time()
        try:
            return original(*args, **kwargs)
        finally:
            what = label(*args, **kwargs) if label else f"{owner.__name__}.{name}"
            _phases.append((what, time.perf_counter() - wall, time.process_time() - cpu))

    setattr(owner, name, wrapper)


class _PromptReached(Exception):
    """Raised where `engine chat` would print its first prompt."""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", help="model folder, GGUF file or cached 'org/name'")
    ap.add_argument("--cprofile", type=int, default=0, metavar="N",
                    help="also profile with cProfile and print the top N by cumulative time")
    # any other option is `engine chat`'s (--max-num-seqs 4, --dtype float32, ...)
    args, engine_args = ap.parse_known_args()

    profiler = cProfile.Profile() if args.cprofile else None
    if profiler:
        profiler.enable()
    wall, cpu = time.perf_counter(), time.process_time()
    import engine  # noqa: F401, I001 - first, as `engine chat` does: it sets the OpenMP wait policy
    import torch  # noqa: F401 - timed on its own: the floor of every start-up

    _phases.append(("import torch", time.perf_counter() - wall, time.process_time() - cpu))
    wall, cpu = time.perf_counter(), time.process_time()
    from engine.cli import chat
    from engine.cli.main import main as engine_main
    from engine.core.engine import LLMEngine
    from engine.engine_args import EngineArgs
    from engine.worker.model_runner import ModelRunner
    from engine.worker.worker import Worker

    _phases.append(("import engine", time.perf_counter() - wall, time.process_time() - cpu))
    _timed(EngineArgs, "create_engine_config")
    _timed(Worker, "load_model")
    _timed(Worker, "init_device")
    _timed(Worker, "initialize_cache")
    _timed(ModelRunner, "execute_model",
           lambda self, step: f"  warm-up step of {step.num_batched_tokens} tokens")
    _timed(LLMEngine, "__init__")
    _timed(chat.ChatSession, "check_template")

    def at_prompt(self: Any) -> int:
        raise _PromptReached

    chat.ChatSession.interact = at_prompt
    sys.stdin.isatty = lambda: True  # type: ignore[method-assign]
    try:
        engine_main(["chat", args.model, *engine_args])
    except _PromptReached:
        pass
    else:
        print("engine chat ended before its prompt (see its error above)", file=sys.stderr)
        return 1
    if profiler:
        profiler.disable()
    total_wall = time.perf_counter() - _START[0]
    total_cpu = time.process_time() - _START[1]
    print(f"{'phase':44s} {'wall s':>8s} {'CPU s':>8s}")
    for what, w, c in _phases:
        print(f"{what:44s} {w:8.3f} {c:8.3f}")
    print(f"{'to the prompt (this process)':44s} {total_wall:8.3f} {total_cpu:8.3f}")
    if profiler:
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats("cumulative").print_stats(args.cprofile)
        print(out.getvalue())
    return 0


if __name__ == "__main__":
    sys.exit(main())
