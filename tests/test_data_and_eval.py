"""Token splits and whole-split perplexity."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from edge_runtime.data.tokens import DataError, TokenSplit, load_splits
from edge_runtime.evaluation import perplexity

from tests.builders import VOCAB, tiny_comigs


@pytest.mark.parametrize(("n", "seq_len", "batch"), [(101, 10, 3), (100, 10, 4), (7, 10, 2)])
def test_windows_cover_every_target_exactly_once(n, seq_len, batch):
    split = TokenSplit(np.arange(n))
    seen = []
    for inputs, targets in split.windows(seq_len, batch):
        assert torch.equal(targets, inputs + 1)
        seen.extend(targets.reshape(-1).tolist())
    assert seen == list(range(1, n))


def test_perplexity_of_uniform_model_is_vocab_size():
    model = tiny_comigs("llama", n_generalists=1, n_specialists=0)
    with torch.no_grad():
        model.lm_head.weight.zero_()  # tied: zero logits everywhere
    result = perplexity(model, TokenSplit(np.arange(50) % VOCAB), seq_len=8)
    assert result.tokens == 49
    assert result.perplexity == pytest.approx(VOCAB, rel=1e-5)
    assert result.nll == pytest.approx(math.log(VOCAB), rel=1e-6)


def test_perplexity_restores_training_mode():
    model = tiny_comigs("llama").train()
    perplexity(model, TokenSplit(np.arange(30)), seq_len=8)
    assert model.training


def test_sampling_is_seeded():
    split = TokenSplit(np.arange(1000))
    a = split.sample(4, 16, torch.Generator().manual_seed(1))
    b = split.sample(4, 16, torch.Generator().manual_seed(1))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], a[0] + 1)


def test_bad_token_data_is_explained(tmp_path):
    with pytest.raises(DataError, match="1-D"):
        TokenSplit(np.zeros((2, 2), dtype=np.int64))
    with pytest.raises(DataError, match="integers"):
        TokenSplit(np.zeros(5, dtype=np.float32))
    with pytest.raises(DataError, match="does not exist"):
        TokenSplit.load(tmp_path / "train.npy")
    (tmp_path / "train.npy").write_bytes(b"garbage")
    with pytest.raises(DataError, match="not a readable"):
        TokenSplit.load(tmp_path / "train.npy")
    with pytest.raises(DataError, match="fewer than one window"):
        TokenSplit(np.arange(5)).sample(1, 16, torch.Generator())
    with pytest.raises(DataError, match="outside the model's vocabulary"):
        TokenSplit(np.array([1, 500])).check_vocab(VOCAB)
    with pytest.raises(DataError, match="does not exist"):
        load_splits(tmp_path / "missing")
