"""The last block computes only the rows whose logits were asked for (export/last_block.py)."""

from __future__ import annotations

import pytest
import torch

from edge_runtime.model.inject import decoder_layers
from export.prepare import InferenceModule, prepare_for_export

from tests.builders import randomize_experts, tiny_comigs


def _model(arch: str) -> torch.nn.Module:
    model = tiny_comigs(arch, n_generalists=1, n_specialists=1, rank=4)
    randomize_experts(model)
    prepare_for_export(model)
    return model


def _rows_into_last_mlp(model: torch.nn.Module, ids: torch.Tensor, positions: list[int]) -> tuple[torch.Tensor, int]:
    seen: list[int] = []
    hook = decoder_layers(model)[-1].mlp.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[1]))
    try:
        with torch.no_grad():
            logits = InferenceModule(model)(ids, torch.tensor(positions))
    finally:
        hook.remove()
    return logits, seen[0]


@pytest.mark.parametrize("positions", [[8], [2, 0, 8, 2], list(range(9))])
def test_llama_last_block_runs_only_the_asked_rows_and_matches_hf(positions):
    model = _model("llama")
    ids = torch.randint(0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(input_ids=ids, use_cache=False).logits
    logits, rows = _rows_into_last_mlp(model, ids, positions)
    assert rows == len(positions)
    assert torch.allclose(logits, full[:, positions], atol=1e-5, rtol=0)
    assert "forward" not in vars(decoder_layers(model)[-1]), "the layer's own forward is restored"


def test_gpt2_keeps_hf_selection_at_the_head():
    """GPT-2's model forward reshapes the last hidden states to the input length: no pruning."""
    model = _model("gpt2")
    ids = torch.randint(0, model.config.vocab_size, (1, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(input_ids=ids, use_cache=False).logits
    logits, rows = _rows_into_last_mlp(model, ids, [8, 3])
    assert rows == 9
    assert torch.allclose(logits, full[:, [8, 3]], atol=1e-5, rtol=0)
