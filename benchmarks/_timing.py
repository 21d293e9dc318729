"""Paired timing, spread statistics and table output shared by the benchmark scripts.

Timing on a shared, noisy machine: every callable of a group is timed once per repetition, back to back,
in an order that rotates between repetitions, so a burst of load from another process hits all members of
the group in about the same way. Ratios are then taken *within* a repetition (``a_i / b_i``) and the median
of those per-repetition ratios is reported with its 25th-75th percentile spread -- never the ratio of two
medians taken at different times.
"""

from __future__ import annotations

import hashlib
import importlib
import math
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

#: The clock every timing reads: wall time by default; ``set_clock("cpu")`` switches to this process's CPU time.
_clock: Callable[[], float] = time.perf_counter
CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}


def set_clock(name: str) -> None:
    """``"wall"`` (``time.perf_counter``) or ``"cpu"`` (``time.process_time``: the CPU time of every thread of this
    process). On a machine shared with other CPU-bound work, CPU time leaves out the time this process waited
    for a core, the largest source of noise there (not cache and memory-bandwidth contention); with more than
    one torch thread it also counts threads that spin while waiting."""
    global _clock
    _clock = CLOCKS[name]


def clock_name() -> str:
    return next(name for name, clock in CLOCKS.items() if clock is _clock)


def seconds_per_call(fn: Callable[[], object], calls: int = 1) -> float:
    start = _clock()
    for _ in range(calls):
        fn()
    return (_clock() - start) / calls


def calls_per_sample(per_call_s: float, min_sample_s: float) -> int:
    """How many calls make one timing sample last at least ``min_sample_s``."""
    return max(1, math.ceil(min_sample_s / max(per_call_s, 1e-9)))


def repeats_within(budget_s: float, per_rep_s: float, low: int, high: int) -> int:
    """The number of repetitions that fits ``budget_s``, clamped to ``[low, high]``."""
    return max(low, min(high, int(budget_s / max(per_rep_s, 1e-9))))


def time_group(
    fns: Mapping[str, Callable[[], object]], calls: Mapping[str, int], repeats: int
) -> dict[str, list[float]]:
    """Seconds per call of every member, per repetition; the order rotates by one member each repetition."""
    names = list(fns)
    times: dict[str, list[float]] = {name: [] for name in names}
    for rep in range(repeats):
        shift = rep % len(names)
        for name in names[shift:] + names[:shift]:
            times[name].append(seconds_per_call(fns[name], calls[name]))
    return times


def warm_up(fn: Callable[[], object], warmup: int, max_s: float = 2.0) -> float:
    """Call ``fn`` up to ``warmup`` times (fewer once ``max_s`` is spent); return the last call's seconds."""
    spent, last = 0.0, 0.0
    for _ in range(max(1, warmup)):
        last = seconds_per_call(fn)
        spent += last
        if spent > max_s:
            break
    return last


@dataclass(frozen=True)
class Budget:
    """How long to time one group: warm-up calls, shortest sample, seconds to spend, repetition bounds."""

    warmup: int = 3
    min_sample_s: float = 0.05
    budget_s: float = 6.0
    min_repeats: int = 3
    max_repeats: int = 11


def timed_group(fns: Mapping[str, Callable[[], object]], budget: Budget) -> dict[str, list[float]]:
    """Warm every member up, size samples and repetitions to ``budget``, then :func:`time_group` them."""
    per_call = {name: warm_up(fn, budget.warmup) for name, fn in fns.items()}
    calls = {name: calls_per_sample(per_call[name], budget.min_sample_s) for name in fns}
    per_rep = sum(calls[name] * per_call[name] for name in fns)
    repeats = repeats_within(budget.budget_s, per_rep, budget.min_repeats, budget.max_repeats)
    return time_group(fns, calls, repeats)


def paired_ratios(numerator: Sequence[float], denominator: Sequence[float]) -> list[float]:
    return [a / b for a, b in zip(numerator, denominator, strict=True)]


def percentile(values: Sequence[float], q: float) -> float:
    """Linearly interpolated percentile, ``q`` in [0, 100]."""
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


@dataclass(frozen=True)
class Spread:
    """Median with its 25th-75th percentile range, over ``count`` samples."""

    median: float
    p25: float
    p75: float
    count: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread:
        return cls(statistics.median(values), percentile(values, 25), percentile(values, 75), len(values))

    def format(self, digits: int = 2, scale: float = 1.0) -> str:
        m, lo, hi = (scale * v for v in (self.median, self.p25, self.p75))
        return f"{m:.{digits}f} [{lo:.{digits}f}-{hi:.{digits}f}]"


def render_markdown(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def render_text(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(headers)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [fmt.format(*headers), fmt.format(*("-" * w for w in widths))]
    return "\n".join(lines + [fmt.format(*row) for row in rows])


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment_line() -> str:
    """One line naming what the figures depend on: library versions, CPU, thread count."""
    versions = [f"torch {torch.__version__}"]
    for name in ("peft", "transformers", "orthotune"):
        try:
            versions.append(f"{name} {getattr(importlib.import_module(name), '__version__', '?')}")
        except Exception as exc:
            versions.append(f"{name} unavailable ({type(exc).__name__})")
    cores = os.cpu_count()
    return (
        f"{', '.join(versions)} | python {platform.python_version()} | CPU: {cpu_model()} ({cores} logical cores) "
        f"| torch threads: {torch.get_num_threads()} | clock: {clock_name()} | {source_state()}"
    )


def source_state() -> str:
    """The commit of the working tree and whether ``src/`` differs from it (the figures depend on it)."""
    root = Path(__file__).resolve().parents[1]

    def git(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, check=False)

    head = git("rev-parse", "--short", "HEAD").stdout.strip() or "unknown"
    diff = git("diff", "HEAD", "--", "src").stdout
    if not diff:
        return f"src at {head}"
    return f"src at {head} + uncommitted changes (diff sha1 {hashlib.sha1(diff.encode()).hexdigest()[:10]})"
