"""`comigs export` end to end on a tiny model directory: manifest contents, verify, overwrite."""

from __future__ import annotations

import json

import torch

from edge_runtime import cli, roles
from edge_runtime.artifacts import ExecuTorchInference, Manifest, OnnxInference
from edge_runtime.artifacts.manifest import FORMAT_VERSION, sha256_path
from edge_runtime.model.adapters import save_adapters
from edge_runtime.model.factory import build_comigs_model

from tests.builders import randomize_experts, tiny_base, tiny_comigs
from tests.export.export_helpers import eager_logits, max_diff, token_ids


def test_help_explains_formats_and_swapping(capsys):
    try:
        cli.main(["export", "--help"])
    except SystemExit as exc:
        assert exc.code == 0
    text = capsys.readouterr().out
    for word in ("pte-xnnpack", "pte-train", "onnx", "swap-experts", "--adapters", "--max-seq-len",
                 "--train-generalists", "--overwrite"):
        assert word in text


def test_export_trained_adapters_and_overwrite(tmp_path, capsys):
    base = tiny_base("llama")
    base.save_pretrained(tmp_path / "base")
    trained = tiny_comigs("llama", n_generalists=1, n_specialists=2, rank=4)
    randomize_experts(trained, seed=3)
    save_adapters(trained, tmp_path / "adapters")
    out = tmp_path / "artifacts"
    assert cli.main(["export", "--model", str(tmp_path / "base"), "--adapters", str(tmp_path / "adapters"),
                     "--out", str(out), "--formats", "pte", "--max-seq-len", "32"]) == 0
    assert "wrote" in capsys.readouterr().out

    manifest = Manifest.load(out)
    data = manifest.data
    assert data["format_version"] == FORMAT_VERSION and data["generation"] == 0
    assert data["comigs"]["n_specialists"] == 2 and data["comigs"]["rank"] == 4
    assert data["base_model"]["model_type"] == "llama" and len(data["base_model"]["weights_sha256"]) == 64
    assert {"torch", "executorch", "onnx", "onnxruntime", "transformers"} <= set(data["tools"])
    assert all(s["source"] == str((tmp_path / "adapters").absolute()) for s in data["experts_source"].values())
    model, _ = build_comigs_model(tmp_path / "base", adapters=tmp_path / "adapters", with_tokenizer=False)
    table = {p["name"]: p for p in data["parameters"]}
    assert set(table) == {n for n, _ in model.named_parameters()}
    for name, param in model.named_parameters():
        assert table[name]["role"] == roles.role_of(name).value
        assert table[name]["shape"] == list(param.shape) and table[name]["dtype"] == "float32"
    for file, entry in data["files"].items():
        assert sha256_path(out / file) == entry["sha256"]
    assert data["artifacts"]["pte"]["verification"]["passed"] is True

    ids = token_ids((1, 12), seed=0)
    with ExecuTorchInference(out, "pte") as program:
        assert max_diff(program.logits(ids), eager_logits(model, ids)) <= 1e-4
    assert cli.main(["export", "verify", str(out)]) == 0

    assert cli.main(["export", "--model", str(tmp_path / "base"), "--adapters", str(tmp_path / "adapters"),
                     "--out", str(out), "--formats", "onnx", "--max-seq-len", "32"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert cli.main(["export", "--model", str(tmp_path / "base"), "--adapters", str(tmp_path / "adapters"),
                     "--out", str(out), "--formats", "onnx", "--max-seq-len", "32", "--overwrite"]) == 0
    replaced = Manifest.load(out)
    assert replaced.artifact_names == ["onnx"] and replaced.export_id != manifest.export_id
    assert sorted(p.name for p in out.iterdir()) == sorted([*replaced.data["files"], "manifest.json"])
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    with OnnxInference(out) as program:
        assert max_diff(program.logits(ids), eager_logits(model, ids)) <= 1e-4
    assert json.loads((out / "manifest.json").read_text())["export_options"]["formats"] == ["onnx"]
    assert torch.is_tensor(ids)
