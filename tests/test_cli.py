"""The `comigs` command line, end to end on a tiny model saved to disk."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from edge_runtime.cli import main

from tests.builders import synthetic_language, tiny_base


@pytest.fixture
def model_dir(tmp_path):
    path = tmp_path / "model"
    tiny_base("llama").save_pretrained(path)
    return path


@pytest.fixture
def data_dir(tmp_path):
    path = tmp_path / "data"
    path.mkdir()
    for i, (name, n) in enumerate({"train": 3000, "valid": 600, "test": 600}.items()):
        np.save(path / f"{name}.npy", synthetic_language(n, seed=i).astype(np.uint16))
    return path


def test_help_lists_every_command():
    out = subprocess.run([sys.executable, "-m", "edge_runtime.cli", "--help"], capture_output=True, text=True,
                         check=True).stdout
    for command in ("demo", "train", "eval", "sync"):
        assert command in out


def test_train_then_eval_then_resume(model_dir, data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    common = ["--model", str(model_dir), "--data", str(data_dir), "--experts", "1,2", "--batch-size", "4",
              "--micro-batch-size", "2", "--seq-len", "16", "--router-every", "2", "--router-steps", "1"]
    assert main(["train", *common, "--out", str(out), "--steps", "3", "--save-every", "2"]) == 0
    assert (out / "adapters" / "adapter_config.json").is_file()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["phase"] for r in records] == ["experts", "experts", "router", "experts"]

    assert main(["eval", "--model", str(model_dir), "--adapters", str(out / "adapters"),
                 "--data", str(data_dir), "--seq-len", "16"]) == 0
    trained = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert main(["eval", "--model", str(model_dir), "--data", str(data_dir), "--seq-len", "16"]) == 0
    base = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert trained["tokens"] == base["tokens"] == 599
    assert trained["perplexity"] != base["perplexity"]

    assert main(["train", *common, "--out", str(out), "--steps", "5", "--resume"]) == 0
    config = json.loads((out / "adapters" / "adapter_config.json").read_text())
    assert config["metadata"]["step"] == 5


@pytest.mark.parametrize(("extra", "message"), [
    (["--experts", "0,0"], "at least one expert"),
    (["--rank", "0"], "rank must be a positive integer"),
    (["--experts", "two"], "G,S"),
])
def test_train_reports_bad_input_clearly(model_dir, data_dir, tmp_path, capsys, extra, message):
    code = main(["train", "--model", str(model_dir), "--data", str(data_dir), "--out", str(tmp_path / "r"), *extra])
    assert code == 2
    assert message in capsys.readouterr().err


def test_missing_data_and_model_are_explained(model_dir, data_dir, tmp_path, capsys):
    assert main(["train", "--model", str(model_dir), "--data", str(tmp_path / "none"), "--out", str(tmp_path)]) == 2
    assert "data directory" in capsys.readouterr().err
    assert main(["eval", "--model", str(tmp_path / "missing.gguf"), "--data", str(data_dir)]) == 2
    assert "GGUF file" in capsys.readouterr().err


def test_resume_without_state_is_refused(model_dir, data_dir, tmp_path, capsys):
    code = main(["train", "--model", str(model_dir), "--data", str(data_dir), "--out", str(tmp_path / "new"),
                 "--resume"])
    assert code == 2 and "no trainer_state.pt" in capsys.readouterr().err


def test_demo_trains_on_the_standard_library_and_reports_both_perplexities(tmp_path, capsys):
    """`comigs demo` end to end, on a tiny Llama with a byte tokenizer instead of SmolLM2."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.data.data_helpers import byte_tokenizer

    model_dir = tmp_path / "byte-llama"
    tokenizer = byte_tokenizer()
    torch_model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, eos_token_id=tokenizer.eos_token_id))
    torch_model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    out = tmp_path / "demo"
    assert main(["demo", "--model", str(model_dir), "--out", str(out), "--corpus-chars", "60000", "--steps", "3",
                 "--batch-size", "2", "--micro-batch-size", "2", "--seq-len", "32", "--router-every", "2",
                 "--router-steps", "1"]) == 0
    printed = capsys.readouterr().out
    assert "[5/5]" in printed and "CoMiGS-1G1S" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["test_tokens"] > 0
    assert np.isfinite(summary["base_test_perplexity"]) and np.isfinite(summary["comigs_test_perplexity"])
    assert summary["comigs_test_perplexity"] != summary["base_test_perplexity"]
    assert (out / "adapters" / "adapter_config.json").is_file()
    assert {p.name for p in (out / "data").glob("*.npy")} == {"train.npy", "valid.npy", "test.npy"}
