"""The coordinator's cap on glibc malloc arenas (`sync_service.allocator`), checked in fresh processes."""

from __future__ import annotations

import platform
import subprocess
import sys
from pathlib import Path

import pytest

from sync_service.allocator import DEFAULT_ARENAS, limit_malloc_arenas

REPO_ROOT = Path(__file__).resolve().parents[2]

# Six threads that each hold a malloc'ed block at the same time (so none can inherit an arena a finished
# thread gave back), then glibc's own per-arena report on stderr.
_ARENAS = """
import ctypes, sys, threading
from sync_service.allocator import limit_malloc_arenas
print(limit_malloc_arenas(int(sys.argv[1])))
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_void_p]
barrier = threading.Barrier(6)
def hold():
    block = libc.malloc(1 << 16)
    barrier.wait()
    libc.free(block)
threads = [threading.Thread(target=hold) for _ in range(6)]
for t in threads: t.start()
for t in threads: t.join()
libc.malloc_stats()
"""

glibc_only = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="M_ARENA_MAX is a glibc knob")


def _arenas_used(cap: int) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", _ARENAS, str(cap)], capture_output=True, text=True, cwd=REPO_ROOT,
                         check=True, timeout=60)
    return out.stdout.strip(), sum(line.startswith("Arena ") for line in out.stderr.splitlines())


@glibc_only
@pytest.mark.parametrize("cap", [1, 2, 4])
def test_threads_share_at_most_the_capped_number_of_arenas(cap: int) -> None:
    assert _arenas_used(cap) == ("True", cap)


@glibc_only
def test_zero_keeps_the_c_librarys_default() -> None:
    applied, arenas = _arenas_used(0)
    assert applied == "False" and arenas == 7  # glibc: an arena per thread (main + 6), up to 8 per core
    assert DEFAULT_ARENAS == 1  # what `comigs sync serve` uses unless told otherwise


def test_a_negative_cap_is_refused_clearly() -> None:
    with pytest.raises(ValueError, match="malloc arenas must be >= 0"):
        limit_malloc_arenas(-1)
    out = subprocess.run([sys.executable, "-m", "sync_service", "serve", "--malloc-arenas", "-1"], capture_output=True,
                         text=True, cwd=REPO_ROOT, timeout=60)
    assert out.returncode == 2 and "--malloc-arenas" in out.stderr
