"""A real corpus every machine has: the Python standard library's own source files.

Used by `comigs demo` so the first run needs nothing beyond the installed packages, and by the
`python-stdlib` scenario source (`extract.python_stdlib`). Both read the files through
`stdlib_modules`, so the demo's corpus and the scenario's are the same text by construction.
"""

from __future__ import annotations

import sysconfig
from collections.abc import Iterator
from pathlib import Path

#: Files shorter than this are mostly shims and re-exports: too little prose or code to learn from.
MIN_FILE_CHARS = 500


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_modules(root: Path, max_file_chars: int = 20_000) -> Iterator[tuple[str, str]]:
    """(file name, text) of the top-level modules under `root`, sorted so every run sees the same
    corpus; each cut to `max_file_chars`; unreadable and short files skipped."""
    for path in sorted(root.glob("*.py")):
        try:
            text = path.read_text(encoding="utf-8")[:max_file_chars]
        except (UnicodeDecodeError, OSError):
            continue
        if len(text) >= MIN_FILE_CHARS:
            yield path.name, text


def stdlib_documents(max_chars: int, max_file_chars: int = 20_000) -> list[str]:
    """This interpreter's standard library modules, until `max_chars` characters are collected."""
    docs, total = [], 0
    for _, text in stdlib_modules(stdlib_root(), max_file_chars):
        docs.append(text)
        total += len(text)
        if total >= max_chars:
            break
    return docs
