"""Session-wide exports of tiny random Llama and GPT-2 CoMiGS models, shared by the export tests.

Exporting (above all XNNPACK lowering) is the slow part, so each architecture is exported once,
both at the same time in two worker processes (the lowering is single-threaded Python); tests
that change artifacts work on a copy (`artifact_copy`). See `SESSION_EXPORTS` for what each
architecture covers.
"""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from edge_runtime.artifacts import Manifest

from tests.export.export_helpers import SESSION_EXPORTS, Exported

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def session_exports(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Exported]:
    root = tmp_path_factory.mktemp("exports")
    workers = {}
    for arch in SESSION_EXPORTS:
        log = open(root / f"{arch}.log", "w")
        workers[arch] = (subprocess.Popen([sys.executable, "-m", "tests.export.export_helpers", arch,
                                           str(root / arch)], cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT,
                                          env={**os.environ, "PYTHONWARNINGS": "ignore"}), log)
    exports = {}
    for arch, (process, log) in workers.items():
        code = process.wait()
        log.close()
        if code != 0:
            pytest.fail(f"exporting the tiny {arch} model failed:\n{(root / f'{arch}.log').read_text()[-4000:]}")
        backend, generalists = SESSION_EXPORTS[arch]
        exports[arch] = Exported(arch, root / arch, backend, generalists, Manifest.load(root / arch))
    return exports


@pytest.fixture(scope="session")
def llama_export(session_exports: dict[str, Exported]) -> Exported:
    return session_exports["llama"]


@pytest.fixture(scope="session")
def gpt2_export(session_exports: dict[str, Exported]) -> Exported:
    return session_exports["gpt2"]


@pytest.fixture(params=list(SESSION_EXPORTS))
def exported(request: pytest.FixtureRequest) -> Exported:
    return request.getfixturevalue(f"{request.param}_export")


@pytest.fixture
def artifact_copy(tmp_path: Path) -> Callable[[Exported], Path]:
    """A private copy of an export directory, for tests that modify artifacts."""
    copies = itertools.count()

    def copy(exported: Exported) -> Path:
        target = tmp_path / f"{exported.arch}-copy-{next(copies)}"
        shutil.copytree(exported.directory, target)
        return target

    return copy
