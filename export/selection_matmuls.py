"""Last-axis slices and means of dynamic-length tensors as matmuls XNNPACK can run.

ExecuTorch's XNNPACK partitioner delegates `slice_copy` only for static shapes and `mean.dim` only
as 4-D global pooling, so in an inference program with a dynamic sequence length RoPE's
`rotate_half` (two slices of q and of k per block), RMSNorm's mean of squares (two per block) and
the per-expert gate columns (`gates[:, e:e+1]`) ran as portable, single-threaded kernels. Worse,
each one cut the block's XNNPACK graph in pieces: SmolLM2's prefill made 393 delegate calls, 13 per
block (ETDump: ~5 ms of delegate overhead and ~5 ms of portable kernels in a ~207 ms prefill).

Along a static last axis of size d both are linear maps, so on the unlifted graph (before
re-export and lowering) they become `linear` with a constant weight, which XNNPACK packs once:

    x[..., a:b]          = linear(x, S)    S = rows a..b-1 of the d x d identity
    x.mean(-1, keepdim)  = linear(x, 1) / d

A selection matmul is exact (each output is one input times 1 plus zeros; an infinite input
elsewhere in the row would turn into NaN, which finite activations never meet); the mean becomes
a sum in the GEMM's order, within float32 rounding of the portable kernel's.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import fx

from export.graph_rewrites import node_value

aten = torch.ops.aten
PREFIX = "_selection_"


def _dynamic_float_last_axis(node: Any, dim: Any) -> int | None:
    """The static size of `node`'s last axis when `dim` is that axis, the tensor float32 and some
    other axis dynamic; otherwise None (XNNPACK handles the static case itself)."""
    value = node_value(node)
    if value is None or value.dtype != torch.float32 or not isinstance(dim, int):
        return None
    if dim % value.dim() != value.dim() - 1:
        return None
    *leading, last = value.shape
    if not isinstance(last, int) or all(isinstance(d, int) for d in leading):
        return None
    return last


def _constant(gm: fx.GraphModule, tensor: torch.Tensor) -> fx.Node:
    name = f"{PREFIX}{sum(1 for n, _ in gm.named_buffers() if n.startswith(PREFIX))}"
    gm.register_buffer(name, tensor)
    return gm.graph.get_attr(name)


def _slice(gm: fx.GraphModule, node: fx.Node) -> fx.Node | None:
    if node.kwargs:
        return None
    x, *given = node.args
    dim, start, end, step = (*given, *(0, None, None, 1)[len(given):])  # slice.Tensor's defaults
    size = _dynamic_float_last_axis(x, dim)
    if size is None or step != 1 or not all(isinstance(v, int) or v is None for v in (start, end)):
        return None
    rows = range(size)[slice(start, end)]
    if len(rows) == 0 or len(rows) == size:
        return None
    # clone, not contiguous(): a row slice of eye is already contiguous but starts at an offset into
    # eye's storage, and ExecuTorch serialises constants from the start of their storage
    selection = torch.eye(size)[rows.start:rows.stop].clone()
    with gm.graph.inserting_before(node):
        return gm.graph.call_function(aten.linear.default, (x, _constant(gm, selection)))


def _mean(gm: fx.GraphModule, node: fx.Node) -> fx.Node | None:
    x, dims = node.args[0], node.args[1]
    keepdim = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
    if node.kwargs.get("dtype") is not None or not keepdim or not isinstance(dims, list | tuple) or len(dims) != 1:
        return None
    size = _dynamic_float_last_axis(x, dims[0])
    if size is None:
        return None
    with gm.graph.inserting_before(node):
        total = gm.graph.call_function(aten.linear.default, (x, _constant(gm, torch.ones(1, size))))
        return gm.graph.call_function(aten.div.Tensor, (total, float(size)))


def selections_to_linear(gm: fx.GraphModule) -> int:
    """Rewrite last-axis `slice` and keep-dim `mean` of dynamic float32 tensors in an *unlifted*
    graph (`ExportedProgram.module()`) as `linear` with constant weights. Returns how many."""
    rewritten = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function":
            continue
        if node.target == aten.slice.Tensor:
            out = _slice(gm, node)
        elif node.target == aten.mean.dim:
            out = _mean(gm, node)
        else:
            continue
        if out is not None:
            out.meta = dict(node.meta)
            node.replace_all_uses_with(out)
            gm.graph.erase_node(node)
            rewritten += 1
    gm.graph.lint()
    gm.recompile()
    return rewritten
