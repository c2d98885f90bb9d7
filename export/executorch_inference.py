"""Inference `.pte` (portable kernels or XNNPACK) with every expert and router tensor in a `.ptd`.

`forward(input_ids[batch, T], logit_positions[P]) -> logits[batch, P, vocab]` with a dynamic
sequence length T in [1, max_seq_len], a dynamic number P of positions to compute logits for
(`prepare.InferenceModule`: the last one for a prefill, all for scoring) and a fixed batch. The
activation arena is planned for T = P = max_seq_len.

Portable: `torch.export` -> `to_edge` -> `to_executorch`. XNNPACK: on the unlifted graph every
expert factor becomes a static per-expert weight of a `linear` (see graph_rewrites), the graph is
re-exported and lowered with the XNNPACK partitioner. Frozen base weights are packed into the
delegate inside the `.pte`; expert and router weights are delegate constants stored in the
`.ptd` under the sha256 of their export-time placeholder bytes, mapped back to parameter slices
in the manifest.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from edge_runtime.artifacts.layout import data_file, program_file
from edge_runtime.artifacts.manifest import KIND_ET_INFERENCE
from export.errors import ExportError
from export.executorch_common import emit, lower
from export.graph_rewrites import (
    drop_noop_expands,
    dynamic_matmuls_to_bmm,
    infer_symbolic_view_dims,
    split_expert_selects,
    transposed_weights_to_linear,
)
from export.prepare import PROGRAM_PREFIX, InferenceModule, canonical_name, inference_example
from export.selection_matmuls import selections_to_linear

Backend = Literal["portable", "xnnpack"]
EXAMPLE_SEQ = 16


def _export(wrapper: nn.Module, batch: int, max_seq_len: int) -> tuple[Any, tuple[torch.Tensor, ...], Any]:
    seq = torch.export.Dim("seq", min=1, max=max_seq_len)
    positions = torch.export.Dim("positions", min=1, max=max_seq_len)
    example = inference_example(batch, min(EXAMPLE_SEQ, max_seq_len))
    dynamic = ({1: seq}, {0: positions})
    return torch.export.export(wrapper, example, dynamic_shapes=dynamic, strict=False), example, dynamic


def export_inference(model: nn.Module, *, fmt: str, backend: Backend, batch: int, max_seq_len: int,
                     export_id: int, placeholders: Mapping[str, torch.Tensor],
                     real_values: Mapping[str, torch.Tensor], staging: Path) -> dict[str, Any]:
    """Export one inference program into `staging`; returns its manifest entry (without hashes)."""
    if max_seq_len < 2:
        raise ExportError(f"--max-seq-len must be at least 2, got {max_seq_len}.")
    started = time.perf_counter()
    wrapper = InferenceModule(model).eval()
    with torch.no_grad():
        ep, example, dynamic = _export(wrapper, batch, max_seq_len)
        rewrites: dict[str, int] = {}
        derived: dict[str, tuple[str, int]] = {}
        if backend == "xnnpack":
            unlifted = ep.module()
            split = split_expert_selects(
                unlifted, lambda fqn: fqn.startswith(PROGRAM_PREFIX) and canonical_name(fqn) in placeholders)
            derived = {canonical_name(new): (canonical_name(old), i) for new, (old, i) in split.items()}
            rewrites = {"expert_slices": len(split), "linear": transposed_weights_to_linear(unlifted),
                        "bmm": dynamic_matmuls_to_bmm(unlifted), "selections": selections_to_linear(unlifted)}
            ep = torch.export.export(unlifted, example, dynamic_shapes=dynamic, strict=False)
        edge = lower(ep, backend, export_id, set(placeholders) | set(derived),
                     edge_passes=[drop_noop_expands, infer_symbolic_view_dims] if backend == "xnnpack" else None)
        program = program_file(fmt)
        data = data_file(fmt, 0)
        emitted = emit(edge, placeholders, staging / program, staging / data, real_values, fmt, derived)
    return {
        "kind": KIND_ET_INFERENCE,
        "backend": backend,
        "files": {"program": program, "data": data},
        "method": "forward",
        "inputs": [{"name": "input_ids", "dtype": "int64", "shape": [batch, "seq"]},
                   {"name": "logit_positions", "dtype": "int64", "shape": ["positions"]}],
        "outputs": [{"name": "logits", "dtype": "float32", "shape": [batch, "positions", "vocab"]}],
        "dims": {"seq": {"min": 1, "max": max_seq_len}, "positions": {"min": 1, "max": max_seq_len}},
        "batch": batch,
        "pluggable": emitted.key_map,
        "memory": {"arena_bytes": emitted.arena_bytes, "buffer_sizes": emitted.buffer_sizes,
                   "program_bytes": emitted.program_bytes, "data_bytes": emitted.data_bytes},
        "graph_rewrites": rewrites,
        "export_seconds": round(time.perf_counter() - started, 2),
    }
