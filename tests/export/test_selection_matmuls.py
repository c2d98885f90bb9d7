"""Last-axis slices and means of dynamic-length tensors become matmuls XNNPACK can run."""

from __future__ import annotations

import torch
from torch import nn

from export.selection_matmuls import selections_to_linear

aten = torch.ops.aten


class _RopeNormGates(nn.Module):
    def forward(self, q: torch.Tensor, gates: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
        rotated = torch.cat((-q[..., q.shape[-1] // 2:], q[..., : q.shape[-1] // 2]), dim=-1)
        norm = q * torch.rsqrt(q.pow(2).mean(-1, keepdim=True) + 1e-6)
        static = gates[:2, 0:1]  # static shape: XNNPACK slices it itself
        other_axis = q[:, :1]  # not the last axis
        return rotated, norm, gates[:, 1:2] * 2, static, other_axis, ids[..., :1]


def _export(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> torch.fx.GraphModule:
    seq = torch.export.Dim("seq", min=2, max=64)
    dynamic = ({2: seq}, {0: seq}, {1: seq})
    return torch.export.export(module, inputs, dynamic_shapes=dynamic, strict=False).module()


def _count(gm: torch.fx.GraphModule, target) -> int:
    return sum(1 for n in gm.graph.nodes if n.target == target)


def test_dynamic_last_axis_slices_and_means_become_linear_with_the_same_values():
    inputs = (torch.randn(1, 3, 10, 8), torch.softmax(torch.randn(10, 2), -1), torch.arange(20).reshape(2, 10))
    gm = _export(_RopeNormGates(), inputs)
    expected = gm(*inputs)
    slices, means = _count(gm, aten.slice.Tensor), _count(gm, aten.mean.dim)

    rewritten = selections_to_linear(gm)

    # two rotate_half slices, one gate column and one mean; the static slice, the slice of another
    # axis and the integer slice stay
    assert rewritten == 4
    assert _count(gm, aten.mean.dim) == means - 1 == 0
    assert _count(gm, aten.slice.Tensor) == slices - 3
    longer = (torch.randn(1, 3, 17, 8), torch.softmax(torch.randn(17, 2), -1), torch.arange(34).reshape(2, 17))
    for got, want in zip(gm(*inputs), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    reexported = _export(gm, longer)  # still traceable with a dynamic length
    for got, want in zip(reexported(*longer), _RopeNormGates()(*longer), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_selections_are_exact():
    inputs = (torch.randn(1, 3, 10, 8), torch.softmax(torch.randn(10, 2), -1), torch.arange(20).reshape(2, 10))
    gm = _export(_RopeNormGates(), inputs)
    expected = gm(*inputs)
    selections_to_linear(gm)
    got = gm(*inputs)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[2], expected[2])


def test_lowered_to_xnnpack_the_rewritten_graph_runs_in_executorch():
    """Also a regression test: selection weights that are views into a larger identity were
    serialised from the start of their storage (all offset slices then read the first rows)."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    from edge_runtime.artifacts.executorch_runtime import runtime

    inputs = (torch.randn(1, 3, 10, 8), torch.softmax(torch.randn(10, 2), -1), torch.arange(20).reshape(2, 10))
    gm = _export(_RopeNormGates(), inputs)
    selections_to_linear(gm)
    seq = torch.export.Dim("seq", min=2, max=64)
    ep = torch.export.export(gm, inputs, dynamic_shapes=({2: seq}, {0: seq}, {1: seq}), strict=False)
    program = to_edge_transform_and_lower(ep, partitioner=[XnnpackPartitioner()]).to_executorch()
    method = runtime()._load_for_executorch_from_buffer(program.buffer)
    shorter = (torch.randn(1, 3, 7, 8), torch.softmax(torch.randn(7, 2), -1), torch.arange(14).reshape(2, 7))
    for got, want in zip(method.forward(list(shorter)), _RopeNormGates()(*shorter), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
