"""What the benchmark scripts share: timing a call and naming the machine."""

from __future__ import annotations

import gc
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path


def measure(op: Callable[[], object], repeats: int, target_ns: int) -> float:
    """Median per-call time of ``op`` in µs.

    The batch size doubles until one batch takes ``target_ns``, so fast and slow operations
    get equally stable numbers; the median of ``repeats`` batches ignores the odd
    interruption.  GC is off while timing, as in ``timeit``, so a collection triggered by
    earlier garbage is not charged to whatever runs next.
    """
    clock = time.perf_counter_ns
    op()  # warm caches and lazily initialised backends
    n = 1
    while True:
        start = clock()
        for _ in range(n):
            op()
        if clock() - start >= target_ns:
            break
        n *= 2
    samples = []
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for _ in range(repeats):
            start = clock()
            for _ in range(n):
                op()
            samples.append((clock() - start) / n)
    finally:
        if gc_was_enabled:
            gc.enable()
    return statistics.median(samples) / 1000.0


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"
