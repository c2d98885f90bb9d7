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

Session 14 (2026-12-06, same kind of VM), after the ingest stopped allocating numpy temporaries per
chunk and devices stopped holding connections while idle, single `--repeat 1 --no-save` runs with the
connection limit (64) and the 0.25 s hang-up, all three servers under the same cap:

    arenas           (peak - idle) / delta   ingest / raw gRPC
    glibc default    5.62, 4.78              0.495, 0.516
    2                3.12, 3.33              0.474, 0.417
    1                3.21, 3.07, 2.75, 3.14  0.402, 0.408, 0.555, 0.546

The throughput differences are inside this VM's run-to-run spread (+-0.08); the memory ones are not.
So the default is one arena (`--malloc-arenas 1`): the coordinator's hot path runs under the GIL
anyway, so threads rarely allocate at the same moment; `--malloc-arenas 0` restores glibc's default
for a deployment that measures otherwise.
`mallopt(M_ARENA_MAX)` only shapes arenas created after the call, so `comigs sync serve` calls this
before it starts any thread. C libraries without `mallopt` (macOS) make this a no-op.
"""

from __future__ import annotations

import ctypes
import logging

M_ARENA_MAX = -8  # glibc's malloc.h
DEFAULT_ARENAS = 1  # see the module docstring; 0 = glibc's own default (8 per core)

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
