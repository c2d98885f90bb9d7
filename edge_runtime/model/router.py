"""The per-token router of one MoE layer: gating weights and the load-balancing loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Router(nn.Module):
    """`Linear(d_model, E, bias=False)` on the MLP input, init N(0, 0.02).

    Top-k gating with k >= 2 renormalises a softmax over the selected logits (weights sum to 1).
    For k = 1 a renormalised softmax is the constant 1 and gives the router no gradient; the
    usual fix (Switch) multiplies the expert by its full-softmax probability p < 1, which would
    shrink a *pretrained* MLP's output at init. We instead use a straight-through gate
    `p - stop_grad(p) + 1`: its value is exactly 1 (the model equals the base at init) and its
    gradient is that of p.
    """

    def __init__(self, d_model: int, n_experts: int, top_k: int, target_shares: list[float]) -> None:
        super().__init__()
        if len(target_shares) != n_experts:
            raise ValueError(f"need {n_experts} target shares, got {len(target_shares)}")
        self.n_experts, self.top_k = n_experts, top_k
        self.weight = nn.Parameter(torch.empty(n_experts, d_model).normal_(0.0, 0.02))
        self.register_buffer("target_shares", torch.tensor(target_shares), persistent=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: (N, d) -> gate weights (N, k), expert indices (N, k), load-balancing loss ()."""
        logits = self._logits(x)
        probs = torch.softmax(logits, dim=-1)
        top_logits, experts = torch.topk(logits, self.top_k, dim=-1)
        if self.top_k == 1:
            p = probs.gather(-1, experts)
            weights = p - p.detach() + 1.0
        else:
            weights = torch.softmax(top_logits, dim=-1)
        return weights.to(x.dtype), experts, self.balance_loss(probs, experts)

    def dense_gates(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k = E >= 2: x (N, d) -> gates (N, E), load-balancing loss ().

        Every expert is selected for every token, so the renormalised top-k softmax is the full
        softmax in sorted order and scattering it back by expert index gives the full softmax
        itself: the same gates and loss as `forward` followed by a scatter, without the sort and
        the scatter (in an ExecuTorch program both are portable, single-threaded kernels that
        split the XNNPACK-delegated graph of every block).
        """
        if self.top_k != self.n_experts or self.n_experts < 2:
            raise ValueError(f"dense_gates needs k = E >= 2, this router has k = {self.top_k}, E = {self.n_experts}")
        probs = torch.softmax(self._logits(x), dim=-1)
        every_slot = torch.full_like(self.target_shares, 1.0 / self.n_experts)  # f_e of `balance_loss`
        return probs.to(x.dtype), self._balance(every_slot, probs)

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        """(N, E) float32 router logits (the weight cast to a bf16 base model's activations)."""
        weight = self.weight if self.weight.dtype == x.dtype else self.weight.to(x.dtype)
        return F.linear(x, weight).float()

    def balance_loss(self, probs: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """Switch-style `sum_e f_e * P_e / t_e` with target shares t (minimum 1 at f = P = t).

        f_e is the share of token slots dispatched to e (not differentiable), P_e the mean
        full-softmax probability, both over the router's real input. For uniform t this is the
        Switch loss E * sum f_e P_e. When k = E every expert gets every token, f is uniform and
        the loss only moves P towards t.
        """
        dispatched = F.one_hot(experts, self.n_experts).sum(dim=(0, 1)).to(probs.dtype)
        return self._balance(dispatched / experts.numel(), probs)

    def _balance(self, f: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        return (f * probs.mean(dim=0) / self.target_shares).sum()
