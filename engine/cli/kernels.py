"""`engine kernels`: build the compiled CPU kernels now, or say whether they are built.

Without them the engine runs plain PyTorch and starts building them in the
background; `engine kernels build` does it up front, so the first run already
uses them (in bfloat16 the two paths round differently: docs/first-run.md).
"""

from __future__ import annotations

import argparse
import sys


def add_parser(subparsers: argparse._SubParsersAction, parents: list) -> None:
    """Add the `kernels` subcommand to the `engine` parser."""
    p = subparsers.add_parser(
        "kernels",
        parents=parents,
        help="build the compiled CPU kernels now, or show whether they are built",
        description="The engine's compiled CPU kernels are built once per machine and "
                    "cached ($ENGINE_KERNEL_CACHE, default ~/.cache/engine/kernels).",
    )
    p.add_argument("action", choices=("build", "status"),
                   help="build: compile now (a minute or two; needs a C++ compiler and "
                        "ninja); status: print the library's path and whether it is built")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Build the kernels (blocking), or report where they are."""
    from engine import kernels

    path = kernels.library_path()
    if args.action == "status":
        state = "built" if path.exists() else "not built (engine kernels build builds it)"
        print(f"{path}: {state}")
        return 0
    if path.exists():
        print(f"{path}: already built")
        return 0
    print("engine kernels: building the CPU kernels (a minute or two)...", file=sys.stderr,
          flush=True)
    try:
        print(kernels.build())
    except Exception as exc:  # noqa: BLE001 - a compiler failure: say so, no traceback
        print(f"engine kernels: error: the build failed: {exc}\n(the engine still runs, with "
              "plain PyTorch; the compiler's output is above)", file=sys.stderr)
        return 1
    return 0
