"""Rewrites of the exported ONNX graph that let ONNX Runtime fuse what it already knows how to fuse.

The dynamo exporter spells `torch.rsqrt(v)` as `Reciprocal(Sqrt(v))`, so an RMSNorm
(`x * rsqrt(mean(x^2) + eps) * weight`) reaches ORT as Pow, ReduceMean, Add, Sqrt, Reciprocal, Mul,
Mul: seven nodes, each a pass over the hidden state. ORT's `SimplifiedLayerNormFusion` replaces that
chain by one `SimplifiedLayerNormalization` kernel, but it only recognises the division form
`x / Sqrt(...)`. Rewriting `Mul(x, Reciprocal(Sqrt(v)))` to `Div(x, Sqrt(v))` is exact up to float
rounding (one rounding instead of two) and plain ONNX, so other runtimes read the graph as before;
for SmolLM2 it removes 61 x 6 nodes (one ad-hoc timing: 0.388 -> 0.358 s per ORT prefill; the
benchmark's run-to-run noise is larger, see benchmarks/RESULTS.md, session 7).

RoPE reaches ORT as HF writes it, `x * cos + rotate_half(x) * sin` with
`rotate_half(x) = cat(-x[..., d/2:], x[..., :d/2])`: two Slices, a Neg, a Concat, two Muls and an
Add per query and key tensor of every block, each a pass over the tensor (~5 ms of a ~170 ms SmolLM2
prefill on 2 cores, ORT profile, ad hoc). ORT has one kernel for it, the contrib op
`com.microsoft.RotaryEmbedding` (non-interleaved: exactly the rotate_half convention), which
`fuse_rotary_embeddings` puts in place of each such chain. The op wants cos and sin as (positions,
d/2) tables indexed by position ids; the graph's own cos and sin are (batch, T, d) rows of
cat(freqs, freqs) for the tokens in order (the same for every batch row: the artifacts take no
position ids or padding), so their first row's first half is the table and position id 0 is its
start. This makes the ONNX file need ONNX Runtime (which has shipped the op since 1.16), the runtime
the artifacts are built for and the one the loaders and the Android demo use.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from onnx import TensorProto, helper, numpy_helper

CONTRIB = "com.microsoft"


def divide_by_roots(model: Any) -> int:
    """In place: every `Reciprocal(Sqrt(v))` whose consumers are all `Mul`s becomes `Div(x, Sqrt(v))`
    in each consumer, and the Reciprocal goes. Returns how many Reciprocals were removed.

    A Reciprocal that feeds anything else, is a graph output, or does not take a Sqrt, is left alone.
    """
    graph = model.graph
    consumers: dict[str, list[Any]] = defaultdict(list)
    for node in graph.node:
        for name in node.input:
            consumers[name].append(node)
    producers = _producers(graph)
    outputs = {o.name for o in graph.output}
    removed = []
    for node in graph.node:
        if node.op_type != "Reciprocal" or node.domain not in ("", "ai.onnx"):
            continue
        root, users = node.input[0], consumers[node.output[0]]
        source = producers.get(root)
        if source is None or source.op_type != "Sqrt" or node.output[0] in outputs or not users:
            continue
        if any(u.op_type != "Mul" or u.domain not in ("", "ai.onnx") or list(u.input).count(node.output[0]) != 1
               for u in users):
            continue
        for user in users:
            factor = user.input[0] if user.input[1] == node.output[0] else user.input[1]
            user.op_type = "Div"
            del user.input[:]
            user.input.extend([factor, root])
        removed.append(node)
    for node in removed:
        graph.node.remove(node)
    return len(removed)


def _producers(graph: Any) -> dict[str, Any]:
    return {output: node for node in graph.node for output in node.output}


def _constant_ints(name: str, producers: dict[str, Any], initializers: dict[str, Any]) -> list[int] | None:
    """The int values of a constant tensor: an initializer or Constant node, through the Reshape,
    Cast and Identity nodes the exporter wraps slice bounds in."""
    if name in initializers:
        return [int(v) for v in numpy_helper.to_array(initializers[name]).reshape(-1)]
    node = producers.get(name)
    if node is None:
        return None
    if node.op_type == "Constant":
        for attribute in node.attribute:
            if attribute.name == "value":
                return [int(v) for v in numpy_helper.to_array(attribute.t).reshape(-1)]
            if attribute.name in ("value_ints", "value_int"):
                value = helper.get_attribute_value(attribute)
                return list(value) if isinstance(value, list) else [int(value)]
        return None
    if node.op_type in ("Reshape", "Cast", "Identity"):
        return _constant_ints(node.input[0], producers, initializers)
    return None


def _half_slice(node: Any, producers: dict[str, Any], initializers: dict[str, Any]) -> tuple[str, int, bool] | None:
    """(sliced tensor, boundary h, is_upper) when `node` is x[..., :h] or x[..., h:] on the last axis."""
    if node is None or node.op_type != "Slice" or len(node.input) < 4:
        return None
    starts, ends, axes = (_constant_ints(n, producers, initializers) for n in node.input[1:4])
    steps = _constant_ints(node.input[4], producers, initializers) if len(node.input) > 4 and node.input[4] else [1]
    if not (starts and ends and axes and steps) or len(starts) != 1 or steps != [1] or axes[0] not in (-1, 3):
        return None
    if starts[0] == 0 and ends[0] > 0:
        return node.input[0], ends[0], False
    if starts[0] > 0 and ends[0] >= 2 * starts[0]:  # to the end (INT64_MAX) or to d = 2h
        return node.input[0], starts[0], True
    return None


def _rotary_chain(add: Any, producers: dict[str, Any], initializers: dict[str, Any]) -> tuple[str, str, str] | None:
    """(x, cos, sin) when `add` is Add(Mul(x, Unsqueeze(cos)), Mul(Concat(Neg(x[..., h:]), x[..., :h]),
    Unsqueeze(sin))) with x 4-D (batch, heads, T, d) and cos, sin (batch, T, d); else None."""
    def op(name: str, op_type: str) -> Any:
        node = producers.get(name)
        return node if node is not None and node.op_type == op_type and node.domain in ("", "ai.onnx") else None

    for plain_name, rotated_name in (add.input, tuple(reversed(add.input))):
        plain, rotated = op(plain_name, "Mul"), op(rotated_name, "Mul")
        if plain is None or rotated is None:
            continue
        for cat_name, sin_name in (rotated.input, tuple(reversed(rotated.input))):
            cat, sin_u = op(cat_name, "Concat"), op(sin_name, "Unsqueeze")
            if cat is None or sin_u is None or len(cat.input) != 2:
                continue
            if next((helper.get_attribute_value(a) for a in cat.attribute if a.name == "axis"), None) not in (-1, 3):
                continue
            neg = op(cat.input[0], "Neg")
            upper = _half_slice(op(neg.input[0], "Slice") if neg else None, producers, initializers)
            lower = _half_slice(op(cat.input[1], "Slice"), producers, initializers)
            if upper is None or lower is None or not upper[2] or lower[2] or upper[:2] != lower[:2]:
                continue
            x = lower[0]
            for x_name, cos_name in (plain.input, tuple(reversed(plain.input))):
                cos_u = op(cos_name, "Unsqueeze")
                if x_name != x or cos_u is None:
                    continue
                if all(_constant_ints(u.input[1], producers, initializers) == [1] for u in (cos_u, sin_u)):
                    return x, cos_u.input[0], sin_u.input[0]
    return None


def _table(rows: str, half: str, prefix: str) -> tuple[list[Any], str]:
    """Nodes computing rows[0, :, :d/2] (the op's (positions, d/2) table) from (batch, T, d) rows."""
    first, table = f"{prefix}_first_row", f"{prefix}_table"
    return [helper.make_node("Gather", [rows, "comigs_rope_zero"], [first], axis=0),
            helper.make_node("Slice", [first, "comigs_rope_zero_1d", half, "comigs_rope_last_axis"], [table])], table


def fuse_rotary_embeddings(model: Any) -> int:
    """In place: every rotate_half RoPE chain (see the module docstring) becomes one
    `com.microsoft.RotaryEmbedding`; the nodes only it used are removed. Returns how many chains."""
    graph = model.graph
    producers = _producers(graph)
    initializers = {t.name: t for t in graph.initializer}
    tables: dict[tuple[str, str], tuple[list[Any], str, str]] = {}
    replaced: dict[int, list[Any]] = {}
    for add in graph.node:
        if add.op_type != "Add" or add.domain not in ("", "ai.onnx"):
            continue
        chain = _rotary_chain(add, producers, initializers)
        if chain is None:
            continue
        x, cos, sin = chain
        new: list[Any] = []
        if (cos, sin) not in tables:
            prefix = f"comigs_rope{len(tables)}"
            width, half = f"{prefix}_width", f"{prefix}_half"
            cos_nodes, cos_table = _table(cos, half, f"{prefix}_cos")
            sin_nodes, sin_table = _table(sin, half, f"{prefix}_sin")
            new = [helper.make_node("Shape", [cos], [width], start=-1),
                   helper.make_node("Div", [width, "comigs_rope_two"], [half]), *cos_nodes, *sin_nodes]
            tables[(cos, sin)] = (new, cos_table, sin_table)
        _, cos_table, sin_table = tables[(cos, sin)]
        new.append(helper.make_node("RotaryEmbedding", [x, "comigs_rope_zero_1d", cos_table, sin_table],
                                    list(add.output), name=f"{add.name}_rotary", domain=CONTRIB, interleaved=0))
        replaced[id(add)] = new
    if not replaced:
        return 0
    nodes = [n for node in graph.node for n in replaced.get(id(node), [node])]
    graph.initializer.extend([helper.make_tensor("comigs_rope_zero", TensorProto.INT64, [], [0]),
                              helper.make_tensor("comigs_rope_zero_1d", TensorProto.INT64, [1], [0]),
                              helper.make_tensor("comigs_rope_two", TensorProto.INT64, [1], [2]),
                              helper.make_tensor("comigs_rope_last_axis", TensorProto.INT64, [1], [-1])])
    del graph.node[:]
    graph.node.extend(_without_dead_nodes(nodes, {o.name for o in graph.output}))
    if not any(o.domain == CONTRIB for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(CONTRIB, 1))
    return len(replaced)


def _without_dead_nodes(nodes: list[Any], outputs: set[str]) -> list[Any]:
    """`nodes` less those whose outputs nothing reads (repeatedly: the replaced chains' parts)."""
    while True:
        read = {name for node in nodes for name in node.input} | outputs
        alive = [node for node in nodes if any(name in read for name in node.output)]
        if len(alive) == len(nodes):
            return nodes
        nodes = alive
