"""The exporters' grouped-query attention: HF's values exactly, without copies of keys and values."""

from __future__ import annotations

import pytest
import torch

from export import grouped_attention
from export.prepare import prepare_for_export

from tests.builders import tiny_base, tiny_comigs


def _logits(model: torch.nn.Module, implementation: str, ids: torch.Tensor,
            mask: torch.Tensor | None) -> torch.Tensor:
    model.set_attn_implementation(implementation)
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


@pytest.mark.parametrize("padded", [False, True])
def test_equals_hf_explicit_attention(padded):
    model = tiny_base("llama", layers=3)
    ids = torch.randint(0, 96, (2, 19), generator=torch.Generator().manual_seed(0))
    mask = None
    if padded:
        mask = torch.ones(2, 19, dtype=torch.long)
        mask[1, :6] = 0
    name = grouped_attention.register()
    assert torch.equal(_logits(model, name, ids, mask), _logits(model, "eager", ids, mask))
    assert grouped_attention._last_tiled is None  # the tiled mask went with the forward's mask


def test_gradients_equal_hf_explicit_attention():
    model = tiny_base("llama")
    ids = torch.randint(0, 96, (1, 11), generator=torch.Generator().manual_seed(1))
    grads = []
    for implementation in (grouped_attention.register(), "eager"):
        model.zero_grad()
        model.set_attn_implementation(implementation)
        model(input_ids=ids).logits.square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=0, atol=1e-6, msg=name)


def test_export_selects_it_for_grouped_heads_only():
    llama = tiny_comigs("llama", n_generalists=1, n_specialists=1)
    gpt2 = tiny_comigs("gpt2", n_generalists=1, n_specialists=1)
    prepare_for_export(llama)
    prepare_for_export(gpt2)
    assert llama.config._attn_implementation == grouped_attention.NAME
    assert gpt2.config._attn_implementation == "eager"


def test_traced_graph_has_no_key_value_copies():
    """HF's repeat_kv is an expand + copy per key and value tensor; the folded form has none, and the
    mask is tiled once for all layers (two concatenations: query groups, KV heads)."""
    model = tiny_base("llama", layers=3)
    ids = torch.zeros(1, 8, dtype=torch.long)
    counts = {}
    for implementation in ("eager", grouped_attention.register()):
        model.set_attn_implementation(implementation)
        graph = torch.export.export(model, (), {"input_ids": ids, "use_cache": False}, strict=False).graph
        targets = [n.target for n in graph.nodes if n.op == "call_function"]
        counts[implementation] = (targets.count(torch.ops.aten.expand.default),
                                  targets.count(torch.ops.aten.cat.default))
    eager_expands, _ = counts["eager"]
    expands, cats = counts[grouped_attention.NAME]
    assert eager_expands - expands >= 2 * 3  # keys and values of every layer
    assert cats == counts["eager"][1] + 2
