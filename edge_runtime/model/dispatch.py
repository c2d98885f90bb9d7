"""Moving rows between token order and expert order without scatter kernels.

Top-k routing gives every token k slots; grouping the slots by expert lets each expert run
one matmul over exactly its own rows. The reordering is a permutation, so both directions are
plain row gathers (`index_select`) in forward *and* backward; autograd's generic backward of a
gather would be a scatter-add (`index_add`), which on CPU is several times slower and was the
largest cost of holding many experts.
"""

from __future__ import annotations

import dataclasses

import torch
from torch.autograd import Function


@dataclasses.dataclass(frozen=True)
class SlotOrder:
    """Token slots sorted by expert. Sorted row i is slot `order[i]` = token `tokens[i]`."""

    tokens: torch.Tensor  # (N*k,) token of each sorted row
    inverse: torch.Tensor  # (N*k,) sorted row of each slot (slot id = token * k + j)
    order: torch.Tensor  # (N*k,) slot id of each sorted row
    counts: list[int]  # rows per expert, in expert order
    k: int

    @classmethod
    def from_experts(cls, experts: torch.Tensor, n_experts: int) -> SlotOrder:
        k = experts.shape[1]
        flat = experts.reshape(-1)
        order = torch.argsort(flat, stable=True)
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        counts = torch.bincount(flat, minlength=n_experts).tolist()
        return cls(torch.div(order, k, rounding_mode="floor"), inverse, order, counts, k)

    def dispatch(self, x: torch.Tensor) -> torch.Tensor:
        """(N, ...) token rows -> (N*k, ...) rows in expert order."""
        return _Dispatch.apply(x, self.tokens, self.inverse, self.k)

    def combine(self, y: torch.Tensor) -> torch.Tensor:
        """(N*k, ...) rows in expert order -> (N, ...) token rows, summed over each token's slots."""
        return _Combine.apply(y, self.tokens, self.inverse, self.k)


class _Dispatch(Function):
    @staticmethod
    def forward(ctx, x, tokens, inverse, k):
        ctx.save_for_backward(inverse)
        ctx.k = k
        return x.index_select(0, tokens)

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        per_slot = grad.index_select(0, inverse)
        return per_slot.view(-1, ctx.k, *grad.shape[1:]).sum(1), None, None, None


class _Combine(Function):
    @staticmethod
    def forward(ctx, y, tokens, inverse, k):
        ctx.save_for_backward(tokens)
        per_slot = y.index_select(0, inverse)
        return per_slot.view(-1, k, *y.shape[1:]).sum(1)

    @staticmethod
    def backward(ctx, grad):
        (tokens,) = ctx.saved_tensors
        return grad.index_select(0, tokens), None, None, None
