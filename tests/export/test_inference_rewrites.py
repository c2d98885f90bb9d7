"""Edge-graph rewrites of the inference programs: fewer copies, the same values."""

from __future__ import annotations

import torch
from torch import nn

from export.graph_rewrites import drop_noop_expands


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
