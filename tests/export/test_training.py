"""The exported training program against eager training: first step exactly, 20 AdamW steps closely."""

from __future__ import annotations

import pytest
import torch

from edge_runtime import roles
from edge_runtime.artifacts import ExecuTorchTrainer, MemoryBudgetError, OptimizerSettings
from edge_runtime.artifacts.errors import ArtifactInputError
from edge_runtime.model.inject import language_model_loss

from tests.export.export_helpers import TRAIN_LOSS_CHUNK, TRAIN_SHAPE, max_diff, run_joint, token_ids


def _trainable(exported) -> set[str]:
    wanted = {roles.Role.SPECIALIST, roles.Role.ROUTER}
    if exported.train_generalists:
        wanted.add(roles.Role.GENERALIST)
    return {n for n, _ in exported.eager().named_parameters() if roles.role_of(n) in wanted}


def test_manifest_describes_the_training_program(exported):
    entry = exported.manifest.artifact("pte-train")
    assert entry["backend"] == exported.train_backend
    assert entry["loss_output"] == 0
    assert entry["loss_chunk"] == TRAIN_LOSS_CHUNK
    assert set(entry["trainable"]) == _trainable(exported)
    groups = entry["optimizer_groups"]
    assert {roles.role_of(n) for n in groups["router"]} == {roles.Role.ROUTER}
    assert roles.Role.ROUTER not in {roles.role_of(n) for n in groups["experts"]}
    assert set(groups["experts"]) | set(groups["router"]) == set(entry["trainable"])


def test_arena_in_manifest_is_the_programs_memory_plan(exported):
    from executorch.exir._serialize._program import deserialize_pte_binary

    for artifact in ("pte", "pte-xnnpack", "pte-train"):
        entry = exported.manifest.artifact(artifact)
        program = deserialize_pte_binary((exported.directory / entry["files"]["program"]).read_bytes()).program
        plan = next(p for p in program.execution_plan if p.name == "forward")
        assert entry["memory"]["arena_bytes"] == sum(plan.non_const_buffer_sizes) > 0, artifact


def test_first_step_loss_and_every_gradient_equal_eager(exported):
    trainable = _trainable(exported)
    model = exported.eager().train()  # the eager training path, not the export one
    params = dict(model.named_parameters())
    for name, p in params.items():
        p.requires_grad_(name in trainable)
    ids, targets = token_ids(TRAIN_SHAPE, 1), token_ids(TRAIN_SHAPE, 2)
    loss, _ = language_model_loss(model, ids, targets)
    loss.backward()
    with ExecuTorchTrainer(exported.directory) as trainer:
        et_loss, grads = trainer.forward_backward(ids, targets)
    assert set(grads) == trainable
    assert abs(et_loss - float(loss)) <= 1e-5
    for name in trainable:
        assert max_diff(grads[name], params[name].grad) <= 1e-5, name
    nonzero = [n for n in trainable if params[n].grad.abs().max() > 1e-6]
    assert len(nonzero) >= len(trainable) // 2, "gradients are (almost) all zero: the comparison proves nothing"


def test_twenty_alternating_adamw_steps_track_eager(exported):
    """Even steps: experts phase on 'train' batches; odd steps: router phase on 'valid' batches,
    AdamW over the program's own parameters vs torch AdamW on the eager model."""
    settings = OptimizerSettings()  # the paper's AdamW: lr 2e-3, betas (0.9, 0.95), weight decay 0.01
    entry = exported.manifest.artifact("pte-train")
    model = exported.eager().train()
    params = dict(model.named_parameters())
    for name, p in params.items():
        p.requires_grad_(name in entry["trainable"])
    optimizers = {phase: torch.optim.AdamW([params[n] for n in names], lr=settings.lr, betas=settings.betas,
                                           weight_decay=settings.weight_decay)
                  for phase, names in entry["optimizer_groups"].items()}
    start = {n: params[n].detach().clone() for n in entry["trainable"]}
    with ExecuTorchTrainer(exported.directory, optimizer=settings) as trainer:
        for step in range(20):
            phase = "experts" if step % 2 == 0 else "router"
            ids, targets = token_ids(TRAIN_SHAPE, 100 + step), token_ids(TRAIN_SHAPE, 200 + step)
            et_loss = trainer.step(phase, ids, targets)
            model.zero_grad(set_to_none=True)
            loss, _ = language_model_loss(model, ids, targets)
            loss.backward()
            optimizers[phase].step()
            model.zero_grad(set_to_none=True)
            assert abs(et_loss - float(loss)) <= 1e-4, (step, phase)
        trained = trainer.trained_state()
    assert trainer.steps == {"experts": 10, "router": 10}
    for name in entry["trainable"]:
        assert max_diff(trained[name], params[name]) <= 1e-4, name
        assert max_diff(trained[name], start[name]) > 1e-3, f"{name} never moved"


def test_memory_budget_is_checked_before_loading(exported):
    arena = exported.manifest.artifact("pte-train")["memory"]["arena_bytes"]
    with pytest.raises(MemoryBudgetError, match="activation arena"):
        ExecuTorchTrainer(exported.directory, memory_budget_bytes=arena // 2)


def test_training_inputs_must_fit_the_program(gpt2_export):
    with ExecuTorchTrainer(gpt2_export.directory) as trainer:
        with pytest.raises(ArtifactInputError, match="batch"):
            trainer.forward_backward(token_ids((1, TRAIN_SHAPE[1]), 0), token_ids((1, TRAIN_SHAPE[1]), 1))
        with pytest.raises(ArtifactInputError, match="sequence length"):
            trainer.forward_backward(token_ids((TRAIN_SHAPE[0], 5), 0), token_ids((TRAIN_SHAPE[0], 5), 1))
        with pytest.raises(ArtifactInputError, match="unknown phase"):
            trainer.step("everything", token_ids(TRAIN_SHAPE, 0), token_ids(TRAIN_SHAPE, 1))


@pytest.mark.parametrize("loss", ["plain", "vocab-chunked"])
def test_backward_reads_weights_instead_of_transposing_them_back(loss):
    """Every frozen weight (or slice of one, in the vocabulary-chunked LM head) used as
    mm(x, t(W)) must not be kept transposed from forward to backward (in an ExecuTorch program
    each transpose is an arena copy: SmolLM2's arena was 1175 MiB with them); the rewritten joint
    graph computes exactly what it did before."""
    from torch.export.experimental import _export_forward_backward

    from export.executorch_training import trainable_names
    from export.graph_rewrites import CORE_ATEN_FIXES, _transpose_source, transpose_weights_once
    from export.prepare import prepare_for_export, requires_grad_only, training_module
    from export.training_loss import TrainingLossModule

    from tests.export.export_helpers import eager_model

    model = eager_model("llama")
    prepare_for_export(model)
    module = training_module(model) if loss == "plain" else TrainingLossModule(model, TRAIN_LOSS_CHUNK)
    ids, targets = token_ids(TRAIN_SHAPE, seed=3), token_ids(TRAIN_SHAPE, seed=4)
    with requires_grad_only(model, set(trainable_names(model, False))):
        ep = torch.export.export(module.eval(), (ids, targets), strict=False)
        ep = _export_forward_backward(ep).run_decompositions(dict(CORE_ATEN_FIXES))
    before = run_joint(ep, ids, targets)
    weights = {n for n in ep.graph.nodes if n.op == "placeholder" and n.name not in ep.graph_signature.user_inputs}

    def of_weight(node) -> bool:
        if node in weights:
            return True
        return node is not None and node.target == torch.ops.aten.slice.Tensor and node.args[0] in weights

    assert [n for n in ep.graph.nodes if of_weight(_transpose_source(_transpose_source(n)))]
    removed = transpose_weights_once(ep)

    assert removed > 0
    assert not [n for n in ep.graph.nodes if of_weight(_transpose_source(_transpose_source(n)))]
    after = run_joint(ep, ids, targets)
    assert len(after) == len(before)
    for a, b in zip(after, before, strict=True):
        assert torch.equal(a, b)
