"""The order of the nodes inside each delegate: every value computed as late as possible.

When ExecuTorch cuts a partition out of the graph it keeps the partition's nodes in graph order,
and XNNPACK then runs them in that order and plans its workspace by their lifetimes. By the
time the partitioner sees the training graph, the nodes that only read weights have drifted to
the front: in the forward of the vocabulary-chunked LM head, all 12 weight slices came first,
then all 12 transposes, all 12 reshapes and only then the 12 matmuls, so every slice was alive
at once and the head's delegate needed ~290 MiB of XNNPACK workspace (heaptrack:
`xnn_plan_memory`) for work that fits in ~30 MiB when each chunk is finished before the next
starts.

`late_delegate_order()` replaces the sort ExecuTorch applies to a partition's nodes with one
that emits each partition output (in graph order) together with the not-yet-emitted nodes it
depends on, depth first: a value is produced right before the first node that needs it. Any
topological order computes the same values; this one only changes lifetimes.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterator

from torch import fx

_MODULE = "executorch.exir.lowered_backend_module"


def late_topo_sort(nodes: list[fx.Node]) -> list[fx.Node]:
    """A topological order of `nodes` that emits producers just before their first consumer."""
    members = set(nodes)
    position = {node: i for i, node in enumerate(nodes)}
    emitted: set[fx.Node] = set()
    order: list[fx.Node] = []
    roots = sorted((n for n in nodes if not any(u in members for u in n.users)), key=position.__getitem__)
    for root in roots:
        stack: list[tuple[fx.Node, bool]] = [(root, False)]
        while stack:
            node, expanded = stack.pop()
            if node in emitted:
                continue
            if expanded:
                emitted.add(node)
                order.append(node)
                continue
            stack.append((node, True))
            inputs = [i for i in node.all_input_nodes if i in members and i not in emitted]
            # the last pushed is expanded first: keep the inputs' own order among themselves
            stack.extend((i, False) for i in sorted(inputs, key=position.__getitem__, reverse=True))
    if len(order) != len(nodes):
        raise AssertionError(f"late_topo_sort: ordered {len(order)} of {len(nodes)} nodes (a cycle?)")
    return order


@contextlib.contextmanager
def late_delegate_order() -> Iterator[None]:
    try:
        module = importlib.import_module(_MODULE)
    except ImportError:
        yield
        return
    original = getattr(module, "topo_sort", None)
    if original is None:
        yield
        return
    module.topo_sort = late_topo_sort
    try:
        yield
    finally:
        module.topo_sort = original
