"""The OpenMP wait policy `import engine` chooses (engine._openmp): spin briefly on
an idle machine, sleep when other work fills every core, never over the user's
own setting. The rule is checked on `/proc/loadavg` lines, and end to end in a
fresh interpreter beside as many busy-looping processes as it has cores."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from engine._openmp import cores_are_busy, running_others

PRINT_POLICY = ("import os, engine, engine._openmp as o; print(os.environ.get('OMP_WAIT_POLICY'), "
                "os.environ.get('GOMP_SPINCOUNT'), o.passive_notice() is not None)")


def test_running_others_reads_the_running_count():
    assert running_others("0.52 0.58 0.59 3/511 12345\n") == 2  # less the reader
    assert running_others("0.52 0.58 0.59 1/511 12345") == 0
    assert running_others("garbage") is None


def test_busy_needs_most_looks_to_find_every_core_taken():
    assert cores_are_busy([2, 2, 3, 2, 2], cpus=2)
    assert not cores_are_busy([0, 0, 0, 0, 0], cpus=2)
    assert not cores_are_busy([0, 2, 0, 0, 1], cpus=2)  # one look at a moment's blip
    assert not cores_are_busy([2, 2, 0, 1, 0], cpus=2)  # two of five: not most
    assert cores_are_busy([1, 1, 1], cpus=1)
    assert not cores_are_busy([1, 1, 1], cpus=2)


def _policy(env: dict) -> list[str]:
    out = subprocess.run([sys.executable, "-c", PRINT_POLICY], env=env, capture_output=True,
                         text=True, timeout=120, check=True)
    return out.stdout.split()


def test_import_sleeps_beside_busy_cores_and_keeps_the_users_choice(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env["ENGINE_CONFIG_DIR"] = str(tmp_path)
    cpus = len(os.sched_getaffinity(0))
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
            for _ in range(cpus)]
    try:
        time.sleep(0.5)  # all of them started and spinning
        # sleeping threads, and a notice for the start-up log saying so
        assert _policy(env) == ["PASSIVE", "None", "True"]
        # the user's own setting is never replaced, and no notice
        assert _policy(dict(env, GOMP_SPINCOUNT="5")) == ["None", "5", "False"]
    finally:
        for proc in busy:
            proc.kill()
            proc.wait()


def test_the_worker_logs_sleeping_threads_at_start(monkeypatch, caplog, tmp_path):
    """A process that chose sleeping OpenMP threads says so once in the start-up log
    when its CPU worker starts (the choice holds for the process's life)."""
    import engine._openmp as openmp
    from engine import LLM

    monkeypatch.setenv("ENGINE_CONFIG_DIR", str(tmp_path))
    for chosen, expected in (("passive", 1), ("spin", 0)):
        monkeypatch.setattr(openmp, "chosen", chosen)
        caplog.clear()
        with caplog.at_level("INFO", logger="engine.startup"):
            LLM(kv_cache_memory=1 << 22).shutdown()
        lines = [r.getMessage() for r in caplog.records if "OpenMP threads sleep" in r.getMessage()]
        assert len(lines) == expected, lines
