"""Training `.pte`: one joint forward/backward program for on-device CoMiGS training.

`forward(input_ids[b, T], targets[b, T]) -> (loss, logits, gradients..., parameters...)` with
the loss (cross-entropy + lb_weight x load balancing, exactly the eager trainer's objective) as
output 0. Trainable: specialists and routers, and the generalists when asked (a device of a
federation trains its generalists locally too; a device that only personalises does not).
Frozen generalists stay pluggable constants; trainable tensors are mutable weights; both live in
the one `.ptd` next to the program, so new generalists or restored specialists are swapped
without re-exporting. Both phases of bi-level training use this one method with two optimizers
over disjoint parameter groups (two methods in one program would not share weights).

Shapes are static (batch x seq_len): the activation arena, read from the program into the
manifest, is then the exact working memory of a step.

The XNNPACK variant decomposes mm/addmm into bmm so XNNPACK delegates every matmul of the joint
graph (it does not delegate mm with two runtime operands). Its softmax partitioner is left out:
with it the XNNPACK delegate fails on this graph ("pass through arguments") because a
router softmax output is both a delegate output and an input of a later partition; softmax runs
in the portable kernel instead.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from edge_runtime import roles
from edge_runtime.artifacts.layout import data_file, program_file
from edge_runtime.artifacts.manifest import KIND_ET_TRAINING
from export.errors import ExportError
from export.executorch_common import emit, lower
from export.graph_rewrites import (
    CORE_ATEN_FIXES,
    MATMULS_TO_BMM,
    drop_aliases,
    drop_noop_expands,
    sink_inputless_nodes,
    transpose_weights_once,
)
from export.prepare import requires_grad_only
from export.rematerialize import rematerialize_cheap_activations
from export.training_loss import TrainingLossModule

Backend = Literal["portable", "xnnpack"]


def trainable_names(model: nn.Module, train_generalists: bool) -> dict[str, str]:
    """Parameter name -> role of what the training program differentiates."""
    wanted = {roles.Role.SPECIALIST, roles.Role.ROUTER} | ({roles.Role.GENERALIST} if train_generalists else set())
    return {name: roles.role_of(name).value for name, _ in model.named_parameters()
            if roles.role_of(name) in wanted}


def _xnnpack_partitioner() -> Any:
    from executorch.backends.xnnpack.partition.config import ALL_PARTITIONER_CONFIGS, SoftmaxConfig
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner

    return XnnpackPartitioner(configs=[c for c in ALL_PARTITIONER_CONFIGS if c is not SoftmaxConfig])


def training_joint_graph(model: nn.Module, example: tuple[torch.Tensor, torch.Tensor], trainable: Mapping[str, str],
                         loss_chunk: int, backend: Backend, *, rewrite: bool = True) -> Any:
    """The joint forward/backward ExportedProgram that `export_training` lowers, up to (not
    including) the rematerialisation: traced with only `trainable` requiring grad, decomposed
    (matmuls to bmm for XNNPACK) and, with `rewrite`, without alias copies and with each frozen
    weight transposed once. One function, so the tests see the graph the exporter builds."""
    from torch.export.experimental import _export_forward_backward

    with requires_grad_only(model, set(trainable)):
        ep = torch.export.export(TrainingLossModule(model, loss_chunk).eval(), example, strict=False)
        ep = _export_forward_backward(ep)
    table = dict(CORE_ATEN_FIXES)
    if backend == "xnnpack":
        table.update(MATMULS_TO_BMM)
    ep = ep.run_decompositions(table)
    if rewrite:
        drop_aliases(ep)
        transpose_weights_once(ep)
    return ep


def export_training(model: nn.Module, *, fmt: str, backend: Backend, batch: int, seq_len: int,
                    train_generalists: bool, loss_chunk: int, export_id: int, placeholders: Mapping[str, torch.Tensor],
                    real_values: Mapping[str, torch.Tensor], staging: Path) -> dict[str, Any]:
    """Export the joint forward/backward program into `staging`; returns its manifest entry."""
    if batch < 1 or seq_len < 2:
        raise ExportError(f"training batch must be >= 1 and seq_len >= 2, got {batch} x {seq_len}.")
    trainable = trainable_names(model, train_generalists)
    if not trainable:
        raise ExportError("nothing to train: the model has no specialists or routers; export with "
                          "--train-generalists or a layout with specialists (e.g. --experts 1,1).")
    started = time.perf_counter()
    example = (torch.zeros(batch, seq_len, dtype=torch.long), torch.zeros(batch, seq_len, dtype=torch.long))
    ep = training_joint_graph(model, example, trainable, loss_chunk, backend)
    rematerialize_cheap_activations(ep, min_numel=batch * seq_len * model.get_input_embeddings().embedding_dim)
    edge = lower(ep, backend, export_id, set(placeholders),
                 partitioner=_xnnpack_partitioner() if backend == "xnnpack" else None,
                 edge_passes=[drop_noop_expands] if backend == "xnnpack" else None)
    sink_inputless_nodes(edge.exported_program())  # partitioning topo-sorts them to the front
    program = program_file(fmt)
    data = data_file(fmt, 0)
    emitted = emit(edge, placeholders, staging / program, staging / data, real_values, fmt)
    groups = {"experts": sorted(n for n, r in trainable.items() if r != roles.Role.ROUTER.value),
              "router": sorted(n for n, r in trainable.items() if r == roles.Role.ROUTER.value)}
    return {
        "kind": KIND_ET_TRAINING,
        "backend": backend,
        "files": {"program": program, "data": data},
        "method": "forward",
        "inputs": [{"name": "input_ids", "dtype": "int64", "shape": [batch, seq_len]},
                   {"name": "targets", "dtype": "int64", "shape": [batch, seq_len]}],
        "outputs": [{"name": "loss", "dtype": "float32", "shape": []},
                    {"name": "logits", "dtype": "float32", "shape": [batch, seq_len, "vocab"]}],
        "batch": batch,
        "seq_len": seq_len,
        "loss_output": 0,
        "loss_chunk": loss_chunk,
        "trainable": trainable,
        "optimizer_groups": groups,
        "pluggable": emitted.key_map,
        "memory": {"arena_bytes": emitted.arena_bytes, "buffer_sizes": emitted.buffer_sizes,
                   "program_bytes": emitted.program_bytes, "data_bytes": emitted.data_bytes},
        "export_seconds": round(time.perf_counter() - started, 2),
    }
