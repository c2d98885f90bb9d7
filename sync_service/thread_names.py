"""OS-level names for the coordinator's threads, so `top -H`, `ps -L`, perf and py-spy tell them apart.

Python names its threads only for itself: to the kernel every thread of the coordinator is "python",
so an operator looking at a busy coordinator with `top -H` cannot tell a handler thread stuck in an
upload from gRPC's own I/O threads (which gRPC names "event_engine" and the like) or the round ticker.
Linux keeps a 15-byte name per thread, set with prctl(PR_SET_NAME); the coordinator's handler threads
become "sync-rpc_0" ... and the ticker "sync-rounds". `benchmarks/probe_sync_cpu.py` splits the
coordinator's CPU per upload by these names.

Off Linux (or where libc has no prctl) this does nothing.
"""

from __future__ import annotations

import ctypes
import sys
import threading
from collections.abc import Callable

_PR_SET_NAME = 15
#: The kernel's limit (TASK_COMM_LEN 16, with the terminating NUL).
MAX_NAME_BYTES = 15


def _find_prctl() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


_PRCTL = _find_prctl()


def name_current_thread(name: str | None = None) -> None:
    """Give the calling thread's OS thread `name` (default: its Python name), cut to 15 bytes.

    Usable as a ThreadPoolExecutor `initializer`, which runs in each worker thread as it starts.
    """
    if _PRCTL is None:
        return
    label = (name or threading.current_thread().name).encode("ascii", "replace")[:MAX_NAME_BYTES]
    _PRCTL(_PR_SET_NAME, ctypes.c_char_p(label), 0, 0, 0)
