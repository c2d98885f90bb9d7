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

from tests.export.export_helpers import run_joint


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


def test_chunked_cross_entropy_of_a_bfloat16_head_is_computed_in_float32():
    g = torch.Generator().manual_seed(5)
    head = nn.Linear(12, 97, bias=True).to(torch.bfloat16)
    hidden = torch.randn(2, 7, 12, generator=g).to(torch.bfloat16)
    targets = torch.randint(0, 97, (2, 7), generator=g)

    ce, logits = vocab_chunked_cross_entropy(hidden, head, targets, 8)

    reference = F.cross_entropy(head(hidden).float().reshape(-1, 97), targets.reshape(-1))
    assert ce.dtype == logits.dtype == torch.float32
    torch.testing.assert_close(ce, reference, rtol=0, atol=2e-3)  # bf16 logits round at ~3 digits


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


def _joint_graph(arch: str = "llama", rewrite: bool = True):
    """The tiny model's joint forward/backward graph as export_training builds it, before lowering
    (`rewrite`: with its rewrites up to the rematerialisation)."""
    from export.executorch_training import trainable_names, training_joint_graph
    from export.prepare import prepare_for_export

    from tests.export.export_helpers import TRAIN_LOSS_CHUNK, TRAIN_SHAPE, eager_model, token_ids

    model = eager_model(arch)
    prepare_for_export(model)
    ids, targets = token_ids(TRAIN_SHAPE, seed=3), token_ids(TRAIN_SHAPE, seed=4)
    ep = training_joint_graph(model, (ids, targets), trainable_names(model, False), TRAIN_LOSS_CHUNK, "xnnpack",
                              rewrite=rewrite)
    residual = TRAIN_SHAPE[0] * TRAIN_SHAPE[1] * model.get_input_embeddings().embedding_dim
    return ep, (ids, targets), residual


def test_aliases_are_dropped_from_the_joint_graph():
    """Autograd's detached saved tensors and the detached logits output are `alias` nodes, each an
    arena copy in an ExecuTorch program; without them the graph computes the same outputs."""
    from export.graph_rewrites import drop_aliases

    ep, inputs, _ = _joint_graph(rewrite=False)
    before = run_joint(ep, *inputs)
    aliases = [n for n in ep.graph.nodes if n.target == torch.ops.aten.alias.default]
    assert aliases

    assert drop_aliases(ep) == len(aliases)

    assert not [n for n in ep.graph.nodes if n.target == torch.ops.aten.alias.default]
    output = next(n for n in ep.graph.nodes if n.op == "output")
    assert [spec.arg.name for spec in ep.graph_signature.output_specs] == [a.name for a in output.args[0]]
    after = run_joint(ep, *inputs)
    for a, b in zip(after, before, strict=True):
        assert torch.equal(a, b)


def test_an_output_that_aliases_an_input_keeps_its_copy():
    from export.graph_rewrites import drop_aliases

    class Echo(nn.Module):
        def forward(self, x):
            return x.detach(), torch.sin(x).detach()

    ep = torch.export.export(Echo(), (torch.randn(3),)).run_decompositions({})
    assert drop_aliases(ep) == 1
    output = next(n for n in ep.graph.nodes if n.op == "output")
    assert [a.target for a in output.args[0]] == [torch.ops.aten.detach.default, torch.ops.aten.sin.default]


def _saved(ep) -> list[fx.Node]:
    from export.rematerialize import _forward_nodes

    forward = _forward_nodes(ep)
    return [n for n in ep.graph.nodes if n in forward and n.op == "call_function"
            and any(u not in forward for u in n.users)]


def _silu_outputs(nodes) -> list[fx.Node]:
    """`x * sigmoid(x)`: SiLU as the decomposed graph computes it."""
    aten = torch.ops.aten
    return [n for n in nodes if n.target == aten.mul.Tensor and len(n.args) == 2
            and any(isinstance(a, fx.Node) and a.target == aten.sigmoid.default and a.args[0] in n.args
                    for a in n.args)]


def test_backward_recomputes_expert_activations_instead_of_keeping_them():
    """The SiLU outputs and expert hidden states (act(g) * u) no longer live from the forward to
    the backward; the backward recomputes them from the pre-activations it keeps anyway, and the
    joint graph computes bit-identical loss, logits and gradients."""
    from export.rematerialize import rematerialize_cheap_activations

    ep, inputs, residual = _joint_graph()
    before = run_joint(ep, *inputs)
    saved_before = _saved(ep)
    assert _silu_outputs(saved_before), "the tiny model's joint graph should keep SiLU outputs for the backward"

    recomputed = rematerialize_cheap_activations(ep, min_numel=residual)

    saved_after = _saved(ep)
    assert recomputed > 0
    assert not _silu_outputs(saved_after)
    assert len(saved_after) == len(saved_before) - recomputed
    assert _silu_outputs([n for n in ep.graph.nodes if n not in set(saved_after)])  # now computed in the backward
    after = run_joint(ep, *inputs)
    assert len(after) == len(before)
    for a, b in zip(after, before, strict=True):
        assert torch.equal(a, b)


def test_only_values_at_least_the_residual_stream_are_recomputed():
    from export.rematerialize import _numel, rematerialize_cheap_activations

    ep, _, residual = _joint_graph()
    small = {n.name for n in _saved(ep) if _numel(n) < residual}
    assert rematerialize_cheap_activations(ep, min_numel=10**9) == 0
    rematerialize_cheap_activations(ep, min_numel=residual)
    assert small <= {n.name for n in _saved(ep)}


@pytest.mark.slow
def test_recomputing_shrinks_the_training_programs_arena(tmp_path, monkeypatch):
    """End to end: the training program's planned activation arena is smaller with the backward's
    recomputation than without it (portable backend: the same memory plan, a faster export)."""
    import export.executorch_training as training
    from export.pipeline import ExportOptions, export_artifacts

    from tests.export.export_helpers import TRAIN_LOSS_CHUNK, TRAIN_SHAPE, eager_model

    options = ExportOptions(formats=("pte-train",), train_batch=TRAIN_SHAPE[0], train_seq_len=TRAIN_SHAPE[1],
                            train_loss_chunk=TRAIN_LOSS_CHUNK, train_backend="portable", verify=False)

    def arena(out: str) -> int:
        manifest = export_artifacts(eager_model("llama"), tmp_path / out, options)
        return manifest.artifact("pte-train")["memory"]["arena_bytes"]

    with_recompute = arena("on")
    monkeypatch.setattr(training, "rematerialize_cheap_activations", lambda ep, min_numel: 0)
    without = arena("off")
    assert with_recompute < without
