"""The memory fixes around ExecuTorch lowering: same answers as the originals, without hoarding memory."""

from __future__ import annotations

import contextlib

import torch
from torch import fx

from export.compact_partitioning import CompactDependencyViewer, compact_dependency_viewers
from export.fx_source_cache import source_cache_disabled


def _graph() -> fx.GraphModule:
    def f(x, y):
        a = torch.relu(x) + y
        b = a * 2
        c = torch.sin(x) - b
        return c + a, b.sum()

    return fx.symbolic_trace(f)


def test_compact_viewer_answers_like_the_originals():
    from executorch.exir.backend.canonical_partitioners.group_partitioner import _DependencyViewer as ExecuTorchViewer
    from torch.fx.passes.infra.partitioner import _DependencyViewer as TorchViewer

    gm = _graph()
    compact, torch_viewer, et_viewer = CompactDependencyViewer(gm), TorchViewer(gm), ExecuTorchViewer(gm)
    for node in gm.graph.nodes:
        down = set(compact.downstreams_of(node))
        assert down == torch_viewer.downstreams_of(node) == et_viewer.downstreams_of(node), node
        assert set(compact.upstreams_of(node)) == et_viewer.upstreams_of(node), node
        assert len(compact.downstreams_of(node)) == len(down)
        for other in gm.graph.nodes:
            assert (other in compact.downstreams_of(node)) == (other in down)
    assert list(compact.downstreams_of(next(iter(gm.graph.nodes))))  # in topological order, non-empty


def test_viewers_are_swapped_only_inside_the_block():
    from executorch.exir.backend.canonical_partitioners import group_partitioner
    from torch.fx.passes.infra import partitioner

    before = (partitioner._DependencyViewer, group_partitioner._DependencyViewer)
    with compact_dependency_viewers():
        assert partitioner._DependencyViewer is CompactDependencyViewer
        assert group_partitioner._DependencyViewer is CompactDependencyViewer
    assert (partitioner._DependencyViewer, group_partitioner._DependencyViewer) == before


def test_generated_source_is_not_kept():
    from torch.fx import graph_module

    gm = _graph()
    with source_cache_disabled():
        size = len(graph_module._loader.eval_cache)
        for _ in range(3):
            gm.recompile()
        assert len(graph_module._loader.eval_cache) == size
    gm.recompile()
    assert len(graph_module._loader.eval_cache) == size + 1
    x, y = torch.randn(3), torch.randn(3)
    torch.testing.assert_close(gm(x, y)[1], (2 * (torch.relu(x) + y)).sum())


def _lowered_graph(fast: bool) -> str:
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    from tests.builders import tiny_comigs

    model = tiny_comigs("llama", n_generalists=1, n_specialists=3)
    for layer in model.modules():
        if hasattr(layer, "force_dense"):
            layer.force_dense = True
    ids = torch.zeros(1, 8, dtype=torch.long)
    program = torch.export.export(model, (), {"input_ids": ids, "use_cache": False}, strict=False)
    context = compact_dependency_viewers() if fast else contextlib.nullcontext()
    with context:
        lowered = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()])
    return str(lowered.exported_program().graph)


def test_fast_merge_check_partitions_like_the_original():
    from executorch.exir.backend.canonical_partitioners.group_partitioner import GroupBasedPartitioner

    original = GroupBasedPartitioner._can_merge_partitions
    fast_graph = _lowered_graph(fast=True)
    assert GroupBasedPartitioner._can_merge_partitions is original, "restored after the block"
    assert fast_graph == _lowered_graph(fast=False)
    assert "executorch_call_delegate" in fast_graph
