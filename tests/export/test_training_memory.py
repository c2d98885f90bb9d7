"""What keeps the training program's memory small: the vocabulary-chunked loss, creation ops
created where they are used, and delegates that finish each value's consumers before the next."""

from __future__ import annotations

import pytest
import torch
from torch import fx, nn
from torch.nn import functional as F

from export.delegate_order import late_delegate_order, late_topo_sort
from export.graph_rewrites import sink_inputless_nodes
from export.training_loss import LOSS_CHUNK, vocab_chunked_cross_entropy


@pytest.mark.parametrize(("vocab", "chunk", "bias"),
                         [(96, 40, False), (96, 96, False), (97, 8, True), (5, 4096, False)])
def test_chunked_cross_entropy_equals_cross_entropy(vocab, chunk, bias):
    g = torch.Generator().manual_seed(vocab + chunk)
    head = nn.Linear(12, vocab, bias=bias)
    hidden = torch.randn(2, 7, 12, generator=g, requires_grad=True)
    targets = torch.randint(0, vocab, (2, 7), generator=g)
    targets[0, 0], targets[1, -1] = 0, vocab - 1  # first and last rows of the first and last chunk

    ce, logits = vocab_chunked_cross_entropy(hidden, head, targets, chunk)
    (grad,) = torch.autograd.grad(ce, hidden)
    reference_logits = head(hidden)
    reference = F.cross_entropy(reference_logits.reshape(-1, vocab), targets.reshape(-1))
    (reference_grad,) = torch.autograd.grad(reference, hidden)

    assert logits.shape == (2, 7, vocab)
    torch.testing.assert_close(logits, reference_logits, rtol=0, atol=1e-6)
    torch.testing.assert_close(ce, reference, rtol=0, atol=1e-6)
    torch.testing.assert_close(grad, reference_grad, rtol=0, atol=1e-7)


def test_cli_default_chunk_is_the_exporters():
    from export.cli import DEFAULT_LOSS_CHUNK

    assert DEFAULT_LOSS_CHUNK == LOSS_CHUNK


def test_inputless_nodes_move_next_to_their_first_user():
    class M(nn.Module):
        def forward(self, x):
            zeros = torch.zeros(3, 4)  # traced first, used last
            y = torch.relu(x) * 2
            return torch.sin(y) + zeros

    x = torch.randn(3, 4)
    ep = torch.export.export(M(), (x,))
    before = ep.module()(x)
    moved = sink_inputless_nodes(ep)
    nodes = [n for n in ep.graph.nodes if n.op == "call_function"]
    full = next(n for n in nodes if n.target in (torch.ops.aten.zeros.default, torch.ops.aten.full.default))

    assert moved == 1
    assert full.next is next(iter(full.users))
    assert torch.equal(ep.module()(x), before)


def _chunked_graph() -> tuple[fx.GraphModule, list[fx.Node]]:
    """Three independent chains (slice -> transpose -> matmul), traced op by op as a partitioner
    may see them after the graph was sorted level by level."""
    graph = fx.Graph()
    w, x = graph.placeholder("w"), graph.placeholder("x")
    slices = [graph.call_function(torch.narrow, (w, 0, 4 * i, 4)) for i in range(3)]
    transposes = [graph.call_function(torch.t, (s,)) for s in slices]
    products = [graph.call_function(torch.mm, (x, t)) for t in transposes]
    graph.output(graph.call_function(torch.cat, (products, 1)))
    return fx.GraphModule(nn.Module(), graph), [*slices, *transposes, *products]


def test_late_topo_sort_finishes_each_chain_before_starting_the_next():
    gm, level_order = _chunked_graph()
    order = late_topo_sort(level_order)

    assert [n.target for n in order] == [torch.narrow, torch.t, torch.mm] * 3
    position = {n: i for i, n in enumerate(order)}
    assert all(position[i] < position[n] for n in order for i in n.all_input_nodes if i in position)
    with pytest.raises(AssertionError, match="a cycle"):
        late_topo_sort(_cyclic())


def _cyclic() -> list[fx.Node]:
    graph = fx.Graph()
    a = graph.placeholder("a")
    b = graph.call_function(torch.relu, (a,))
    c = graph.call_function(torch.sin, (b,))
    b.args = (c,)  # a cycle no topological sort can order
    return [b, c]


def test_late_order_is_installed_only_inside_the_block():
    from executorch.exir import lowered_backend_module

    original = lowered_backend_module.topo_sort
    with late_delegate_order():
        assert lowered_backend_module.topo_sort is late_topo_sort
    assert lowered_backend_module.topo_sort is original


def test_running_and_swapping_programs_does_not_import_the_compiler(llama_export, artifact_copy):
    """The loaders use the runtime extension alone and read `.ptd` indexes with the flatbuffers
    runtime: `executorch.exir` (and torchao, ~130 MB resident) stays out of a device process that
    runs, trains and swaps experts. A fresh interpreter, as on a device."""
    import subprocess
    import sys

    code = f"""
import sys, torch
from edge_runtime.artifacts import ExecuTorchInference, ExecuTorchTrainer, swap_experts
d = {str(artifact_copy(llama_export))!r}
with ExecuTorchTrainer(d) as t:
    ids = torch.zeros(t.entry["batch"], t.entry["seq_len"], dtype=torch.long)
    t.step("experts", ids, ids)
    trained = t.trained_state()
with ExecuTorchInference(d, "pte-xnnpack", experts=trained) as m:
    patched = m.logits(ids[:1])
swap_experts(d, trained)
with ExecuTorchInference(d, "pte-xnnpack") as m:
    assert torch.equal(m.logits(ids[:1]), patched)
print(sorted(m for m in sys.modules if m.startswith(("executorch.exir", "torchao"))))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"
