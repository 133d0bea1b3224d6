"""`engine plugins test NAME [--group G] [--json] [-k EXPR]`."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time

from engine.cli.common import for_stdout
from engine.testing._core import CheckResult
from engine.testing._kit import run_plugin_checks


def run_test_command(args: argparse.Namespace) -> int:
    """Run the checks; print one line per failed check (and a summary), or a JSON
    array with --json. Exit code 0 when every check that ran passed, 1 when one
    failed or errored (a skipped check does not fail the run); 2 for a bad name,
    group or -k expression."""
    quiet = args.json

    def show(result: CheckResult) -> None:
        if not quiet and result.outcome != "passed":
            # a failed check quotes the plugin's own text: shown, never obeyed
            print(for_stdout(result.line()), flush=True)

    start = time.perf_counter()
    # with --json, stdout is the JSON document alone: what plugin code prints goes to stderr
    redirect = contextlib.redirect_stdout(sys.stderr) if quiet else contextlib.nullcontext()
    try:
        with redirect:
            results = run_plugin_checks(args.name, args.group, args.keyword, on_result=show)
    except (LookupError, ValueError) as exc:
        print(f"engine plugins test: {exc}", file=sys.stderr)
        return 2
    counts = {o: sum(r.outcome == o for r in results)
              for o in ("passed", "failed", "error", "skipped")}
    if quiet:
        print(json.dumps([r.to_json() for r in results], indent=2))
    else:
        summary = ", ".join(f"{n} {o}" for o, n in counts.items() if n) or "no checks selected"
        seconds = time.perf_counter() - start
        print(f"{args.name}: {summary} in {seconds:.1f} s")
    if not results:
        return 1
    return 1 if counts["failed"] or counts["error"] else 0
