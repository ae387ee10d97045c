"""How many CPUs this process may use: the one count behind every default number of workers."""
from __future__ import annotations

import os


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask: taskset, cgroups cpusets), at least 1.

    os.cpu_count() counts the machine's CPUs, which overcommits a process pinned to fewer.
    """
    if hasattr(os, "sched_getaffinity"):
        return max(len(os.sched_getaffinity(0)), 1)
    return os.cpu_count() or 1
