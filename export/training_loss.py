"""The loss the training program computes: the eager objective, written so a step's LM head
stays small in an ExecuTorch program.

Eager PyTorch and an ExecuTorch program spend memory differently. In eager, `cross_entropy`
over `[tokens, vocab]` logits keeps the logits, their log-softmax and, in the backward, a
gradient of the same size: SmolLM2 at 1 x 128 is 24 MiB each. In the joint ExecuTorch program
every one of those is a planned buffer, and the XNNPACK delegate that multiplies by the
49,152 x 576 head weight materialises the transposed and packed weight (108 MiB each) in its
workspace on every call: 252 MiB of XNNPACK workspace for the head of a one-block model,
measured with heaptrack (`xnn_plan_memory`), on top of ~96 MiB of logits-sized buffers in
the arena.

So the program computes the same cross-entropy over vocabulary *chunks* (`LOSS_CHUNK` rows of
the head weight at a time, `--train-loss-chunk`):

    logits_c = x W_c^T     lse = logsumexp_c(logsumexp(logits_c))     ce = mean(lse - x . W[target])

Autograd of that form needs per chunk only `exp(logits_c - lse_c)`, and multiplies the chunk's
gradient by the chunk's weight rows
(`graph_rewrites.transpose_weights_once` lets the backward slice the weight again rather than
keep the forward's transposed slice). Every matmul then sees a 4,096-row slice: XNNPACK packs
9 MiB per call instead of 108, and no vocabulary-sized gradient exists. The target's logit is
the dot product of the hidden state with the target's row of the head, not a gather from the
logit chunks: a gather's backward is a zero-filled chunk-sized buffer per chunk with one
element per row scattered in, which the program computed for all 12 chunks before the first
chunk's matmul (24 MiB at the arena's peak for SmolLM2, and 12 memsets + scatters a step). The value equals
`F.cross_entropy` up to float summation order (the export's parity check holds it to 1e-5).
"""

from __future__ import annotations

import torch
from torch import nn

from edge_runtime.model.inject import with_balance_loss

LOSS_CHUNK = 4096


def vocab_chunked_cross_entropy(hidden: torch.Tensor, head: nn.Linear, targets: torch.Tensor,
                                chunk: int = LOSS_CHUNK) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean cross-entropy, logits) of `head(hidden)` against `targets`, `chunk` vocabulary rows
    at a time. Every target must be a valid token id (the trainer checks them)."""
    x = hidden.reshape(-1, hidden.shape[-1])
    flat_targets = targets.reshape(-1)
    vocab = head.weight.shape[0]
    # Each row's target logit, without a vocabulary-wide gather; in float32 like the chunks below.
    picked = (_float32(x) * _float32(head.weight[flat_targets])).sum(-1)
    if head.bias is not None:
        picked = picked + _float32(head.bias[flat_targets])
    logits, lses = [], []
    for start in range(0, vocab, chunk):
        stop = min(start + chunk, vocab)
        bias = None if head.bias is None else head.bias[start:stop]
        part = nn.functional.linear(x, head.weight[start:stop], bias)
        part = _float32(part)
        lses.append(torch.logsumexp(part, dim=-1))
        logits.append(part)
    lse = torch.logsumexp(torch.stack(lses, dim=-1), dim=-1)
    ce = (lse - picked).mean()
    return ce, torch.cat(logits, dim=-1).reshape(*hidden.shape[:-1], vocab)


def _float32(t: torch.Tensor) -> torch.Tensor:
    """`t` in float32, untouched when it already is: a no-op `.float()` would still be a copy in the program."""
    return t if t.dtype == torch.float32 else t.float()


class TrainingLossModule(nn.Module):
    """`forward(input_ids, targets) -> (loss, logits)` like `inject.LossModule` (the eager
    reference the export is verified against), with the vocabulary-chunked cross-entropy."""

    def __init__(self, model: nn.Module, chunk: int = LOSS_CHUNK) -> None:
        super().__init__()
        self.model = model
        self.chunk = chunk

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.model.base_model(input_ids=input_ids, use_cache=False).last_hidden_state
        ce, logits = vocab_chunked_cross_entropy(hidden, self.model.get_output_embeddings(), targets, self.chunk)
        loss, _ = with_balance_loss(self.model, ce)
        return loss, logits.detach()
