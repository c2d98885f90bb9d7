"""Eager vs ExecuTorch portable vs ExecuTorch XNNPACK vs ONNX Runtime, before and after swapping experts."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from edge_runtime import cli, roles
from edge_runtime.artifacts import ExecuTorchInference, ExecuTorchTrainer, Manifest, OnnxInference
from edge_runtime.artifacts.experts import read_experts
from edge_runtime.model.adapters import save_adapters
from edge_runtime.model.inject import language_model_loss
from export.pipeline import ExportOptions, export_artifacts

from tests.builders import randomize_experts, tiny_comigs
from tests.export.export_helpers import MAX_SEQ_LEN, TRAIN_SHAPE, eager_logits, eager_model, max_diff, token_ids

INFERENCE = ("pte", "pte-xnnpack", "onnx")
TOL = 1e-4


def load(directory: Path, artifact: str, **kwargs):
    if artifact == "onnx":
        return OnnxInference(directory, **kwargs)
    return ExecuTorchInference(directory, artifact, **kwargs)


@pytest.mark.parametrize("artifact", INFERENCE)
def test_logits_match_eager_at_every_length(exported, artifact):
    model = exported.eager()
    with load(exported.directory, artifact) as program:
        for i, seq in enumerate((1, 7, MAX_SEQ_LEN)):
            ids = token_ids((1, seq), seed=i)
            assert max_diff(program.logits(ids), eager_logits(model, ids)) <= TOL, (artifact, seq)


@pytest.mark.parametrize("artifact", INFERENCE)
def test_logits_only_at_the_positions_asked_for(exported, artifact):
    """A generation prefill asks for the last position only; any subset, in any order, is the
    matching rows of the full logits (eager's), and the program returns nothing else."""
    ids = token_ids((1, 11), seed=5)
    full = eager_logits(exported.eager(), ids)
    with load(exported.directory, artifact) as program:
        for positions in ([10], [3, 0, 10, 3], list(range(11))):
            logits = program.logits(ids, positions)
            assert logits.shape == (1, len(positions), full.shape[-1])
            assert max_diff(logits, full[:, positions]) <= TOL, (artifact, positions)
        next_logits = program.next_token_logits(ids)
        assert next_logits.shape == (1, full.shape[-1]) and max_diff(next_logits, full[:, -1]) <= TOL


def test_onnx_takes_any_batch(exported):
    ids = token_ids((3, 5), seed=4)
    with OnnxInference(exported.directory) as program:
        assert max_diff(program.logits(ids), eager_logits(exported.eager(), ids)) <= TOL


def test_every_pluggable_tensor_is_outside_the_programs(exported):
    manifest = Manifest.load(exported.directory)
    pluggable = {p["name"] for p in manifest.data["parameters"] if p["role"] != roles.Role.FROZEN.value}
    assert pluggable, "tiny 1G1S models have experts and routers"
    for artifact in ("pte", "pte-xnnpack", "pte-train", "onnx"):
        refs = manifest.pluggable(artifact)
        assert set(refs) == pluggable, artifact
        keys = [r["key"] for name in refs for r in refs[name]]
        assert len(keys) == len(set(keys)), f"{artifact}: two tensors share a key"


@pytest.mark.parametrize("artifact", ["pte", "pte-xnnpack", "pte-train"])
def test_data_files_hold_the_models_experts(exported, artifact):
    stored = read_experts(Manifest.load(exported.directory), artifact)
    model = exported.eager()
    for name, param in model.named_parameters():
        if roles.role_of(name) is not roles.Role.FROZEN:
            assert torch.equal(torch.from_numpy(stored[name]), param.detach()), name


def test_identical_tensors_get_distinct_keys(llama_export):
    """The llama export has all-zero generalist B factors and one router value shared by every
    layer: on XNNPACK (keys = sha256 of bytes) they must still be separately replaceable."""
    model = llama_export.eager()
    zeros = [n for n, p in model.named_parameters() if roles.role_of(n) is roles.Role.GENERALIST and not p.any()]
    routers = [p for n, p in model.named_parameters() if roles.role_of(n) is roles.Role.ROUTER]
    assert len(zeros) >= 6 and all(torch.equal(routers[0], r) for r in routers[1:])
    refs = Manifest.load(llama_export.directory).pluggable("pte-xnnpack")
    keys = {r["key"] for name in zeros for r in refs[name]}
    assert len(keys) == len(zeros)


def test_swap_takes_effect_in_every_artifact(exported, artifact_copy, tmp_path):
    directory = artifact_copy(exported)
    ids = token_ids((1, 9), seed=21)
    before = {}
    for artifact in INFERENCE:
        with load(directory, artifact) as program:
            before[artifact] = program.logits(ids)
    new = eager_model(exported.arch, experts_seed=99)  # new generalists, specialists and routers
    save_adapters(new, tmp_path / "adapters")
    assert cli.main(["export", "swap-experts", str(directory), "--adapters", str(tmp_path / "adapters")]) == 0
    assert Manifest.load(directory).generation == 1
    reference = eager_logits(new, ids)
    for artifact in INFERENCE:
        with load(directory, artifact) as program:
            after = program.logits(ids)
        assert max_diff(after, reference) <= TOL, artifact
        assert max_diff(after, before[artifact]) > 1e-2, f"{artifact}: the swap had no effect"
    train_ids, train_targets = token_ids(TRAIN_SHAPE, 5), token_ids(TRAIN_SHAPE, 6)
    with ExecuTorchTrainer(directory) as trainer:
        loss, _ = trainer.forward_backward(train_ids, train_targets)
    with torch.no_grad():
        eager_loss, _ = language_model_loss(new, train_ids, train_targets)
    assert abs(loss - float(eager_loss)) <= 1e-5


@pytest.mark.parametrize("artifact", INFERENCE)
def test_experts_override_at_load_leaves_files_alone(exported, artifact):
    """Loaders can run other experts without touching the files (ONNX: add_initializer with
    ConstantFolding disabled; ExecuTorch: a patched copy of the .ptd)."""
    new = eager_model(exported.arch, experts_seed=7)
    experts = {n: p.detach() for n, p in new.named_parameters() if roles.role_of(n) is not roles.Role.FROZEN}
    ids = token_ids((1, 6), seed=8)
    with load(exported.directory, artifact, experts=experts) as program:
        assert max_diff(program.logits(ids), eager_logits(new, ids)) <= TOL
    with load(exported.directory, artifact) as program:
        assert max_diff(program.logits(ids), eager_logits(exported.eager(), ids)) <= TOL


def test_sparse_routing_matches_the_grouped_eager_path(tmp_path):
    """1G3S routes top-2 of 4 experts: eager uses the grouped dispatch, the export the dense form."""
    model = tiny_comigs("gpt2", n_generalists=1, n_specialists=3)
    randomize_experts(model, seed=5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if roles.role_of(name) is roles.Role.ROUTER:
                p.normal_(0.0, 1.0, generator=torch.Generator().manual_seed(len(name)))
    ids = token_ids((1, 13), seed=1)
    reference = eager_logits(model, ids)
    export_artifacts(model, tmp_path / "out", ExportOptions(formats=("pte",), max_seq_len=16))
    with ExecuTorchInference(tmp_path / "out", "pte") as program:
        assert max_diff(program.logits(ids), reference) <= TOL
