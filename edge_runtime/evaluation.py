"""Perplexity over a whole token split, the way the paper reports it."""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from edge_runtime.data.tokens import TokenSplit


@dataclasses.dataclass(frozen=True)
class Perplexity:
    perplexity: float
    nll: float  # mean negative log-likelihood per token (nats)
    tokens: int


@torch.no_grad()
def perplexity(model: nn.Module, split: TokenSplit, seq_len: int = 128, batch_size: int = 8) -> Perplexity:
    """exp(mean NLL) over every token of `split` in non-overlapping windows, fp32 logits.

    Each token is predicted exactly once from at most `seq_len - 1` tokens of context in its
    window; the model's train/eval mode is restored afterwards.
    """
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for inputs, targets in split.windows(seq_len, batch_size):
            logits = model(input_ids=inputs, use_cache=False).logits.float()
            nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum")
            total += float(nll)
            count += targets.numel()
    finally:
        model.train(was_training)
    mean = total / count
    return Perplexity(perplexity=math.exp(mean), nll=mean, tokens=count)
