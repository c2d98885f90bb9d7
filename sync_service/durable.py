"""Crash-safe file writes: temp file, fsync, rename, fsync the directory.

An upload is acknowledged only after its bytes and its directory entry are on stable storage, and a
published generalist replaces nothing until it is complete; a SIGKILL or power cut at any instant leaves
either the old state or the new one, plus at most a stray temp file that start-up recovery deletes.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from pathlib import Path


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make a directory's entries (a rename, a new file) durable."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_dirs_durable(path: Path) -> None:
    """Create `path` (and parents) and fsync each parent whose entry list changed."""
    missing = []
    current = path
    while not current.exists():
        missing.append(current)
        current = current.parent
    for directory in reversed(missing):
        directory.mkdir(exist_ok=True)
        fsync_dir(directory.parent)


def publish_file(temp_path: Path, final_path: Path) -> None:
    """Atomically move an already fsynced temp file to its final name and make the rename durable."""
    make_dirs_durable(final_path.parent)
    os.replace(temp_path, final_path)
    fsync_dir(final_path.parent)


def write_atomic(final_path: Path, pieces: Iterable[bytes], temp_dir: Path) -> tuple[str, int]:
    """Write `pieces` to `final_path` atomically; return (sha256 hex, size).

    `temp_dir` must be on the same filesystem as `final_path` (rename is only atomic within one).
    """
    temp_dir.mkdir(parents=True, exist_ok=True)
    temp_path = temp_dir / f".{final_path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp"
    digest = hashlib.sha256()
    size = 0
    try:
        with open(temp_path, "wb") as handle:
            for piece in pieces:
                handle.write(piece)
                digest.update(piece)
                size += len(piece)
            handle.flush()
            os.fsync(handle.fileno())
        publish_file(temp_path, final_path)
    except BaseException:
        temp_path.unlink(missing_ok=True)
        raise
    return digest.hexdigest(), size


def sha256_file(path: Path, block: int = 1 << 20) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as handle:
        while data := handle.read(block):
            digest.update(data)
            size += len(data)
    return digest.hexdigest(), size
