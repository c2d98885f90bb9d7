"""Wall-clock timing of a call, shared by the benchmarks: warm-up runs first, then each run timed alone."""

from __future__ import annotations

import time
from collections.abc import Callable


def time_calls(fn: Callable[[], object], warmup: int, repeats: int) -> list[float]:
    """Seconds of each of `repeats` calls of `fn`, after `warmup` untimed ones (caches, lazy init, JIT)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times
