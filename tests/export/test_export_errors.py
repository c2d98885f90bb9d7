"""Bad exports fail early and clearly, and never leave half-written artifacts behind."""

from __future__ import annotations

import pytest

from edge_runtime import cli
from export.errors import ExportError
from export.pipeline import ExportOptions, export_artifacts

from tests.builders import VOCAB, tiny_base, tiny_comigs


def _leftovers(parent):
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_unsupported_model_via_cli(tmp_path, capsys):
    from transformers import BertConfig, BertLMHeadModel

    BertLMHeadModel(BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=32, is_decoder=True)).save_pretrained(tmp_path / "bert")
    assert cli.main(["export", "--model", str(tmp_path / "bert"), "--out", str(tmp_path / "out")]) == 2
    assert "unsupported architecture 'bert'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []


def test_model_without_experts(tmp_path):
    with pytest.raises(ValueError, match="no CoMiGS experts"):
        export_artifacts(tiny_base("llama"), tmp_path / "out", ExportOptions(formats=("pte",)))


def test_unwritable_output(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(ExportError, match="cannot write the output directory"):
        export_artifacts(tiny_comigs("gpt2"), blocker / "out", ExportOptions(formats=("pte",)))
    assert cli.main(["export", "--model", str(tmp_path), "--out", str(blocker / "out")]) == 2
    assert "cannot write the output directory" in capsys.readouterr().err


def test_existing_output_needs_overwrite(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    with pytest.raises(ExportError, match="already exists .* --overwrite"):
        export_artifacts(tiny_comigs("gpt2"), tmp_path / "out", ExportOptions(formats=("pte",)))
    assert (tmp_path / "out" / "keep.txt").read_text() == "x"


@pytest.mark.parametrize(("options", "message"), [
    (dict(formats=("pte", "tflite")), r"unknown format\(s\) \['tflite'\]"),
    (dict(formats=("pte", "pte")), "listed twice"),
    (dict(max_seq_len=1), ">= 2"),
    (dict(batch=0), "batch must be >= 1"),
])
def test_bad_options(options, message):
    with pytest.raises(ExportError, match=message):
        ExportOptions(**options)


def test_sequence_longer_than_the_model(tmp_path):
    with pytest.raises(ExportError, match="exceeds the model's 256 positions"):
        export_artifacts(tiny_comigs("gpt2"), tmp_path / "out", ExportOptions(formats=("onnx",), max_seq_len=1024))
    assert _leftovers(tmp_path) == []


def test_failure_after_files_were_written_leaves_nothing(tmp_path, monkeypatch):
    """ONNX files are already in the staging directory when the (third-party) checker fails."""
    import onnx

    def broken_checker(*args, **kwargs):
        raise onnx.checker.ValidationError("simulated checker failure")

    monkeypatch.setattr(onnx.checker, "check_model", broken_checker)
    with pytest.raises(onnx.checker.ValidationError):
        export_artifacts(tiny_comigs("gpt2"), tmp_path / "out", ExportOptions(formats=("onnx",), max_seq_len=16))
    assert not (tmp_path / "out").exists()
    assert _leftovers(tmp_path) == []


def test_nothing_to_train(tmp_path):
    with pytest.raises(ExportError, match="nothing to train"):
        export_artifacts(tiny_comigs("llama", n_generalists=1, n_specialists=0), tmp_path / "out",
                         ExportOptions(formats=("pte-train",), train_seq_len=8))
    assert _leftovers(tmp_path) == []
