"""The 1 GB path: bf16 frozen base weights with fp32 experts, model conversion, base-dtype choice."""

from __future__ import annotations

import pytest
import torch

from edge_runtime import cli, roles
from edge_runtime.budget import MB, BudgetError, choose_base_dtype
from edge_runtime.model.config import CoMiGSConfig
from edge_runtime.model.factory import build_comigs_model
from edge_runtime.model.inject import inject_comigs, language_model_loss
from edge_runtime.model.loading import count_base_parameters, load_base_model

from tests.builders import tiny_base


def bf16_comigs(**config) -> torch.nn.Module:
    return inject_comigs(tiny_base("llama").to(torch.bfloat16), CoMiGSConfig(**config))


@pytest.mark.parametrize(("g", "s"), [(1, 0), (1, 1), (1, 3)])
def test_bf16_base_keeps_fp32_experts_and_equals_the_base_at_init(g, s, batch):
    base = tiny_base("llama").to(torch.bfloat16)
    with torch.no_grad():
        expected = base(input_ids=batch[0]).logits
    model = bf16_comigs(n_generalists=g, n_specialists=s)
    for name, param in model.named_parameters():
        assert param.dtype == (torch.float32 if roles.role_of(name) is not roles.Role.FROZEN else torch.bfloat16), name
    with torch.no_grad():
        logits = model(input_ids=batch[0]).logits
    if g + s == 1:
        assert torch.equal(logits, expected)  # one expert: no mixing at all
    else:
        # Mixing sums gate-weighted copies (gates sum to 1) in bf16: equal up to bf16 rounding.
        assert float((logits.float() - expected.float()).abs().max()) <= 0.03 * float(expected.abs().max())


def test_bf16_base_trains_its_fp32_experts(batch):
    model = bf16_comigs(n_generalists=1, n_specialists=3)
    trainable = [p for _, p in roles.named_parameters_by_role(model, *roles.TRAINABLE_ROLES)]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    model.train()
    losses = []
    for _ in range(8):
        loss, ce = language_model_loss(model, *batch, loss_chunk_tokens=8)
        loss.backward()
        assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in trainable)
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(ce))
    assert losses[-1] < losses[0]


def test_convert_writes_a_bf16_directory_that_loads_like_the_source(tmp_path, capsys):
    source = tmp_path / "base"
    tiny_base("llama").save_pretrained(source)
    out = tmp_path / "base-bf16"
    assert cli.main(["model", "convert", "--model", str(source), "--dtype", "bf16", "--out", str(out)]) == 0
    converted, _ = load_base_model(out, with_tokenizer=False, dtype=torch.bfloat16)
    original, _ = load_base_model(source, with_tokenizer=False)
    for (name, a), (_, b) in zip(converted.state_dict().items(), original.state_dict().items(), strict=True):
        assert a.dtype == torch.bfloat16 and torch.equal(a, b.to(torch.bfloat16)), name
    assert count_base_parameters(out) == sum(p.numel() for p in original.parameters())
    model, _ = build_comigs_model(out, CoMiGSConfig(1, 1), with_tokenizer=False, dtype=torch.bfloat16)
    assert model.lm_head.weight.dtype == torch.bfloat16
    assert cli.main(["model", "convert", "--model", str(source), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "comigs model: error:" in err and "already exists" in err
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no staging directory left behind"


def test_base_dtype_follows_the_budget():
    n = 135_000_000
    runtime = 400 * MB
    assert choose_base_dtype(2048, n, gguf=False, runtime_bytes=runtime) == torch.float32
    assert choose_base_dtype(1024, n, gguf=False, runtime_bytes=runtime) == torch.bfloat16
    with pytest.raises(BudgetError, match="comigs model convert"):
        choose_base_dtype(1024, n, gguf=True, runtime_bytes=runtime)
    with pytest.raises(BudgetError, match=r"about \d+ MB are needed"):
        choose_base_dtype(512, n, gguf=False, runtime_bytes=runtime)
