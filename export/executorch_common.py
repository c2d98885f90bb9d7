"""From an edge program to `.pte` + `.ptd`: pluggable tensors outside, identity inside.

Shared by the inference and training exporters:
- every pluggable parameter is tagged so it lands in one `.ptd` data file (one data file per
  program, because the Python runtime accepts one `data_path`): non-delegated constants via
  `ExecutorchBackendConfig(external_constants=...)` (key = FQN), constants consumed by the
  XNNPACK delegate via the `delegate_constant_tag` node metadata (key = sha256 of the bytes);
- the program gets two constant methods carrying the manifest format version and the export
  id, so a loader can refuse a program that does not belong to the manifest next to it;
- the activation arena (`non_const_buffer_sizes` of the method's memory plan) is read back:
  it is fixed at export time and is what a device must have free to run the program.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from edge_runtime.artifacts import ptd
from edge_runtime.artifacts.manifest import ET_EXPORT_ID_METHOD, ET_FORMAT_VERSION_METHOD, FORMAT_VERSION
from export.errors import ExportError
from export.pluggable import ptd_key_map
from export.prepare import PROGRAM_PREFIX

DATA_TAG = "comigs_experts"


def identity_methods(export_id: int) -> dict[str, Any]:
    return {ET_FORMAT_VERSION_METHOD: FORMAT_VERSION, ET_EXPORT_ID_METHOD: export_id}


def lower(ep: Any, backend: str, export_id: int, pluggable: set[str], partitioner: Any = None,
          edge_passes: list[Any] | None = None) -> Any:
    """An exported program -> an ExecuTorch edge program: delegated to XNNPACK (with the pluggable
    tensors tagged to stay in the data file, `edge_passes` run on the edge graph before
    partitioning) or left on portable kernels."""
    from executorch.exir import to_edge, to_edge_transform_and_lower

    if backend == "xnnpack":
        if partitioner is None:
            from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner

            partitioner = XnnpackPartitioner()
        tag_delegate_constants(ep, pluggable)
        return to_edge_transform_and_lower(ep, transform_passes=edge_passes, partitioner=[partitioner],
                                           constant_methods=identity_methods(export_id))
    if backend == "portable":
        return to_edge(ep, constant_methods=identity_methods(export_id))
    raise ExportError(f"unknown ExecuTorch backend {backend!r}; use 'portable' or 'xnnpack'.")


def _placeholder_fqns(ep: Any) -> dict[str, str]:
    signature = ep.graph_signature
    return {**signature.inputs_to_parameters, **signature.inputs_to_buffers}


def tag_delegate_constants(ep: Any, pluggable: set[str] | Mapping[str, Any]) -> int:
    """Mark pluggable placeholders so a delegate that consumes them writes them to the data file."""
    fqns = _placeholder_fqns(ep)
    tagged = 0
    for node in ep.graph.nodes:
        if node.op == "placeholder" and fqns.get(node.name, "").removeprefix(PROGRAM_PREFIX) in pluggable:
            node.meta.setdefault("custom", {})["delegate_constant_tag"] = DATA_TAG
            tagged += 1
    return tagged


@dataclasses.dataclass(frozen=True)
class EmittedProgram:
    program_bytes: int
    data_bytes: int
    arena_bytes: int
    buffer_sizes: list[int]
    key_map: dict[str, list[str]]


def emit(edge: Any, pluggable: Mapping[str, torch.Tensor], program_path: Path, data_path: Path,
         real_values: Mapping[str, torch.Tensor], artifact: str,
         derived: Mapping[str, tuple[str, int]] | None = None) -> EmittedProgram:
    """Write the program and its data file; the data file is written with the export-time
    placeholders and then patched with `real_values`. `pluggable` maps parameter name ->
    placeholder value the program was traced with; `derived` maps per-expert tensors split off a
    stacked parameter (model names) to (parameter, index)."""
    from executorch.exir import ExecutorchBackendConfig

    fqns = _placeholder_fqns(edge.exported_program())
    names = set(pluggable) | set(derived or {})

    def tag(node: Any) -> str | None:
        return DATA_TAG if fqns.get(node.name, "").removeprefix(PROGRAM_PREFIX) in names else None

    et = edge.to_executorch(ExecutorchBackendConfig(external_constants=tag))
    with open(program_path, "wb") as f:
        et.write_to_file(f)
    with tempfile.TemporaryDirectory(dir=program_path.parent, prefix=".ptd-") as tmp:
        et.write_tensor_data_to_file(tmp)
        written = sorted(os.listdir(tmp))
        if written != [f"{DATA_TAG}.ptd"]:
            raise ExportError(f"{artifact}: expected one data file {DATA_TAG}.ptd, the exporter wrote {written}.")
        os.replace(Path(tmp) / written[0], data_path)
    data, index = ptd.read_file(data_path)
    key_map = ptd_key_map(index, pluggable, artifact, derived)
    values = {ref["key"]: ptd.ref_bytes(real_values[name], ref) for name, refs in key_map.items() for ref in refs}
    data_path.write_bytes(ptd.patch(data, index, values, str(data_path)))
    plan = next((p for p in et.executorch_program.execution_plan if p.name == "forward"), None)
    if plan is None:
        raise ExportError(f"{artifact}: the program has no 'forward' method.")
    sizes = [int(s) for s in plan.non_const_buffer_sizes]
    return EmittedProgram(program_bytes=program_path.stat().st_size, data_bytes=data_path.stat().st_size,
                          arena_bytes=sum(sizes), buffer_sizes=sizes, key_map=key_map)
