"""Next-token cross-entropy without materialising the whole logits tensor.

The LM head is the largest activation of a small model's training step: batch x seq x vocab
floats (SmolLM2: 4 x 128 x 49,152 x 4 B = 100 MB, held three times: logits, log-softmax,
gradient). Computing the loss over chunks of tokens, each chunk's logits recomputed in backward
(checkpointed), bounds that to one chunk's worth. The result equals the plain loss up to float
summation order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


def _chunk_nll_sum(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(hidden).float(), targets, reduction="sum")


def chunked_cross_entropy(hidden: torch.Tensor, head: nn.Module, targets: torch.Tensor,
                          chunk_tokens: int) -> torch.Tensor:
    """Mean CE of `head(hidden)` against `targets`, `chunk_tokens` rows of logits at a time."""
    if chunk_tokens <= 0:
        raise ValueError(f"chunk_tokens must be positive, got {chunk_tokens}")
    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    flat_targets = targets.reshape(-1)
    total = flat_hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, flat_targets.numel(), chunk_tokens):
        h = flat_hidden[start:start + chunk_tokens]
        t = flat_targets[start:start + chunk_tokens]
        total = total + checkpoint(_chunk_nll_sum, head, h, t, use_reentrant=False)
    return total / flat_targets.numel()
