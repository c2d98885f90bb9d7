"""LoRA parameters: one bank of generalist + specialist experts per linear map, and a shared
single LoRA for attention projections.

The base weight is never copied: a bank only holds the low-rank factors and computes the
*delta* `s * B_e (A_e x)`; the caller adds it to the base linear's output, which it computes
once for all experts.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from edge_runtime import roles


def _lora_A(n: int, rank: int, d_in: int) -> nn.Parameter:
    """`n` stacked A factors, each kaiming-uniform(a=sqrt(5)) over its own fan-in like nn.Linear."""
    weight = torch.empty(n, rank, d_in)
    for i in range(n):
        nn.init.kaiming_uniform_(weight[i], a=math.sqrt(5))
    return nn.Parameter(weight)


def _lora_B(n: int, d_out: int, rank: int) -> nn.Parameter:
    """Zero B: every expert starts as the base map, so the injected model equals the base."""
    return nn.Parameter(torch.zeros(n, d_out, rank))


def stack_position(expert: int, n_generalists: int) -> tuple[int, int]:
    """Where expert e's factors live in `ExpertBank.factor_stacks()`: (index of its A stack, row).

    Its B stack follows at index + 1. Expert e < G is generalist e, otherwise specialist e - G.
    """
    return (0, expert) if expert < n_generalists else (2, expert - n_generalists)


class ExpertBank(nn.Module):
    """LoRA factors of all experts of one linear map `d_in -> d_out`.

    Generalists and specialists live in separate parameters (named by the roles contract) so
    each group is a named tensor in every export format and on the wire; expert `e` is
    generalist `e` for `e < G`, specialist `e - G` otherwise.
    """

    def __init__(self, d_in: int, d_out: int, n_generalists: int, n_specialists: int,
                 rank: int, scale: float) -> None:
        super().__init__()
        self.d_in, self.d_out, self.rank, self.scale = d_in, d_out, rank, scale
        self.n_generalists, self.n_specialists = n_generalists, n_specialists
        if n_generalists:
            setattr(self, roles.GENERALIST_A, _lora_A(n_generalists, rank, d_in))
            setattr(self, roles.GENERALIST_B, _lora_B(n_generalists, d_out, rank))
        if n_specialists:
            setattr(self, roles.SPECIALIST_A, _lora_A(n_specialists, rank, d_in))
            setattr(self, roles.SPECIALIST_B, _lora_B(n_specialists, d_out, rank))

    def factors(self, expert: int, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) of one expert, as views (indexing, never concatenating, parameters).

        With `dtype` (the activations' dtype of a base model stored in bf16) the fp32 factors are
        cast for the matmul; their gradients still arrive in fp32. A no-op for fp32 activations.
        """
        at, row = stack_position(expert, self.n_generalists)
        stacks = self.factor_stacks()
        a, b = stacks[at][row], stacks[at + 1][row]
        return (a, b) if dtype in (None, a.dtype) else (a.to(dtype), b.to(dtype))

    def factor_stacks(self, dtype: torch.dtype | None = None) -> tuple[torch.Tensor | None, ...]:
        """(generalist A, generalist B, specialist A, specialist B), None where a group is empty.

        The parameters themselves (cast for a bf16 base model), not a concatenation: a copy
        of every expert's factors per layer would be saved for backward.
        """
        names = (roles.GENERALIST_A, roles.GENERALIST_B, roles.SPECIALIST_A, roles.SPECIALIST_B)
        stacks = [getattr(self, name, None) for name in names]
        return tuple(t if t is None or dtype in (None, t.dtype) else t.to(dtype) for t in stacks)

    def delta(self, x: torch.Tensor, expert: int, gate: torch.Tensor | None = None) -> torch.Tensor:
        """`gate * s * B_e (A_e x)`: two skinny matmuls.

        The scale and the optional per-row gate multiply the rank-r code, not the wide output.
        """
        a, b = self.factors(expert, x.dtype)
        return F.linear(self._code(x, a, gate), b)

    def add_delta(self, base_out: torch.Tensor, x: torch.Tensor, expert: int) -> torch.Tensor:
        """`base_out + delta(x)` for 2-D rows, with the add fused into the B matmul (addmm)."""
        a, b = self.factors(expert, x.dtype)
        return torch.addmm(base_out, self._code(x, a, None), b.t())

    def _code(self, x: torch.Tensor, a: torch.Tensor, gate: torch.Tensor | None) -> torch.Tensor:
        return F.linear(x, a) * (self.scale if gate is None else gate * self.scale)

    def extra_repr(self) -> str:
        return (f"d_in={self.d_in}, d_out={self.d_out}, rank={self.rank}, "
                f"generalists={self.n_generalists}, specialists={self.n_specialists}")


def linear_dims(layer: nn.Module) -> tuple[int, int]:
    """(d_in, d_out) of an nn.Linear or a GPT-2 style Conv1D (weight stored as (d_in, d_out))."""
    if isinstance(layer, nn.Linear):
        return layer.in_features, layer.out_features
    weight = getattr(layer, "weight", None)
    if weight is not None and weight.dim() == 2 and hasattr(layer, "nf"):
        return weight.shape[0], weight.shape[1]
    raise TypeError(f"cannot attach LoRA to {type(layer).__name__}: expected nn.Linear or Conv1D.")


class SharedLoRALinear(nn.Module):
    """A frozen linear plus one LoRA shared like a generalist (the optional attention LoRA)."""

    def __init__(self, base: nn.Module, rank: int, scale: float) -> None:
        super().__init__()
        d_in, d_out = linear_dims(base)
        self.base = base
        self.bank = ExpertBank(d_in, d_out, 1, 0, rank, scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.bank.delta(x, 0)
