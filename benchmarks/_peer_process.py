"""One measured side of a peer benchmark in its own process (bench_vs_vllm.py,
bench_vs_llamacpp.py): the driver starts the script again in `--worker` mode under
that side's Python, sends commands as JSON lines on stdin, and reads result lines.
Only the standard library: the peers' virtual environments import it too."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

RESULT_PREFIX = "@@result "


def reply(payload: dict) -> None:
    """Worker side: one result line for the driver."""
    print(RESULT_PREFIX + json.dumps(payload), flush=True)


class Side:
    """Driver side: the worker process `cmd`, its ready message in `ready`."""

    def __init__(self, name: str, cmd: list[str], env: dict, cwd: Path) -> None:
        self.name = name
        # its own process group: closing the side also ends the processes it started
        # (vLLM's engine core)
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, env=env, cwd=str(cwd), start_new_session=True)
        self.ready = self._read()

    def _read(self) -> dict:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith(RESULT_PREFIX):
                return json.loads(line[len(RESULT_PREFIX):])
        raise RuntimeError(f"{self.name} worker exited with code {self.proc.wait()}")

    def ask(self, **command) -> dict:
        """Send one command; its result."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def _signal(self, sig: int) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def pause(self) -> None:
        """Stop the worker's whole process group (SIGSTOP) while another side is
        measured: an idle peer is not idle (spin-waiting OpenMP threads, background
        threads: vLLM's took 10% of a core for seconds after a request)."""
        self._signal(signal.SIGSTOP)

    def resume(self) -> None:
        """Let a paused worker's group run again (SIGCONT)."""
        self._signal(signal.SIGCONT)

    def close(self) -> None:
        """End the worker (stdin closed, then killed after 60 s) and its group."""
        self.resume()
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        try:  # whatever the worker left behind in its group
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def take_turn(sides: dict[str, Side], name: str) -> Side:
    """Resume side `name` and pause every other one: the measured side has the
    machine to itself, whichever goes first."""
    for other, side in sides.items():
        if other != name:
            side.pause()
    sides[name].resume()
    return sides[name]
