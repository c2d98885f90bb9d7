"""The ONNX export traces the mixture with all experts batched: its kernel count does not grow with
the number of experts, and ONNX Runtime still gives eager's logits."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import onnx

from edge_runtime.artifacts import Manifest, OnnxInference
from export.pipeline import ExportOptions, export_artifacts

from tests.builders import randomize_experts, tiny_comigs
from tests.export.export_helpers import MAX_SEQ_LEN, Exported, eager_logits, max_diff, token_ids


def _matmul_kernels(manifest: Manifest) -> Counter[str]:
    graph = onnx.load(manifest.path("onnx", "model"), load_external_data=False).graph
    return Counter(n.op_type for n in graph.node if n.op_type in ("MatMul", "Gemm"))


def test_matmul_count_is_independent_of_the_number_of_experts(llama_export: Exported, tmp_path: Path) -> None:
    """The session's tiny Llama has 1G1S; the same model with 1G7S has as many matmul nodes (GPT-2's
    one-map form of the mixture is checked against the loop in tests/test_model.py)."""
    model = tiny_comigs("llama", seed=0, n_generalists=1, n_specialists=7)
    randomize_experts(model, seed=3)
    options = ExportOptions(formats=("onnx",), max_seq_len=MAX_SEQ_LEN, onnx_max_batch=2, verify=False)
    manifest = export_artifacts(model, tmp_path / "1g7s", options, source="tests")
    for layer in model.modules():  # the export's batched form is switched off again afterwards
        assert getattr(layer, "stack_experts", False) is False
    ids = token_ids((2, 9), seed=5)
    with OnnxInference(tmp_path / "1g7s") as session:
        assert max_diff(session.logits(ids), eager_logits(model, ids)) <= 1e-4
    assert _matmul_kernels(manifest) == _matmul_kernels(llama_export.manifest)
