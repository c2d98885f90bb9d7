"""Edge-graph rewrites of the inference programs: fewer copies, the same values."""

from __future__ import annotations

import torch
from torch import nn

from export.graph_rewrites import drop_noop_expands, infer_symbolic_view_dims


class _Attention(nn.Module):
    """matmul of 4-D operands (decomposes into expand + view + bmm) and a real GQA-style expand."""

    def forward(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores = torch.matmul(q, k.transpose(2, 3))
        repeated = k[:, :, None].expand(1, 2, 3, 5, 4).reshape(1, 6, 5, 4)
        return scores, repeated


def _expands(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    from executorch.exir.dialects._ops import ops as exir_ops

    return [n for n in gm.graph.nodes if n.target == exir_ops.edge.aten.expand_copy.default]


def test_expands_to_the_inputs_own_shape_are_dropped_and_real_ones_kept():
    from executorch.exir import to_edge

    q, k = torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4)
    expected = _Attention()(q, k)
    gm = to_edge(torch.export.export(_Attention(), (q, k))).exported_program().graph_module
    before = _expands(gm)

    result = drop_noop_expands(gm)

    after = _expands(gm)
    assert result.modified
    assert len(after) == 1 < len(before)
    assert list(after[0].meta["val"].shape) == [1, 2, 3, 5, 4]  # the real expand stays
    for got, want in zip(gm(q, k), expected, strict=True):
        assert torch.equal(got, want)


def test_a_graph_without_noop_expands_is_not_modified():
    from executorch.exir import to_edge

    class Plain(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * 2

    gm = to_edge(torch.export.export(Plain(), (torch.randn(3),))).exported_program().graph_module
    assert not drop_noop_expands(gm).modified


class _Heads(nn.Module):
    """HF's head split and merge: views whose target shapes name the dynamic length."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        heads = x.view(b, t, -1, 4).transpose(1, 2) * 2
        return heads.transpose(1, 2).reshape(b, t, -1) + 1


def test_views_with_one_dynamic_dimension_get_integer_shapes_and_join_the_delegate():
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower
    from executorch.exir.dialects._ops import ops as exir_ops

    from edge_runtime.artifacts.executorch_runtime import runtime

    x = torch.randn(1, 6, 16)
    seq = torch.export.Dim("seq", min=2, max=32)
    ep = torch.export.export(_Heads(), (x,), dynamic_shapes=({1: seq},), strict=False)
    lowered = {}
    for passes in ([], [infer_symbolic_view_dims]):
        edge = to_edge_transform_and_lower(ep, transform_passes=passes, partitioner=[XnnpackPartitioner()])
        graph = edge.exported_program().graph
        views = [n for n in graph.nodes if n.target == exir_ops.edge.aten.view_copy.default]
        delegates = [n for n in graph.nodes if "call_delegate" in str(n.target)]
        lowered[len(passes)] = (views, delegates, edge.to_executorch())
    assert lowered[0][0] and len(lowered[0][1]) > 1  # symbolic views stay outside, splitting the graph
    assert not lowered[1][0] and len(lowered[1][1]) == 1
    method = runtime()._load_for_executorch_from_buffer(lowered[1][2].buffer)
    longer = torch.randn(1, 11, 16)
    assert torch.equal(method.forward([longer])[0], _Heads()(longer))
