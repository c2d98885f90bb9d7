"""Recompute cheap activations in the backward instead of keeping them across the step.

In the joint forward/backward graph of the training program, every forward value the backward
reads is kept in the activation arena from where the forward computes it to where the backward
last reads it: the arena's peak, at the turn from forward to backward, is the sum of all of them.
For SmolLM2 1G1S the arena was 374 MiB (~10.8 MiB per block on average), and the largest part
of what each block keeps is the experts' MLP hidden state:
per expert, the gate and up pre-activations `g`, `u` (which SiLU's and the product's backward
need), and also `silu(g) = g * sigmoid(g)` and `h = silu(g) * u`, which autograd keeps because
the product's and the down projection's backward read them. The last two are one sigmoid and two
multiplications away from values that are kept anyway; the same holds for the attention
probabilities' expand copy and the normalised input of the expert MLP (`w * x_hat`).

`rematerialize_cheap_activations` finds such values and gives the backward its own copy,
computed right before the backward first needs it, so the forward's buffer dies with its last
forward use. A value is recomputed only when

- it has at least `min_numel` elements (the exporter passes the size of the residual stream,
  batch x seq_len x d_model: smaller values, such as the experts' rank-r codes or the router's
  scores, are not worth an extra op);
- it is produced by a cheap op (pointwise arithmetic, view-like copies, see `CHEAP`), through a
  chain of at most `max_chain` cheap ops, from values the backward reads anyway (or program
  inputs: weights, parameters). So recomputing extends no other value's life into the backward
  and costs a few element-wise passes, no matmul.

This is what torch's min-cut partitioner does for `torch.compile`; the joint graph that
`_export_forward_backward` produces keeps every saved value instead. The values the program
computes are the same: the recomputed ops run on the same inputs (bit-identical in IEEE float).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import fx

aten = torch.ops.aten

CHEAP = frozenset({
    aten.mul.Tensor, aten.add.Tensor, aten.sub.Tensor, aten.div.Tensor, aten.neg.default,
    aten.sigmoid.default, aten.silu.default, aten.rsqrt.default, aten.pow.Tensor_Scalar,
    aten.view.default, aten.unsqueeze.default, aten.squeeze.dims, aten.expand.default,
    aten.permute.default, aten.clone.default,
})


def rematerialize_cheap_activations(ep: Any, min_numel: int, max_chain: int = 4) -> int:
    """Give the backward its own recomputed copy of cheap saved activations (see the module
    docstring); returns how many saved values the forward no longer keeps."""
    graph = ep.graph_module.graph
    forward = _forward_nodes(ep)
    backward = {n for n in graph.nodes if n.op == "call_function" and n not in forward}
    saved = [n for n in graph.nodes if n in forward and n.op == "call_function"
             and any(u in backward for u in n.users)]
    kept = set(saved)  # shrinks as values are recomputed instead
    recomputed: set[fx.Node] = set()
    for node in saved:  # graph order: a node's saved inputs are decided before it
        if _numel(node) >= min_numel and _recomputable(node, kept, recomputed, max_chain):
            kept.discard(node)
            recomputed.add(node)
    if not recomputed:
        return 0
    copies: dict[fx.Node, fx.Node] = {}
    for user in [n for n in graph.nodes if n in backward]:
        for arg in [a for a in user.all_input_nodes if a in recomputed]:
            user.replace_input_with(arg, _backward_copy(arg, user, kept, copies))
    graph.eliminate_dead_code()
    graph.lint()
    ep.graph_module.recompile()
    return len(recomputed)


def _forward_nodes(ep: Any) -> set[fx.Node]:
    """Every node the program's forward outputs (loss, user outputs) depend on."""
    from torch.export.graph_signature import OutputKind

    graph = ep.graph_module.graph
    output = next(n for n in reversed(graph.nodes) if n.op == "output")
    kinds = [spec.kind for spec in ep.graph_signature.output_specs]
    roots = [value for value, kind in zip(output.args[0], kinds, strict=True)
             if kind in (OutputKind.LOSS_OUTPUT, OutputKind.USER_OUTPUT) and isinstance(value, fx.Node)]
    seen: set[fx.Node] = set()
    while roots:
        node = roots.pop()
        if node not in seen:
            seen.add(node)
            roots.extend(node.all_input_nodes)
    return seen


def _numel(node: fx.Node) -> int:
    value = node.meta.get("val")
    return value.numel() if isinstance(value, torch.Tensor) else 0


def _recomputable(node: fx.Node, kept: set[fx.Node], recomputed: set[fx.Node], budget: int) -> bool:
    """Whether `node` is a chain of at most `budget` cheap ops over values the backward has anyway
    (program inputs, kept values, values already recomputed for it)."""
    if node.op != "call_function" or node.target not in CHEAP or budget <= 0:
        return False
    return all(arg.op in ("placeholder", "get_attr") or arg in kept or arg in recomputed
               or _recomputable(arg, kept, recomputed, budget - 1) for arg in node.all_input_nodes)


def _backward_copy(node: fx.Node, before: fx.Node, kept: set[fx.Node], copies: dict[fx.Node, fx.Node]) -> fx.Node:
    """The backward's value of forward `node`: itself if kept (or a program input), else a copy
    computed before `before`, its inputs resolved the same way (`_recomputable` vetted the chain).

    Backward users are visited in graph order, so a copy made for an earlier user precedes
    every later one."""
    if node.op != "call_function" or node in kept:
        return node
    if node not in copies:
        args = fx.map_arg(node.args, lambda a: _backward_copy(a, before, kept, copies))
        kwargs = fx.map_arg(node.kwargs, lambda a: _backward_copy(a, before, kept, copies))
        with before.graph.inserting_before(before):
            copies[node] = before.graph.call_function(node.target, args, kwargs)
        copies[node].meta = dict(node.meta)
    return copies[node]
