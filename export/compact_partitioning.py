"""Memory-lean dependency tracking for the partitioners, so big joint graphs can be lowered.

The XNNPACK partitioner (executorch's GroupPartitioner, built on torch.fx's
CapabilityBasedPartitioner) precomputes, for every node, the *set* of all its transitive
downstream nodes (executorch: also all upstream nodes) to rule out cycles when merging
partitions. That is O(nodes^2) Python set entries: for the joint forward/backward graph of
SmolLM2 (30 layers, tens of thousands of nodes) it alone exceeded 20 GB and the export was
OOM-killed on a 24 GB machine (measured peaks: 2 layers +0.05 GB, 6 layers +0.8 GB, 12 layers
+3.1 GB).

Inside `compact_dependency_viewers()` both viewers are replaced by one that stores each closure
as a bitmask over the topological node index (an int: N bits instead of N set entries, ~30x
less memory) and answers the same two questions the partitioners ask: membership and
iteration (in topological order). Partitioning results are identical. executorch is pinned
(1.5.1); if the private classes are missing, the block does nothing.

Time, too: GroupBasedPartitioner tries to merge every *pair* of partitions, and for each pair
walks the whole downstream closure of every external user in Python (`any(n in combined for n
in downstreams_of(user))`): O(partitions^2 x nodes), which kept the SmolLM2 training graph in
the partitioner for over 50 minutes. Inside the block that check is one bitmask AND per
external user (`_can_merge_partitions` below); the BFS safety net of the original still runs
for pairs that pass, so the answers are the original's.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterator
from typing import Any

import numpy as np
from torch import fx

_VIEWERS = (
    ("torch.fx.passes.infra.partitioner", "_DependencyViewer"),
    ("executorch.exir.backend.canonical_partitioners.group_partitioner", "_DependencyViewer"),
)


class NodeClosure:
    """A read-only set of graph nodes stored as a bitmask over their topological index."""

    __slots__ = ("_index", "_mask", "_nodes")

    def __init__(self, mask: int, index: dict[fx.Node, int], nodes: list[fx.Node]) -> None:
        self._mask, self._index, self._nodes = mask, index, nodes

    def __contains__(self, node: object) -> bool:
        i = self._index.get(node)  # type: ignore[call-overload]
        return i is not None and (self._mask >> i) & 1 == 1

    def __iter__(self) -> Iterator[fx.Node]:
        if not self._mask:
            return iter(())
        raw = np.frombuffer(self._mask.to_bytes((self._mask.bit_length() + 7) // 8, "little"), dtype=np.uint8)
        return (self._nodes[i] for i in np.flatnonzero(np.unpackbits(raw, bitorder="little")))

    def __len__(self) -> int:
        return self._mask.bit_count()

    def __bool__(self) -> bool:
        return self._mask != 0


class CompactDependencyViewer:
    """Drop-in for the partitioners' `_DependencyViewer` (downstreams_of / upstreams_of)."""

    def __init__(self, graph_module: fx.GraphModule) -> None:
        self._nodes = list(graph_module.graph.nodes)
        self._index = {node: i for i, node in enumerate(self._nodes)}
        self._down: dict[fx.Node, int] = {}
        self._up: dict[fx.Node, int] = {}
        for node in reversed(self._nodes):
            mask = 0
            for user in node.users:
                mask |= (1 << self._index[user]) | self._down.get(user, 0)
            self._down[node] = mask
        for node in self._nodes:
            mask = 0
            for source in node.all_input_nodes:
                mask |= (1 << self._index[source]) | self._up.get(source, 0)
            self._up[node] = mask

    def downstreams_of(self, node: fx.Node) -> NodeClosure:
        return NodeClosure(self._down.get(node, 0), self._index, self._nodes)

    def upstreams_of(self, node: fx.Node) -> NodeClosure:
        return NodeClosure(self._up.get(node, 0), self._index, self._nodes)

    def downstream_mask(self, node: fx.Node) -> int:
        return self._down.get(node, 0)

    def mask_of(self, nodes: set[fx.Node]) -> int:
        mask = 0
        for node in nodes:
            i = self._index.get(node)
            if i is not None:
                mask |= 1 << i
        return mask


def _can_merge_partitions(self: Any, p1: int, p2: int, partitions_by_id: dict) -> bool:
    """GroupBasedPartitioner._can_merge_partitions with the closure walk done as bitmask ANDs."""
    from torch.fx.passes.utils.fuser_utils import validate_partition

    viewer = self.dependency_viewer
    combined = set(partitions_by_id[p1].nodes.keys()) | set(partitions_by_id[p2].nodes.keys())
    if isinstance(viewer, CompactDependencyViewer):
        combined_mask = viewer.mask_of(combined)
        for node in combined:
            for user in node.users:
                if user not in combined and viewer.downstream_mask(user) & combined_mask:
                    return False
    else:  # not built by us: ask it like the original does
        for node in combined:
            for user in node.users:
                if user not in combined and any(n in combined for n in viewer.downstreams_of(user)):
                    return False
    return validate_partition(list(combined))


@contextlib.contextmanager
def compact_dependency_viewers() -> Iterator[None]:
    replaced: list[tuple[Any, str, Any]] = []
    for module_name, attr in _VIEWERS:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        if hasattr(module, attr):
            replaced.append((module, attr, getattr(module, attr)))
            setattr(module, attr, CompactDependencyViewer)
    try:
        group_partitioner = importlib.import_module(_VIEWERS[1][0])
    except ImportError:
        group_partitioner = None
    partitioner_class = getattr(group_partitioner, "GroupBasedPartitioner", None)
    if partitioner_class is not None and hasattr(partitioner_class, "_can_merge_partitions"):
        replaced.append((partitioner_class, "_can_merge_partitions", partitioner_class._can_merge_partitions))
        partitioner_class._can_merge_partitions = _can_merge_partitions
    try:
        yield
    finally:
        for module, attr, original in replaced:
            setattr(module, attr, original)
