"""`swap-experts`: adapters must fit, roles are swapped whole, and a failed swap changes nothing."""

from __future__ import annotations

import pytest
import torch

from edge_runtime import cli, roles
from edge_runtime.artifacts import ArtifactInputError, ExecuTorchInference, Manifest, OnnxInference, swap_experts
from edge_runtime.model.adapters import save_adapters
from export.swap import swap_from_adapters

from tests.builders import tiny_comigs
from tests.export.export_helpers import eager_logits, eager_model, max_diff, token_ids


def _state(directory):
    """Everything a swap could touch: file names and bytes, and the manifest."""
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file() and not p.name.startswith(".")}


def _tensors(model, role=None):
    return {n: p.detach().clone() for n, p in model.named_parameters()
            if roles.role_of(n) is not roles.Role.FROZEN and (role is None or roles.role_of(n) is role)}


def test_only_the_requested_roles_are_swapped(gpt2_export, artifact_copy, tmp_path):
    directory = artifact_copy(gpt2_export)
    new = eager_model("gpt2", experts_seed=42)
    save_adapters(new, tmp_path / "adapters")
    assert cli.main(["export", "swap-experts", str(directory), "--adapters", str(tmp_path / "adapters"),
                     "--roles", "generalist"]) == 0
    expected = gpt2_export.eager()
    roles.load_generalist(expected, roles.generalist_state(new))
    ids = token_ids((1, 11), seed=3)
    with ExecuTorchInference(directory, "pte-xnnpack") as program:
        assert max_diff(program.logits(ids), eager_logits(expected, ids)) <= 1e-4
    manifest = Manifest.load(directory)
    assert manifest.generation == 1
    assert manifest.data["experts_source"]["generalist"]["source"] == str((tmp_path / "adapters").absolute())
    assert manifest.data["experts_source"]["specialist"]["source"] == "tests"


def test_single_safetensors_file(gpt2_export, artifact_copy, tmp_path):
    from safetensors.torch import save_file

    directory = artifact_copy(gpt2_export)
    new = eager_model("gpt2", experts_seed=5)
    save_file(_tensors(new, roles.Role.SPECIALIST), tmp_path / "specialists.safetensors")
    swap_from_adapters(directory, tmp_path / "specialists.safetensors")
    expected = gpt2_export.eager()
    roles.load_state_by_role(expected, _tensors(new, roles.Role.SPECIALIST), roles.Role.SPECIALIST)
    ids = token_ids((2, 5), seed=9)
    with OnnxInference(directory) as program:
        assert max_diff(program.logits(ids), eager_logits(expected, ids)) <= 1e-4


@pytest.mark.parametrize(("breakage", "message"), [
    ("wrong_shape", "shape .* does not match the exported"),
    ("missing", "specialist tensors are incomplete: missing 1"),
    ("frozen", "a frozen base weight"),
    ("unknown", "no such parameter"),
    ("nan", "NaN or Inf"),
    ("integer", "not a floating-point type"),
])
def test_bad_tensors_change_nothing(gpt2_export, artifact_copy, breakage, message):
    directory = artifact_copy(gpt2_export)
    before = _state(directory)
    tensors = _tensors(eager_model("gpt2", experts_seed=3), roles.Role.SPECIALIST)
    name = sorted(tensors)[0]
    if breakage == "wrong_shape":
        tensors[name] = tensors[name][..., :-1]
    elif breakage == "missing":
        del tensors[name]
    elif breakage == "frozen":
        tensors["transformer.wte.weight"] = torch.zeros(96, 32)
    elif breakage == "unknown":
        tensors["transformer.h.9.mlp.experts.c_fc.specialist_A"] = torch.zeros(1, 8, 32)
    elif breakage == "nan":
        tensors[name] = torch.full_like(tensors[name], float("nan"))
    else:
        tensors[name] = tensors[name].to(torch.int32)
    with pytest.raises(ArtifactInputError, match=message):
        swap_experts(directory, tensors)
    assert _state(directory) == before


def test_adapters_for_another_layout_or_base_are_refused(gpt2_export, artifact_copy, tmp_path):
    directory = artifact_copy(gpt2_export)
    before = _state(directory)
    save_adapters(tiny_comigs("gpt2", n_generalists=1, n_specialists=1, rank=4), tmp_path / "rank4")
    with pytest.raises(ArtifactInputError, match="rank=4"):
        swap_from_adapters(directory, tmp_path / "rank4")
    save_adapters(tiny_comigs("llama", n_generalists=1, n_specialists=1), tmp_path / "llama")
    with pytest.raises(ArtifactInputError, match="model_type='llama'"):
        swap_from_adapters(directory, tmp_path / "llama")
    assert cli.main(["export", "swap-experts", str(directory), "--adapters", str(tmp_path / "llama")]) == 2
    assert cli.main(["export", "swap-experts", str(directory), "--adapters", str(tmp_path / "nothing")]) == 2
    assert _state(directory) == before


def test_failure_midway_leaves_the_old_artifacts_intact(llama_export, artifact_copy, monkeypatch):
    """The fifth .ptd read (the last artifact) fails after three artifacts' new files were written."""
    from edge_runtime.artifacts import ptd

    directory = artifact_copy(llama_export)
    before = _state(directory)
    real = ptd._named_data
    calls = []

    def failing(*args):
        calls.append(1)
        if len(calls) == 5:
            raise OSError("disk went away")
        return real(*args)

    monkeypatch.setattr(ptd, "_named_data", failing)
    with pytest.raises(OSError, match="disk went away"):
        swap_experts(directory, _tensors(eager_model("llama", experts_seed=8)))
    monkeypatch.undo()
    assert len(calls) == 5
    assert _state(directory) == before
    manifest = Manifest.load(directory)
    manifest.verify()
    ids = token_ids((1, 6), seed=2)
    with ExecuTorchInference(directory, "pte") as program:
        assert max_diff(program.logits(ids), eager_logits(llama_export.eager(), ids)) <= 1e-4


def test_swap_replaces_generations_and_cleans_orphans(gpt2_export, artifact_copy):
    directory = artifact_copy(gpt2_export)
    old_files = set(Manifest.load(directory).data["files"])
    (directory / "model.g0007.onnx").write_bytes(b"left behind by a crashed swap")
    (directory / "notes.txt").write_text("not ours")
    swap_experts(directory, _tensors(eager_model("gpt2", experts_seed=4), roles.Role.ROUTER), source={"source": "x"})
    manifest = Manifest.load(directory)
    manifest.verify()
    present = {p.name for p in directory.iterdir() if p.is_file() and not p.name.startswith(".")}
    assert present == set(manifest.data["files"]) | {"manifest.json", "notes.txt"}
    replaced = old_files - set(manifest.data["files"])
    assert replaced and all(".g0000." in f for f in replaced)
    assert all(".g0001." in f for f in set(manifest.data["files"]) - old_files)
