"""The ONNX export traces the mixture with all experts batched: its kernel count does not grow with
the number of experts, and ONNX Runtime still gives eager's logits."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import onnx

from edge_runtime.artifacts import OnnxInference
from export.pipeline import ExportOptions, export_artifacts

from tests.builders import randomize_experts, tiny_comigs
from tests.export.export_helpers import MAX_SEQ_LEN, eager_logits, max_diff, token_ids

MATMULS = ("MatMul", "Gemm")


def test_matmul_count_is_independent_of_the_number_of_experts(tmp_path: Path) -> None:
    """Llama layout (two input maps); GPT-2's one-map form is covered by tests/test_model.py."""
    counts = {}
    for n_specialists in (1, 7):
        model = tiny_comigs("llama", seed=0, n_generalists=1, n_specialists=n_specialists)
        randomize_experts(model, seed=3)
        out = tmp_path / f"s{n_specialists}"
        manifest = export_artifacts(model, out, ExportOptions(formats=("onnx",), max_seq_len=MAX_SEQ_LEN,
                                                              onnx_max_batch=2, verify=False), source="tests")
        graph = onnx.load(manifest.path("onnx", "model"), load_external_data=False).graph
        counts[n_specialists] = Counter(n.op_type for n in graph.node if n.op_type in MATMULS)
        ids = token_ids((2, 9), seed=5)
        with OnnxInference(out) as session:
            assert max_diff(session.logits(ids), eager_logits(model, ids)) <= 1e-4
        for layer in model.modules():  # the export's batched form is switched off again afterwards
            assert getattr(layer, "stack_experts", False) is False
    assert counts[1] == counts[7], counts
