"""How OpenMP threads wait for work, chosen when `engine` is imported (libgomp
reads its settings once, when torch loads it)."""

from __future__ import annotations

import os
import sys

# How OpenMP threads wait for work between parallel regions (a decode step is
# hundreds of them). On a machine with idle cores they should spin briefly: waking
# a sleeping thread costs tens of microseconds per region, a third of a bf16 decode
# step here. On a machine whose cores are all busy they must sleep: a thread
# spinning on the core its descheduled partner needs made decoding up to 10x
# slower. libgomp reads its settings once, when torch loads it, so the choice is
# made here, only before torch is imported and never over the user's own
# OMP_WAIT_POLICY or GOMP_SPINCOUNT (docs/benchmarks.md, "OpenMP waiting").
_SPIN_COUNT = "20000"  # ~tens of microseconds: covers the gaps inside one step


def _cores_are_busy() -> bool | None:
    """Whether other work occupies every core right now: as many other runnable
    threads as cores (``/proc/loadavg``'s running count, less this one), or a
    one-minute load average a core above the core count. None when unknown."""
    try:
        cpus = len(os.sched_getaffinity(0))
        with open("/proc/loadavg") as f:
            fields = f.read().split()
        load1, running = float(fields[0]), int(fields[3].split("/")[0])
    except (AttributeError, OSError, ValueError, IndexError):
        return None
    return running - 1 >= cpus or load1 >= cpus + 1


def choose_openmp_wait_policy() -> None:
    """Set ``OMP_WAIT_POLICY=PASSIVE`` when other work fills every core, else
    ``GOMP_SPINCOUNT`` to a short spin; nothing when torch is already imported, the
    user set either variable, or the load is unknown (not Linux)."""
    if "torch" in sys.modules or "OMP_WAIT_POLICY" in os.environ or "GOMP_SPINCOUNT" in os.environ:
        return
    busy = _cores_are_busy()
    if busy is None:  # not Linux: leave the runtime's default
        return
    if busy:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    else:
        os.environ["GOMP_SPINCOUNT"] = _SPIN_COUNT

