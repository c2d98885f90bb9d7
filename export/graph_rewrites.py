"""Graph rewrites that let XNNPACK run the expert matmuls, and one op ExecuTorch lacks.

XNNPACK's linear/mm/addmm need a *static* weight. Expert factors are selected from stacked
parameters (`A[e]`, a runtime `select`), so every LoRA matmul has two runtime operands and
would fall back to ExecuTorch's portable kernels (about 1 GFLOP/s), splitting the delegate
into many small partitions on the way. So:

- inference (on the unlifted graph, where parameters are `get_attr` nodes):
  `split_expert_selects` turns `select(P, 0, e)` of a pluggable stacked parameter into a
  static per-expert tensor `P__e` (the manifest maps its key back to `P[e]`), and
  `transposed_weights_to_linear` turns `addmm(b, x, t(W))` / `mm(x, t(W))` of such a static
  weight back into `linear`: XNNPACK then packs every expert factor once, like a base weight.
  `dynamic_matmuls_to_bmm` catches whatever matmul still has a runtime weight (XNNPACK delegates
  `bmm` with two runtime operands).
- training: the joint forward/backward graph is core ATen (`mm`, `addmm`) where the trainable
  weights and all gradients are runtime values, so every `mm`/`addmm` is decomposed into `bmm`
  (DESIGN.md §4, measured faster than eager for GPT-2-small).

`aten.empty_permuted` (from the backward of SiLU/GELU) is not in the core ATen opset that
ExecuTorch verifies; it is rewritten as `empty` + `permute`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import fx

aten = torch.ops.aten


def _bmm_2d(graph: fx.Graph, a: fx.Node, b: Any) -> fx.Node:
    a3 = graph.call_function(aten.unsqueeze.default, (a, 0))
    b3 = graph.call_function(aten.unsqueeze.default, (b, 0))
    return graph.call_function(aten.squeeze.dims, (graph.call_function(aten.bmm.default, (a3, b3)), [0]))


SPLIT_SUFFIX = "__"


def split_expert_selects(gm: fx.GraphModule, is_pluggable: Callable[[str], bool]) -> dict[str, tuple[str, int]]:
    """Replace `select(P, 0, e)` of pluggable parameters by new static tensors `P__e`.

    Returns {new parameter FQN: (FQN of P, e)}. The new tensors hold copies of `P[e]`; the
    exporter maps their data-file keys back to slices of P.
    """
    derived: dict[str, tuple[str, int]] = {}
    graph = gm.graph
    for node in list(graph.nodes):
        if not (node.op == "call_function" and node.target == aten.select.int and _is_static(node.args[0])
                and node.args[1] == 0 and is_pluggable(node.args[0].target)):
            continue
        target, index = node.args[0].target, int(node.args[2])
        stacked = gm.get_parameter(target)
        index = index % stacked.shape[0]
        owner_path, _, leaf = target.rpartition(".")
        owner = gm.get_submodule(owner_path)
        new_leaf = f"{leaf}{SPLIT_SUFFIX}{index}"
        if not hasattr(owner, new_leaf):
            owner.register_parameter(new_leaf, torch.nn.Parameter(stacked[index].detach().clone(),
                                                                  requires_grad=False))
        new_fqn = f"{owner_path}.{new_leaf}" if owner_path else new_leaf
        derived[new_fqn] = (target, index)
        with graph.inserting_before(node):
            replacement = graph.get_attr(new_fqn)
        node.replace_all_uses_with(replacement)
        graph.erase_node(node)
    graph.lint()
    gm.recompile()
    return derived


def _transpose_source(node: Any) -> fx.Node | None:
    """X when `node` is a 2-D transpose of X: t(X), transpose(X, 0, 1) or permute(X, [1, 0])."""
    if not isinstance(node, fx.Node) or node.op != "call_function" or _rank(node) != 2:
        return None
    source = node.args[0] if node.args else None
    if not isinstance(source, fx.Node):
        return None
    if node.target == aten.t.default:
        return source
    if node.target == aten.transpose.int and sorted(int(d) % 2 for d in node.args[1:3]) == [0, 1]:
        return source
    if node.target == aten.permute.default and [int(d) % 2 for d in node.args[1]] == [1, 0]:
        return source
    return None


def _transposed_static(node: Any) -> fx.Node | None:
    """W when `node` is a transpose of a static 2-D weight W."""
    source = _transpose_source(node)
    return source if _is_static(source) else None


def transposed_weights_to_linear(gm: fx.GraphModule) -> int:
    """`addmm(b, x, t(W))` -> `b + linear(x, W)` and `mm(x, t(W))` -> `linear(x, W)` for static W."""
    graph = gm.graph
    rewritten = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in (aten.addmm.default, aten.mm.default):
            continue
        if node.target == aten.addmm.default:
            bias, x, mat2 = node.args[:3]
            if node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1:
                continue
        else:
            bias, (x, mat2) = None, node.args
        weight = _transposed_static(mat2)
        if weight is None:
            continue
        with graph.inserting_before(node):
            out = graph.call_function(aten.linear.default, (x, weight))
            if bias is not None:
                out = graph.call_function(aten.add.Tensor, (bias, out))
        node.replace_all_uses_with(out)
        graph.erase_node(node)
        rewritten += 1
    graph.lint()
    gm.recompile()
    return rewritten


def _is_static(node: Any) -> bool:
    return isinstance(node, fx.Node) and node.op == "get_attr"


def node_value(node: Any) -> torch.Tensor | None:
    """The (fake) tensor a graph node computes, as traced into its meta; None for anything else."""
    value = node.meta.get("val") if isinstance(node, fx.Node) else None
    return value if isinstance(value, torch.Tensor) else None


def _rank(node: Any) -> int | None:
    value = node_value(node)
    return None if value is None else value.dim()


def dynamic_matmuls_to_bmm(gm: fx.GraphModule) -> int:
    """Rewrite linear/mm/addmm with a non-parameter weight into bmm, in an *unlifted* graph
    (`ExportedProgram.module()`, where parameters are `get_attr` nodes). Returns how many."""
    graph = gm.graph
    rewritten = 0
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        out: fx.Node | None = None
        if node.target == aten.linear.default:
            x, weight = node.args[0], node.args[1]
            bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
            if _is_static(weight) or _rank(x) != 2:
                continue
            with graph.inserting_before(node):
                out = _bmm_2d(graph, x, graph.call_function(aten.t.default, (weight,)))
                if bias is not None:
                    out = graph.call_function(aten.add.Tensor, (out, bias))
        elif node.target == aten.addmm.default:
            bias, a, b = node.args[:3]
            beta, alpha = node.kwargs.get("beta", 1), node.kwargs.get("alpha", 1)
            if _is_static(b) or beta != 1 or alpha != 1:
                continue
            with graph.inserting_before(node):
                out = graph.call_function(aten.add.Tensor, (bias, _bmm_2d(graph, a, b)))
        elif node.target == aten.mm.default:
            a, b = node.args
            if _is_static(b):
                continue
            with graph.inserting_before(node):
                out = _bmm_2d(graph, a, b)
        if out is not None:
            node.replace_all_uses_with(out)
            graph.erase_node(node)
            rewritten += 1
    graph.lint()
    gm.recompile()
    return rewritten


def transpose_weights_once(ep: Any) -> int:
    """In a joint forward/backward graph, let the backward read each weight itself instead of
    transposing the forward's transposed copy back. Returns how many transposes were removed.

    Autograd of `mm(x, t(W))` computes `grad @ t(t(W))`, so the forward's `t(W)` stays alive from
    the forward to the backward. In eager that is a free view; in an ExecuTorch program every
    `permute` is a copy in the activation arena, so every weight of the model (and the 108 MiB
    tied LM head of SmolLM2) was held twice in the arena across the whole step. Weights are
    program inputs (parameters, constants) that live outside the arena anyway: reading them
    again costs nothing, and the forward copy becomes short-lived, so the planner reuses it.
    A transposed *slice* of a weight (the vocabulary-chunked LM head, `training_loss.py`) is
    replaced by the slice taken again right where the backward needs it.
    """
    graph = ep.graph_module.graph
    weights = {n for n in graph.nodes if n.op == "placeholder" and n.name not in ep.graph_signature.user_inputs}
    removed = 0
    for node in list(graph.nodes):
        source = _transpose_source(_transpose_source(node))
        if source in weights:
            node.replace_all_uses_with(source)
        elif _is_weight_slice(source, weights):
            with graph.inserting_before(node):
                again = graph.call_function(source.target, source.args, source.kwargs)
            again.meta = dict(source.meta)
            node.replace_all_uses_with(again)
        else:
            continue
        graph.erase_node(node)
        removed += 1
    graph.lint()
    ep.graph_module.recompile()
    return removed


_ALIASES = (aten.alias.default, aten.detach.default)


def drop_aliases(ep: Any) -> int:
    """Read the aliased value itself wherever a joint graph reads an `alias` of it. Returns how many
    aliases were dropped.

    Autograd detaches the tensors it saves for the backward (and the training loss detaches its
    logits output), which export records as `alias` (or `detach`) nodes, chained up to twice. A functional
    graph gains nothing from them, but ExecuTorch runs each as `alias_copy`: a real copy in the
    activation arena, kept alive as long as the backward needs it (per block, the attention
    probabilities twice and a few residual-sized values), and a 25 MB copy of SmolLM2's logits on
    every step. An alias of a program input stays (a copy is then what an output needs).
    """
    graph = ep.graph_module.graph
    output = next(n for n in reversed(graph.nodes) if n.op == "output")
    dropped = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in _ALIASES:
            continue
        source = node.args[0]
        while source.op == "call_function" and source.target in _ALIASES:
            source = source.args[0]
        if output in node.users and (source.op == "placeholder" or source in output.all_input_nodes):
            continue  # an output must then be a value of its own
        if output in node.users:
            for spec in ep.graph_signature.output_specs:
                if getattr(spec.arg, "name", None) == node.name:
                    spec.arg.name = source.name
        node.replace_all_uses_with(source)
        graph.erase_node(node)
        dropped += 1
    graph.lint()
    ep.graph_module.recompile()
    return dropped


def drop_noop_expands(gm: fx.GraphModule) -> Any:
    """An edge-dialect pass: `expand_copy` to the shape its input already has is dropped.

    ATen's `matmul` of 4-D attention operands decomposes into `expand` + `view` + `bmm`, and the
    expand is to the operands' own shape: ExecuTorch then runs it as `expand_copy`, a full copy
    in the portable kernel (not delegated). In SmolLM2's prefill those were 4 of the 6
    `expand_copy` calls per block, ~10 ms of a 215 ms program with the GQA expands (ETDump).
    """
    from executorch.exir.dialects._ops import ops as exir_ops
    from executorch.exir.pass_base import PassResult

    dropped = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target != exir_ops.edge.aten.expand_copy.default:
            continue
        source = node.args[0]
        before, after = node_value(source), node_value(node)
        if before is None or after is None:
            continue
        if [str(d) for d in before.shape] != [str(d) for d in after.shape]:
            continue
        node.replace_all_uses_with(source)
        gm.graph.erase_node(node)
        dropped += 1
    if dropped:
        gm.graph.lint()
        gm.recompile()
    return PassResult(gm, dropped > 0)


def infer_symbolic_view_dims(gm: fx.GraphModule) -> Any:
    """An edge-dialect pass: a `view_copy` to a shape with exactly one dynamic dimension (the
    sequence length, or an expression of it) gets its target shape as integers with -1 there.

    The shape is the same (the element count determines the one inferred entry), but XNNPACK's
    partitioner only takes views with integer shapes and at most one -1: every reshape of the
    attention heads and of the MoE layer's token matrix stayed outside the delegate and cut each
    block's XNNPACK graph into 8 delegate calls (SmolLM2's prefill: 243, ~20 us of overhead each).
    """
    from executorch.exir.dialects._ops import ops as exir_ops
    from executorch.exir.pass_base import PassResult

    rewritten = 0
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target != exir_ops.edge.aten.view_copy.default:
            continue
        value = node_value(node)
        if value is None or all(isinstance(d, int) for d in node.args[1]):
            continue
        shape = [d if isinstance(d, int) else -1 for d in value.shape]
        if shape.count(-1) != 1:
            continue
        node.args = (node.args[0], shape, *node.args[2:])
        rewritten += 1
    if rewritten:
        gm.graph.eliminate_dead_code()
        gm.graph.lint()
        gm.recompile()
    return PassResult(gm, rewritten > 0)


def sink_inputless_nodes(ep: Any) -> int:
    """Move every node that reads no tensor (`full`, `zeros`, `arange`, ...) to just before its
    first user. Returns how many moved.

    Tracing places such nodes wherever their Python call happened or a decomposition put them,
    often in the forward part of the joint graph for a buffer the backward fills: the memory
    planner then keeps the buffer alive across the whole step (12 x 2 MiB for the vocabulary-
    chunked loss's gather gradients). Created where used, they live only as long as they must.
    """
    graph = ep.graph_module.graph
    order = {node: i for i, node in enumerate(graph.nodes)}
    moved = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.all_input_nodes or not node.users:
            continue
        first = min(node.users, key=order.__getitem__)
        if node.next is first:
            continue
        first.prepend(node)
        moved += 1
    graph.lint()
    ep.graph_module.recompile()
    return moved


def _is_weight_slice(node: Any, weights: set[fx.Node]) -> bool:
    return (isinstance(node, fx.Node) and node.op == "call_function" and node.target == aten.slice.Tensor
            and node.args[0] in weights)


def _mm_as_bmm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.bmm(a.view((1, *a.shape)), b.view((1, *b.shape))).view(a.shape[0], b.shape[1])


def _addmm_as_bmm(bias: torch.Tensor, a: torch.Tensor, b: torch.Tensor, beta: float = 1,
                  alpha: float = 1) -> torch.Tensor:
    """`beta * bias + alpha * a @ b`, scaling only when a factor is not 1: each scaling would be a
    full pass over the output in the program (every expert's LoRA `addmm` has beta = alpha = 1)."""
    product = _mm_as_bmm(a, b)
    if alpha != 1:
        product = product * alpha
    return (bias if beta == 1 else bias * beta) + product


def _empty_permuted(size: list[int], physical_layout: list[int], *, dtype: Any = None, layout: Any = None,
                    device: Any = None, pin_memory: Any = None) -> torch.Tensor:
    physical = torch.empty([size[i] for i in physical_layout], dtype=dtype, device=device)
    inverse = [0] * len(physical_layout)
    for logical, dim in enumerate(physical_layout):
        inverse[dim] = logical
    return physical.permute(inverse)


CORE_ATEN_FIXES: dict[Any, Callable[..., torch.Tensor]] = {aten.empty_permuted.default: _empty_permuted}
MATMULS_TO_BMM: dict[Any, Callable[..., torch.Tensor]] = {
    aten.mm.default: _mm_as_bmm,
    aten.addmm.default: _addmm_as_bmm,
}
