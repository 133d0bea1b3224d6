"""How OpenMP threads wait for work, chosen when `engine` is imported (libgomp
reads its settings once, when torch loads it)."""

from __future__ import annotations

import os
import sys
import time

# How OpenMP threads wait for work between parallel regions (a decode step is
# hundreds of them). On a machine with idle cores they should spin briefly: waking
# a sleeping thread costs tens of microseconds per region, a third of a bf16 decode
# step here. On a machine whose cores are all busy they must sleep: a thread
# spinning on the core its descheduled partner needs made decoding up to 10x
# slower. libgomp reads its settings once, when torch loads it, so the choice is
# made here, only before torch is imported and never over the user's own
# OMP_WAIT_POLICY or GOMP_SPINCOUNT (docs/benchmarks.md, "OpenMP waiting").
_SPIN_COUNT = "20000"  # ~tens of microseconds: covers the gaps inside one step
# The machine is looked at up to this many times, SAMPLE_GAP_S apart (~1-2 ms in
# all), and counts as busy when most looks find every core taken: one look can land on a
# moment's blip either way. The one-minute load average is not used: it lags, and
# a process started in the minute after a build or a test run would otherwise
# sleep its threads for its whole life on a machine that is idle by then.
SAMPLES = 5
SAMPLE_GAP_S = 0.0005
# what `choose_openmp_wait_policy` set in this process: "spin", "passive", or None
# (the user's own setting, torch imported first, or not Linux)
chosen: str | None = None


def running_others(loadavg: str) -> int | None:
    """Runnable threads other than the reader's, from one read of
    ``/proc/loadavg`` (its fourth field is running/total; the reader is running)."""
    try:
        return int(loadavg.split()[3].split("/")[0]) - 1
    except (IndexError, ValueError):
        return None


def cores_are_busy(samples: list[int], cpus: int) -> bool:
    """Whether other work occupies every one of `cpus` cores: at least `cpus` other
    runnable threads in more than half of the `samples` (`running_others` each; a
    majority of SAMPLES decides, so `_sample` may return fewer)."""
    return sum(n >= cpus for n in samples) * 2 > len(samples)


def _sample() -> tuple[list[int], int] | None:
    """(`running_others` at up to SAMPLES looks, the cores this process may use), or
    None where that cannot be read (not Linux). It stops looking once most of the
    SAMPLES looks agree (three idle looks on an idle machine: ~1 ms of `import engine`)."""
    try:
        cpus = len(os.sched_getaffinity(0))
        samples: list[int] = []
        majority = SAMPLES // 2 + 1
        while len(samples) < SAMPLES:
            if samples:
                time.sleep(SAMPLE_GAP_S)
            with open("/proc/loadavg") as f:
                others = running_others(f.read())
            if others is None:
                return None
            samples.append(others)
            busy = sum(n >= cpus for n in samples)
            if busy >= majority or len(samples) - busy >= majority:
                break
    except (AttributeError, OSError):
        return None
    return samples, cpus


def choose_openmp_wait_policy() -> None:
    """Set ``OMP_WAIT_POLICY=PASSIVE`` when other work fills every core, else
    ``GOMP_SPINCOUNT`` to a short spin; nothing when torch is already imported, the
    user set either variable, or the load is unknown (not Linux)."""
    if "torch" in sys.modules or "OMP_WAIT_POLICY" in os.environ or "GOMP_SPINCOUNT" in os.environ:
        return
    global chosen
    looked = _sample()
    if looked is None:  # not Linux: leave the runtime's default
        return
    if cores_are_busy(*looked):
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
        chosen = "passive"
    else:
        os.environ["GOMP_SPINCOUNT"] = _SPIN_COUNT
        chosen = "spin"


def passive_notice() -> str | None:
    """One line for the start-up log when this process chose sleeping OpenMP
    threads (the choice holds for its whole life, and on a machine that is idle
    later it costs up to a third of a decode step), else None."""
    if chosen != "passive":
        return None
    return ("every core was busy when this process started, so its OpenMP threads sleep "
            "between parallel regions for its whole life (decode up to ~1.5x slower once "
            "the machine is idle); start it on an idle machine, or set "
            "GOMP_SPINCOUNT=20000 to spin or OMP_WAIT_POLICY=PASSIVE to keep sleeping "
            "(either hides this line)")
