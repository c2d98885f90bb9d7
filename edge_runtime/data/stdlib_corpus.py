"""A real corpus every machine has: the Python standard library's own source files.

Used by `comigs demo` so the first run needs nothing beyond the installed packages.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path


def stdlib_documents(max_chars: int, max_file_chars: int = 20_000) -> list[str]:
    """Source files of the standard library (sorted, so the corpus is the same on every run),
    each cut to `max_file_chars`, until `max_chars` characters are collected."""
    root = Path(sysconfig.get_paths()["stdlib"])
    docs, total = [], 0
    for path in sorted(root.glob("*.py")):
        try:
            text = path.read_text(encoding="utf-8")[:max_file_chars]
        except (UnicodeDecodeError, OSError):
            continue
        if len(text) < 500:
            continue
        docs.append(text)
        total += len(text)
        if total >= max_chars:
            break
    return docs
