"""Shared fixtures; model and data builders live in tests/builders.py."""

from __future__ import annotations

import pytest
import torch

from tests.builders import VOCAB


@pytest.fixture
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, VOCAB, (2, 17), generator=g)
    return tokens[:, :-1], tokens[:, 1:]
