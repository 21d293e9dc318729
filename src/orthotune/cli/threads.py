"""How many CPU threads a fine-tuning run uses, and how its idle OpenMP threads wait.

torch starts one intra-op thread per core and, through GNU OpenMP (``libgomp``), lets threads that reach a
barrier spin for a while before they sleep. On a machine where another CPU-bound process holds one of two cores
that is the worst case: every parallel region waits until the thread that has no core of its own gets a time
slice, while its partner burns the free core spinning. ``orthotune finetune`` ran ~25× slower than idle next to
one competing process (BENCHMARKS.md, ``benchmarks/busy_machine.py``).

The policy here:

* **threads**: an explicit request (``--threads``, else ``OMP_NUM_THREADS``) wins; otherwise the cores this
  process may run on (``os.sched_getaffinity``) minus the cores other processes keep busy, read from the load
  average and the number of runnable tasks right now, at least one.
* **waiting**: ``OMP_WAIT_POLICY=PASSIVE`` (and ``KMP_BLOCKTIME=0`` for Intel's OpenMP): an idle thread sleeps
  at once instead of spinning, so a thread count that turns out too high (the load changes during the run)
  costs a wake-up, not a core. OpenMP reads these variables once, when torch loads it: they are set only if
  torch is not imported yet (call :func:`prepare_openmp_environment` first thing), and never over a value the
  user set.

This module does not import torch at import time.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import MutableMapping
from dataclasses import dataclass

logger = logging.getLogger(__name__)

#: Set when the user has not set them: idle OpenMP threads sleep instead of spinning (GNU and Intel OpenMP).
PASSIVE_WAITING = {"OMP_WAIT_POLICY": "PASSIVE", "KMP_BLOCKTIME": "0"}


def available_cores() -> int:
    """Cores this process may run on: its CPU affinity where the platform has one, else ``os.cpu_count()``."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def busy_cores(loadavg_path: str = "/proc/loadavg") -> float:
    """Cores other processes keep busy: the larger of the 1-minute load average and the tasks runnable right
    now less this one (``/proc/loadavg``'s fourth field; the load average lags a process that just started)."""
    try:
        one_minute = os.getloadavg()[0]
    except (AttributeError, OSError):
        one_minute = 0.0
    try:
        with open(loadavg_path) as file:
            running = int(file.read().split()[3].split("/")[0]) - 1
    except (OSError, IndexError, ValueError):
        running = 0
    return max(one_minute, float(running), 0.0)


@dataclass(frozen=True)
class ThreadChoice:
    """The intra-op thread count chosen, and why."""

    threads: int
    cores: int
    busy: float
    reason: str

    def describe(self) -> str:
        return f"{self.threads} CPU thread{'s' * (self.threads != 1)} ({self.reason})"


def choose_cpu_threads(
    requested: int | None = None, environ: MutableMapping[str, str] | None = None, busy: float | None = None
) -> ThreadChoice:
    """Intra-op threads for a CPU run.

    Args:
        requested: an explicit count (``--threads``); wins over everything.
        environ: where to look for ``OMP_NUM_THREADS`` (default ``os.environ``).
        busy: cores other processes use; default :func:`busy_cores`.

    Returns:
        ``requested``, else a valid ``OMP_NUM_THREADS``, else the free cores (cores less busy, rounded, ≥ 1).
    """
    environ = os.environ if environ is None else environ
    cores = available_cores()
    busy = busy_cores() if busy is None else busy
    if requested is not None:
        if requested < 1:
            raise ValueError(f"threads={requested} must be at least 1; omit it to choose by the machine's load")
        return ThreadChoice(requested, cores, busy, "requested")
    from_env = environ.get("OMP_NUM_THREADS", "").strip()
    if from_env.isdigit() and int(from_env) > 0:
        return ThreadChoice(int(from_env), cores, busy, "OMP_NUM_THREADS")
    free = max(1, min(cores, round(cores - busy)))
    return ThreadChoice(free, cores, busy, f"{cores} cores, {busy:.1f} busy with other work")


def prepare_openmp_environment(environ: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """Make idle OpenMP threads sleep instead of spin, if it can still take effect.

    Returns:
        The variables set (none if torch is already imported, or the user set them).
    """
    environ = os.environ if environ is None else environ
    if "torch" in sys.modules:
        return {}
    chosen = {name: value for name, value in PASSIVE_WAITING.items() if name not in environ}
    environ.update(chosen)
    return chosen


def apply_cpu_thread_policy(requested: int | None = None) -> ThreadChoice:
    """:func:`prepare_openmp_environment`, then ``torch.set_num_threads`` with :func:`choose_cpu_threads`.

    Call it before anything imports torch for the waiting policy to apply; the thread count applies anyway.
    """
    environment = prepare_openmp_environment()
    choice = choose_cpu_threads(requested)
    if "OMP_NUM_THREADS" not in os.environ and "torch" not in sys.modules:
        os.environ["OMP_NUM_THREADS"] = str(choice.threads)  # the pool then starts at that size
    import torch

    torch.set_num_threads(choice.threads)
    logger.info("%s; OpenMP waiting: %s", choice.describe(), environment or "as the environment says")
    return choice
