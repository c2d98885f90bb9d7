"""The C allocator's arena limit for the coordinator process: less peak memory for more CPU.

glibc gives each thread that contends for the heap its own malloc arena, up to 8 per core, and an arena
keeps what its threads freed for reuse by those threads. The coordinator's gRPC threads (core pollers,
16 handler threads) allocate and free TLS records, HTTP/2 frames and 64 KiB chunk messages all through
an ingest, so each arena ends up holding its own share of freed buffers and the peak grows with the
number of arenas. Fewer arenas make threads share (and reuse) more, at the price of contention on the
arena locks. Measured with `python benchmarks/bench_sync.py --repeat 2 --no-save --malloc-arenas N`
(200 TLS devices, SmolLM2-sized deltas, 2-core VM, single runs, session 7):

    arenas           (peak - idle) / delta   ingest / raw gRPC   server CPU per upload
    glibc default    8.12                    0.540               83 ms
    4                6.86                    0.508               94 ms
    2                5.82                    0.430               103 ms

Neither setting meets both benchmark targets, and the one a deployment needs depends on its machine,
so the default stays glibc's (`--malloc-arenas 0`); an operator short of memory trades CPU for it.
`mallopt(M_ARENA_MAX)` only shapes arenas created after the call, so `comigs sync serve` calls this
before it starts any thread. C libraries without `mallopt` (macOS) make this a no-op.
"""

from __future__ import annotations

import ctypes
import logging

M_ARENA_MAX = -8  # glibc's malloc.h
DEFAULT_ARENAS = 0  # glibc's own default (8 per core)

log = logging.getLogger(__name__)


def limit_malloc_arenas(arenas: int) -> bool:
    """Cap glibc's malloc arenas at `arenas` (0: leave glibc's default). True when the cap is in force."""
    if arenas < 0:
        raise ValueError(f"malloc arenas must be >= 0 (0: the C library's default), got {arenas}")
    if arenas == 0:
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library this process already runs on
    except (OSError, AttributeError):
        log.info("no mallopt in this process's C library: malloc arena limit not applied")
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    if mallopt(M_ARENA_MAX, arenas) != 1:
        log.warning("mallopt(M_ARENA_MAX, %d) was refused; the C library's default arenas stay", arenas)
        return False
    return True
