"""ONNX inference model with the experts in their own external-data file.

`torch.onnx.export(..., dynamo=True, optimize=False)`: the dynamo exporter is exact for any
depth (the legacy one is wrong for >= 2 layers) and, without the optimizer, keeps every
parameter as an initializer named by its FQN (the optimizer folds transposes into renamed
constants, which would make experts unswappable). Inputs `input_ids[batch, seq]` int64, output
`logits[batch, seq, vocab]`, both dimensions dynamic.

Layout written here:
    model.gNNNN.onnx            graph only (every parameter external), small; rewritten by a swap
    model.base.bin              frozen base weights, never rewritten
    model.gNNNN.experts.bin     every generalist/specialist/router initializer, 64-byte aligned

Swapping experts at load time without touching files works with
`SessionOptions.add_initializer(name, OrtValue)` *only* when ORT's ConstantFolding optimizer
is disabled; otherwise ORT folds e.g. `Transpose(B)` with the file's value and silently ignores
the override. `edge_runtime.artifacts.OnnxInference` does exactly that.

The mixture of experts is traced in its batched form (`export.prepare.stack_experts`: a few
wide kernels per layer instead of a dozen rank-r ones per expert, which ORT runs faster), and the
graph gets two rewrites before it is written (`onnx_rewrites`): RMSNorm's `x * Reciprocal(Sqrt(v))`
becomes `x / Sqrt(v)`, the form ORT fuses into one kernel, and each RoPE chain becomes ORT's
`com.microsoft.RotaryEmbedding` kernel (so the file needs ONNX Runtime).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edge_runtime.artifacts import ptd
from edge_runtime.artifacts.layout import data_file, onnx_base_data_file, onnx_model_file
from edge_runtime.artifacts.manifest import FORMAT_VERSION, KIND_ONNX, ONNX_EXPORT_ID_KEY, ONNX_FORMAT_VERSION_KEY
from export.errors import ExportError
from export.onnx_rewrites import divide_by_roots, fuse_rotary_embeddings
from export.prepare import PROGRAM_PREFIX, InferenceModule, inference_example, stack_experts

ALIGNMENT = 64
EXAMPLE_SHAPE = (2, 16)  # batch 2: an example batch of 1 would specialise the batch dimension to 1
MIN_EXTERNAL_BYTES = 1024  # tiny frozen tensors stay inline


def _write_external(tensors: list[Any], path: Path, payloads: Mapping[str, bytes]) -> None:
    from onnx.external_data_helper import set_external_data

    offset = 0
    with open(path, "wb") as f:
        for tensor in tensors:
            data = payloads[tensor.name]
            pad = (-offset) % ALIGNMENT
            f.write(b"\0" * pad)
            offset += pad
            f.write(data)
            set_external_data(tensor, location=path.name, offset=offset, length=len(data))
            tensor.ClearField("raw_data")
            tensor.data_location = tensor.EXTERNAL
            offset += len(data)


def export_onnx(model: nn.Module, *, fmt: str, max_batch: int, max_seq_len: int, export_id: int,
                placeholders: Mapping[str, torch.Tensor], real_values: Mapping[str, torch.Tensor],
                staging: Path) -> dict[str, Any]:
    """Export the ONNX model into `staging`; returns its manifest entry (without hashes)."""
    import onnx
    from onnx import numpy_helper

    started = time.perf_counter()
    wrapper = InferenceModule(model).eval()
    batch_dim = torch.export.Dim("batch", min=1, max=max_batch)
    seq_dim = torch.export.Dim("seq", min=1, max=max_seq_len)
    positions_dim = torch.export.Dim("positions", min=1, max=max_seq_len)
    example = inference_example(*EXAMPLE_SHAPE)
    with torch.no_grad(), stack_experts(model):
        program = torch.onnx.export(wrapper, example, None, dynamo=True, optimize=False, verbose=False,
                                    dynamic_shapes=({0: batch_dim, 1: seq_dim}, {0: positions_dim}),
                                    input_names=["input_ids", "logit_positions"], output_names=["logits"])
    proto = program.model_proto
    del program
    divided = divide_by_roots(proto)  # lets ORT fuse each RMSNorm into one kernel
    rotary = fuse_rotary_embeddings(proto)  # one ORT kernel per RoPE instead of seven
    params = {PROGRAM_PREFIX + n: p for n, p in model.named_parameters()}
    params.update({PROGRAM_PREFIX + n: b for n, b in model.named_buffers()})
    expert_inits, base_inits = [], []
    payloads: dict[str, bytes] = {}
    found: dict[str, list[dict[str, str]]] = {name: [] for name in placeholders}
    for tensor in proto.graph.initializer:
        name = tensor.name.removeprefix(PROGRAM_PREFIX) if tensor.name.startswith(PROGRAM_PREFIX) else None
        if name in placeholders:
            if tuple(tensor.dims) != tuple(placeholders[name].shape) or tensor.data_type != onnx.TensorProto.FLOAT:
                raise ExportError(f"onnx: initializer {tensor.name} has shape {tuple(tensor.dims)} / type "
                                  f"{tensor.data_type}, expected float32 {tuple(placeholders[name].shape)}.")
            expert_inits.append(tensor)
            payloads[tensor.name] = ptd.tensor_bytes(real_values[name])
            found[name].append({"key": tensor.name})
        elif tensor.name in params:
            # raw_data is already the little-endian bytes ONNX external data holds (no copy)
            data = tensor.raw_data if tensor.HasField("raw_data") else numpy_helper.to_array(tensor).tobytes()
            if len(data) >= MIN_EXTERNAL_BYTES:
                base_inits.append(tensor)
                payloads[tensor.name] = data
    missing = [n for n, inits in found.items() if not inits]
    if missing:
        raise ExportError(f"onnx: {len(missing)} pluggable tensors (first: {missing[0]}) are not initializers of "
                          "the exported graph; they could not be swapped.")
    model_name, base_name, data_name = onnx_model_file(0), onnx_base_data_file(), data_file(fmt, 0)
    _write_external(base_inits, staging / base_name, payloads)
    _write_external(expert_inits, staging / data_name, payloads)
    del proto.metadata_props[:]
    for key, value in ((ONNX_FORMAT_VERSION_KEY, FORMAT_VERSION), (ONNX_EXPORT_ID_KEY, export_id)):
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, str(value)
    onnx.save_model(proto, staging / model_name)
    onnx.checker.check_model(str(staging / model_name))
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    return {
        "kind": KIND_ONNX,
        "files": {"model": model_name, "base_data": base_name, "data": data_name},
        "inputs": [{"name": "input_ids", "dtype": "int64", "shape": ["batch", "seq"]},
                   {"name": "logit_positions", "dtype": "int64", "shape": ["positions"]}],
        "outputs": [{"name": "logits", "dtype": "float32", "shape": ["batch", "positions", "vocab"]}],
        "dims": {"batch": {"min": 1, "max": max_batch}, "seq": {"min": 1, "max": max_seq_len},
                 "positions": {"min": 1, "max": max_seq_len}},
        "opset": opset,
        "graph_rewrites": {"divide_by_roots": divided, "rotary_embeddings": rotary},
        "pluggable": found,
        "session_options": {"disabled_optimizers": ["ConstantFolding"],
                            "why": "add_initializer overrides are ignored where ConstantFolding folded the "
                                   "initializer"},
        "export_seconds": round(time.perf_counter() - started, 2),
    }
