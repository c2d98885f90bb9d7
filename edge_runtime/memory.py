"""Process memory on Linux: resident size, its peak, and giving freed memory back to the OS."""

from __future__ import annotations

import ctypes
import ctypes.util
from pathlib import Path

_libc = None


def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise OSError(f"cannot read {field} from /proc/self/status (memory is measured on Linux)")


def current_rss_bytes() -> int:
    return _status_bytes("VmRSS")


def peak_rss_bytes() -> int:
    return _status_bytes("VmHWM")


def reset_peak_rss() -> None:
    """Writing 5 to clear_refs resets VmHWM to the current RSS (Linux >= 4.0)."""
    Path("/proc/self/clear_refs").write_text("5")


def release_free_memory() -> None:
    """Return memory the C allocator keeps after frees (glibc `malloc_trim`); no-op elsewhere.

    glibc keeps freed blocks of a training step for reuse, so without this the resident size
    after a step sits well above what is live, and the next step's peak stacks on top of it.
    """
    global _libc
    if _libc is None:
        name = ctypes.util.find_library("c")
        _libc = ctypes.CDLL(name) if name else False
    if _libc and hasattr(_libc, "malloc_trim"):
        _libc.malloc_trim(0)
