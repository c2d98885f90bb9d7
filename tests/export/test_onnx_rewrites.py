"""The ONNX graph rewrite that lets ONNX Runtime fuse RMSNorm: same results, fewer kernels."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from edge_runtime.artifacts import OnnxInference
from export.onnx_rewrites import divide_by_roots

from tests.export.export_helpers import Exported, eager_logits, max_diff, token_ids


def _rms_norm_graph(extra_consumer: str | None = None) -> onnx.ModelProto:
    """x * Reciprocal(Sqrt(mean(x^2) + eps)) * w, as the dynamo exporter writes an RMSNorm."""
    nodes = [
        helper.make_node("Pow", ["x", "two"], ["sq"]),
        helper.make_node("ReduceMean", ["sq", "axes"], ["mean"], keepdims=1),
        helper.make_node("Add", ["mean", "eps"], ["var"]),
        helper.make_node("Sqrt", ["var"], ["root"]),
        helper.make_node("Reciprocal", ["root"], ["inv"]),
        helper.make_node("Mul", ["x", "inv"], ["normed"]),
        helper.make_node("Mul", ["w", "normed"], ["y"]),
    ]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 8])]
    if extra_consumer:
        nodes.append(helper.make_node(extra_consumer, ["inv"], ["other"]))
        outputs.append(helper.make_tensor_value_info("other", TensorProto.FLOAT, [3, 1]))
    inits = [numpy_helper.from_array(np.array(2.0, np.float32), "two"),
             numpy_helper.from_array(np.array([-1], np.int64), "axes"),
             numpy_helper.from_array(np.array(1e-5, np.float32), "eps"),
             numpy_helper.from_array(np.linspace(0.5, 1.5, 8, dtype=np.float32), "w")]
    graph = helper.make_graph(nodes, "rms", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 8])],
                              outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    return model


def _run(model: onnx.ModelProto, x: np.ndarray, optimized: Path | None = None) -> list[np.ndarray]:
    options = ort.SessionOptions()
    if optimized is not None:
        options.optimized_model_filepath = str(optimized)
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})


def test_the_reciprocal_becomes_a_division_with_the_same_values_and_ort_fuses_the_norm(tmp_path: Path) -> None:
    model = _rms_norm_graph()
    x = np.random.default_rng(0).standard_normal((3, 8)).astype(np.float32)
    (before,) = _run(model, x)
    assert divide_by_roots(model) == 1
    onnx.checker.check_model(model)
    assert Counter(n.op_type for n in model.graph.node)["Reciprocal"] == 0
    (after,) = _run(model, x, tmp_path / "opt.onnx")
    np.testing.assert_allclose(after, before, rtol=1e-6, atol=1e-6)
    fused = Counter(n.op_type for n in onnx.load(tmp_path / "opt.onnx").graph.node)
    assert fused["SimplifiedLayerNormalization"] == 1 and fused["Pow"] == 0


@pytest.mark.parametrize("other", ["Neg", "Identity"])
def test_a_reciprocal_with_another_consumer_is_left_alone(other: str) -> None:
    model = _rms_norm_graph(extra_consumer=other)
    before = model.SerializeToString()
    assert divide_by_roots(model) == 0
    assert model.SerializeToString() == before


def test_the_exported_llama_norms_reach_ort_as_one_kernel_each(llama_export: Exported, tmp_path: Path) -> None:
    manifest = llama_export.manifest
    entry = manifest.artifact("onnx")
    layers = manifest.data["base_model"]["num_layers"]
    assert entry["graph_rewrites"]["divide_by_roots"] == 2 * layers + 1  # two per block and the final norm
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(str(manifest.path("onnx", "model")), options, providers=["CPUExecutionProvider"])
    ops = Counter(n.op_type for n in onnx.load(tmp_path / "opt.onnx", load_external_data=False).graph.node)
    assert ops["SimplifiedLayerNormalization"] == 2 * layers + 1 and ops["Reciprocal"] == 0
    ids = token_ids((2, 7), 3)
    with OnnxInference(llama_export.directory) as session:
        assert max_diff(session.logits(ids), eager_logits(llama_export.eager(), ids)) <= 1e-4
