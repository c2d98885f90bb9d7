"""The matmul floor of `benchmarks/bench_export.py`: the right linears, timed in every runtime."""

from __future__ import annotations

import importlib.util
from collections import Counter
from pathlib import Path

import pytest
from torch import nn
from transformers.pytorch_utils import Conv1D

from edge_runtime import roles
from export.manifest import parameter_table

from tests.builders import tiny_comigs

_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "gemm_floor.py"
_SPEC = importlib.util.spec_from_file_location("gemm_floor", _PATH)
gemm_floor = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(gemm_floor)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_the_floor_counts_every_frozen_linear_of_a_forward_including_a_tied_head(arch: str) -> None:
    model = tiny_comigs(arch, n_generalists=1, n_specialists=2)
    names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
    expected: Counter[tuple[int, int]] = Counter()
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if weight is None or roles.role_of(names[id(weight)]) is not roles.Role.FROZEN:
            continue
        if isinstance(module, nn.Linear):
            expected[tuple(weight.shape)] += 1
        elif isinstance(module, Conv1D):  # GPT-2 stores [in, out]
            expected[(weight.shape[1], weight.shape[0])] += 1
    assert model.config.tie_word_embeddings  # the head is the embedding: counted once, apart
    head = (model.config.vocab_size, model.config.hidden_size if arch == "llama" else model.config.n_embd)
    expected[head] -= 1
    assert gemm_floor.prefill_linears(parameter_table(model)) == (+expected, head)


def test_a_prefill_runs_the_head_on_its_head_tokens_only() -> None:
    parameters = [{"name": "model.layers.0.mlp.up_proj.weight", "role": "frozen", "shape": [24, 16]},
                  {"name": "lm_head.weight", "role": "frozen", "shape": [40, 16]}]
    floor = gemm_floor.prefill_floor("eager", parameters, tokens=8, head_tokens=1, threads=1)
    assert set(floor["per_shape_s"]) == {"24x16", "head 40x16 x 1 tokens"}
    assert floor["seconds"] == pytest.approx(sum(floor["per_shape_s"].values()))
    assert floor["gflop"] == pytest.approx(2 * (8 * 24 * 16 + 1 * 40 * 16) / 1e9)


@pytest.mark.parametrize("runtime", ["eager", "executorch_xnnpack", "onnxruntime"])
def test_each_runtime_times_every_shape(runtime: str) -> None:
    linears = Counter({(24, 16): 3, (16, 24): 1})
    floor = gemm_floor.gemm_floor(runtime, linears, tokens=8, threads=1)
    assert set(floor["per_shape_s"]) == {"24x16", "16x24"}
    assert all(s > 0 for s in floor["per_shape_s"].values())
    expected = 3 * floor["per_shape_s"]["24x16"] + floor["per_shape_s"]["16x24"]
    assert floor["seconds"] == pytest.approx(expected)
    assert floor["gflop"] == pytest.approx(2 * 8 * (3 * 24 * 16 + 16 * 24) / 1e9)


def test_unknown_runtimes_and_manifests_without_linears_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown runtime 'tflite'"):
        gemm_floor.gemm_floor("tflite", Counter({(4, 4): 1}), tokens=2, threads=1)
    with pytest.raises(ValueError, match="no frozen linear weights of a known layout"):
        gemm_floor.prefill_linears([{"name": "a.lora_A", "role": "generalist", "shape": [4, 4]}])
