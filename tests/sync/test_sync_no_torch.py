"""The coordinator and the sync client never import torch (checked in a fresh interpreter)."""

from __future__ import annotations

import subprocess
import sys

from .sync_helpers import REPO_ROOT

CODE = """
import pkgutil, sys, importlib
import sync_service
for info in pkgutil.walk_packages(sync_service.__path__, "sync_service."):
    if info.name.endswith(".__main__"):
        continue
    importlib.import_module(info.name)
import edge_runtime.sync_client
from sync_service.cli import main
try:
    main(["serve", "--help"])
except SystemExit:
    pass
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers", "executorch"))
print("HEAVY", heavy)
assert not heavy, heavy
"""


def test_sync_service_and_client_import_no_torch() -> None:
    result = subprocess.run(
        [sys.executable, "-c", CODE], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "HEAVY []" in result.stdout
