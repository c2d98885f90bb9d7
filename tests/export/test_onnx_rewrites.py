"""The ONNX graph rewrites that let ONNX Runtime fuse RMSNorm and RoPE: same results, fewer kernels."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from edge_runtime.artifacts import OnnxInference
from export.onnx_rewrites import divide_by_roots, fuse_rotary_embeddings

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


def _rope_graph(lower_end: int = 4) -> onnx.ModelProto:
    """x * cos + cat(-x[..., 4:], x[..., :lower_end]) * sin on (batch, heads, T, 8), with cos and sin
    given as (batch, T, 8) rows of cat(freqs, freqs), slice bounds wrapped as the exporter wraps them."""
    def bound(name: str, value: int) -> list[onnx.NodeProto]:
        return [helper.make_node("Constant", [], [f"{name}_c"], value=numpy_helper.from_array(np.array(value))),
                helper.make_node("Cast", [f"{name}_c"], [f"{name}_i"], to=TensorProto.INT64),
                helper.make_node("Reshape", [f"{name}_i", "one_shape"], [name])]

    nodes = [*bound("zero", 0), *bound("four", 4), *bound("end", 2**62), *bound("lo_end", lower_end),
             *bound("axis", -1),
             helper.make_node("Slice", ["x", "four", "end", "axis"], ["upper"]),
             helper.make_node("Slice", ["x", "zero", "lo_end", "axis"], ["lower"]),
             helper.make_node("Neg", ["upper"], ["neg"]),
             helper.make_node("Concat", ["neg", "lower"], ["rotated"], axis=-1),
             helper.make_node("Unsqueeze", ["cos", "heads_axis"], ["cos_u"]),
             helper.make_node("Unsqueeze", ["sin", "heads_axis"], ["sin_u"]),
             helper.make_node("Mul", ["x", "cos_u"], ["plain"]),
             helper.make_node("Mul", ["rotated", "sin_u"], ["turned"]),
             helper.make_node("Add", ["plain", "turned"], ["y"])]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 5, 8]),
              helper.make_tensor_value_info("cos", TensorProto.FLOAT, [2, 5, 8]),
              helper.make_tensor_value_info("sin", TensorProto.FLOAT, [2, 5, 8])]
    inits = [numpy_helper.from_array(np.array([1], np.int64), "one_shape"),
             numpy_helper.from_array(np.array([1], np.int64), "heads_axis")]
    output = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3, 5, 8])
    graph = helper.make_graph(nodes, "rope", inputs, [output], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    return model


def _rope_inputs() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    freqs = np.outer(np.arange(5), rng.uniform(0.1, 1.0, 4))
    angles = np.concatenate([freqs, freqs], -1)[None].repeat(2, 0)  # the same rows for both batch rows
    return {"x": rng.standard_normal((2, 3, 5, 8)).astype(np.float32),
            "cos": np.cos(angles).astype(np.float32), "sin": np.sin(angles).astype(np.float32)}


def test_a_rope_chain_becomes_one_rotary_embedding_with_the_same_values() -> None:
    model = _rope_graph()
    feeds = _rope_inputs()
    before = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    assert fuse_rotary_embeddings(model) == 1
    onnx.checker.check_model(model)
    ops = Counter(n.op_type for n in model.graph.node)
    assert ops["RotaryEmbedding"] == 1 and ops["Neg"] == ops["Concat"] == ops["Mul"] == 0
    after = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    np.testing.assert_allclose(after, before, rtol=1e-6, atol=1e-6)


def test_a_concatenation_that_is_not_rotate_half_is_left_alone() -> None:
    model = _rope_graph(lower_end=3)  # x[..., :3]: not the other half
    before = model.SerializeToString()
    assert fuse_rotary_embeddings(model) == 0
    assert model.SerializeToString() == before


def test_the_exported_llama_ropes_reach_ort_as_one_kernel_each(llama_export: Exported) -> None:
    manifest = llama_export.manifest
    layers = manifest.data["base_model"]["num_layers"]
    assert manifest.artifact("onnx")["graph_rewrites"]["rotary_embeddings"] == 2 * layers  # q and k per block
    ops = Counter(n.op_type for n in onnx.load(manifest.path("onnx", "model"), load_external_data=False).graph.node)
    assert ops["RotaryEmbedding"] == 2 * layers and ops["Neg"] == 0
