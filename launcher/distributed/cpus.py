"""How many CPU cores this process may use, and the thread count that follows from it.

torch and OpenMP size their thread pools from the machine's cores, not from what the process was
given. A Slurm task given 1 CPU of a 2-core node, or one of two runs the local executor trains at
once, then runs as many threads as the node has cores and competes with its neighbours: measured
on the local cluster, two one-process array tasks with 1 CPU each trained at 0.02-0.07 steps/s
against 0.6 alone. The budget is the smallest of what the scheduler says:
- the CPUs this process may run on (its affinity mask: what a site's core binding leaves it),
- SLURM_CPUS_PER_TASK inside a Slurm job (without binding the mask still shows the whole node),
- TUNEFLEET_CPUS, set by the local executor for each run it starts (its share of the machine).
A user's OMP_NUM_THREADS is always kept.
"""

from __future__ import annotations

import os
from typing import Mapping

CPU_BUDGET_ENV = "TUNEFLEET_CPUS"


def cpu_budget(environ: Mapping[str, str] | None = None) -> int:
    env = os.environ if environ is None else environ
    try:
        limits = [len(os.sched_getaffinity(0))]
    except (AttributeError, OSError):  # not Linux
        limits = [os.cpu_count() or 1]
    for name in ("SLURM_CPUS_PER_TASK", CPU_BUDGET_ENV):
        value = env.get(name, "")
        if value.isdigit() and int(value) > 0:
            limits.append(int(value))
    return min(limits)


def threads_per_process(processes: int, environ: Mapping[str, str] | None = None) -> int:
    return max(1, cpu_budget(environ) // max(1, processes))


def size_threads_for_this_process(environ: dict | None = None) -> int | None:
    """For a run that trains in this process: cap torch's threads at the CPU budget (unless the user set
    OMP_NUM_THREADS). Returns the thread count set, or None when nothing needed changing."""
    import sys

    env = os.environ if environ is None else environ
    if "OMP_NUM_THREADS" in env:
        return None
    threads = threads_per_process(1, env)
    if threads >= (os.cpu_count() or 1):
        return None
    env["OMP_NUM_THREADS"] = str(threads)  # read by torch at import, and by every child it starts
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(threads)
    return threads
