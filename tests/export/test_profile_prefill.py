"""`benchmarks/profile_prefill.py` profiles a real exported prefill in both runtimes."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "profile_prefill.py"
_SPEC = importlib.util.spec_from_file_location("profile_prefill", _PATH)
profile_prefill = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(profile_prefill)


def test_both_runtimes_report_their_matmuls(llama_export, tmp_path: Path) -> None:
    out = tmp_path / "profile.json"
    assert profile_prefill.main(["--artifacts", str(llama_export.directory), "--tokens", "8", "--runs", "2",
                                 "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    executorch, onnxruntime = result["executorch"], result["onnxruntime"]
    assert executorch["execute_ms"] > 0 and onnxruntime["execute_ms"] > 0
    assert any(row["op"].startswith("Fully Connected") for row in executorch["ops"])
    assert {"Gemm", "MatMul"} & {row["op"] for row in onnxruntime["ops"]}
    for table in (executorch["ops"], onnxruntime["ops"]):
        assert all(row["ms"] >= 0 and row["count"] >= 1 for row in table)


def test_a_directory_without_a_manifest_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        profile_prefill.main(["--artifacts", str(tmp_path)])
