"""Export into a temporary directory next to the target and move it into place at the end.

A failed export (bad model, exporter crash, failed self-check, Ctrl-C) must never leave
half-written artifacts where a device could pick them up: everything is written into
`.<name>.export-XXXX` beside the target, and only a complete, verified directory is renamed to
the target name (one `rename`, atomic on POSIX). With `overwrite`, an existing target is first
renamed aside and deleted only after the new one is in place.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from edge_runtime.storage import fsync_dir
from export.errors import ExportError


def create_staging(target: Path, overwrite: bool) -> Path:
    """A fresh staging directory beside `target`; refuses early if the target cannot be written."""
    target = Path(target).absolute()
    if target.exists():
        if not target.is_dir():
            raise ExportError(f"output {target} exists and is not a directory; choose another --out.")
        if any(target.iterdir()) and not overwrite:
            raise ExportError(f"output directory {target} already exists and is not empty; pass --overwrite to "
                              "replace it (atomically, after the new export succeeded) or choose another --out.")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.export-", dir=target.parent))
    except OSError as exc:
        raise ExportError(f"cannot write the output directory {target}: {exc.strerror or exc}. Choose a writable "
                          "--out location.") from exc
    return staging


def preflight(target: Path, overwrite: bool) -> None:
    """Fail fast (before loading a model) if `target` could not be exported to."""
    discard(create_staging(target, overwrite))


def _apply_umask(staging: Path) -> None:
    """mkdtemp/mkstemp create private (0700/0600) entries; the published export gets the usual modes."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(staging, 0o777 & ~mask)
    for path in staging.iterdir():
        if path.is_file():
            os.chmod(path, 0o666 & ~mask)


def commit(staging: Path, target: Path) -> None:
    """Atomically make `staging` the `target` directory (replacing an existing one)."""
    target = Path(target).absolute()
    _apply_umask(staging)
    backup = None
    if target.exists():
        backup = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        os.replace(target, backup / "previous")
    try:
        os.replace(staging, target)
    except OSError:
        if backup is not None:
            os.replace(backup / "previous", target)
            shutil.rmtree(backup, ignore_errors=True)
        raise
    fsync_dir(target.parent)
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)


def discard(staging: Path) -> None:
    shutil.rmtree(staging, ignore_errors=True)
