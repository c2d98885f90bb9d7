"""Loaders refuse tampered, truncated, missing or mismatched artifacts with clear errors."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from edge_runtime import cli
from edge_runtime.artifacts import (
    ArtifactInputError,
    ArtifactIntegrityError,
    ExecuTorchInference,
    ExecuTorchTrainer,
    Manifest,
    ManifestError,
    ManifestVersionError,
    OnnxInference,
)
from edge_runtime.artifacts.manifest import MANIFEST_FILE, sha256_path

from tests.export.export_helpers import token_ids


def _open(directory, artifact):
    if artifact == "onnx":
        return OnnxInference(directory)
    if artifact == "pte-train":
        return ExecuTorchTrainer(directory)
    return ExecuTorchInference(directory, artifact)


def _rewrite_manifest(directory, change) -> None:
    data = json.loads((directory / MANIFEST_FILE).read_text())
    change(data)
    (directory / MANIFEST_FILE).write_text(json.dumps(data))


def _rehash(directory, file) -> None:
    def change(data):
        data["files"][file] = {"sha256": sha256_path(directory / file), "bytes": (directory / file).stat().st_size}
    _rewrite_manifest(directory, change)


@pytest.mark.parametrize(("artifact", "role"), [("pte", "program"), ("pte-xnnpack", "data"), ("pte-train", "data"),
                                                ("onnx", "model"), ("onnx", "data"), ("onnx", "base_data")])
def test_flipped_byte_is_refused(llama_export, artifact_copy, artifact, role):
    directory = artifact_copy(llama_export)
    path = Manifest.load(directory).path(artifact, role)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(ArtifactIntegrityError, match="sha256 .* does not match"):
        _open(directory, artifact)
    assert cli.main(["export", "verify", str(directory)]) == 2


def test_truncated_and_missing_files_are_refused(gpt2_export, artifact_copy):
    directory = artifact_copy(gpt2_export)
    manifest = Manifest.load(directory)
    program = manifest.path("pte", "program")
    program.write_bytes(program.read_bytes()[:-100])
    with pytest.raises(ArtifactIntegrityError, match="truncated"):
        ExecuTorchInference(directory, "pte")
    manifest.path("onnx", "data").unlink()
    with pytest.raises(ArtifactIntegrityError, match="missing"):
        OnnxInference(directory)


def test_manifest_format_version_mismatch(gpt2_export, artifact_copy):
    directory = artifact_copy(gpt2_export)
    _rewrite_manifest(directory, lambda d: d.update(format_version=99))
    with pytest.raises(ManifestVersionError, match="format_version 99"):
        ExecuTorchInference(directory, "pte")


def test_program_from_another_export_is_refused(llama_export, gpt2_export, artifact_copy):
    """Even with the hash 'fixed' in the manifest, the program's embedded export id gives it away."""
    directory = artifact_copy(gpt2_export)
    manifest = Manifest.load(directory)
    shutil.copyfile(llama_export.manifest.path("pte", "program"), manifest.path("pte", "program"))
    _rehash(directory, manifest.artifact("pte")["files"]["program"])
    with pytest.raises(ManifestVersionError, match="belongs to export"):
        ExecuTorchInference(directory, "pte")


def test_onnx_model_with_foreign_identity_is_refused(gpt2_export, artifact_copy):
    import onnx

    directory = artifact_copy(gpt2_export)
    path = Manifest.load(directory).path("onnx", "model")
    proto = onnx.load(str(path), load_external_data=False)
    for entry in proto.metadata_props:
        if entry.key == "comigs.export_id":
            entry.value = "12345"
    onnx.save_model(proto, str(path))
    _rehash(directory, path.name)
    with pytest.raises(ManifestVersionError, match="belongs to export"):
        OnnxInference(directory)


def test_malformed_manifests(gpt2_export, artifact_copy, tmp_path):
    with pytest.raises(ManifestError, match="not a comigs export directory"):
        Manifest.load(tmp_path)
    directory = artifact_copy(gpt2_export)
    (directory / MANIFEST_FILE).write_text("{ not json")
    with pytest.raises(ManifestError, match="not valid JSON"):
        Manifest.load(directory)


def test_manifest_cannot_point_outside_its_directory(gpt2_export, artifact_copy):
    directory = artifact_copy(gpt2_export)

    def escape(data):
        data["artifacts"]["pte"]["files"]["program"] = "../outside.pte"
        data["files"]["../outside.pte"] = {"sha256": "0" * 64, "bytes": 1}
    _rewrite_manifest(directory, escape)
    with pytest.raises(ManifestError, match="invalid file"):
        ExecuTorchInference(directory, "pte")


def test_missing_artifact_is_named(gpt2_export, artifact_copy):
    directory = artifact_copy(gpt2_export)
    _rewrite_manifest(directory, lambda d: d["artifacts"].pop("pte-xnnpack"))
    with pytest.raises(ManifestError, match=r"no 'pte-xnnpack' artifact \(it has: onnx, pte, pte-train\)"):
        ExecuTorchInference(directory, "pte-xnnpack")


def test_inputs_outside_the_exported_shapes(gpt2_export):
    with ExecuTorchInference(gpt2_export.directory, "pte-xnnpack") as program:
        with pytest.raises(ArtifactInputError, match="batch 1"):
            program.logits(token_ids((2, 4), 0))
        with pytest.raises(ArtifactInputError, match="outside the exported range"):
            program.logits(token_ids((1, 65), 0))
        with pytest.raises(ArtifactInputError, match=r"token ids must be in \[0, 96\)"):
            program.logits(token_ids((1, 4), 0) + 96)
        with pytest.raises(ArtifactInputError, match="integer token ids"):
            program.logits(token_ids((1, 4), 0).float())


@pytest.mark.parametrize("artifact", ["pte-xnnpack", "onnx"])
@pytest.mark.parametrize(("positions", "message"), [
    ([4], r"positions must be in \[0, 4\) for a sequence of 4 tokens, got \[4, 4\]"),
    ([-1], r"got \[-1, -1\]"),
    (torch.zeros(0, dtype=torch.long), r"1-D list of 1 to 64 positions, got shape \(0,\)"),
    ([[0, 1]], "1-D list"),
    ([0.0, 1.0], "integer sequence positions"),
])
def test_logit_positions_outside_the_sequence(gpt2_export, artifact, positions, message):
    with _open(gpt2_export.directory, artifact) as program:
        with pytest.raises(ArtifactInputError, match=message):
            program.logits(token_ids((1, 4), 0), positions)
