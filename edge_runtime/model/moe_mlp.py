"""The CoMiGS MLP: a frozen base MLP plus a mixture of LoRA experts chosen per token.

Expert e is the base MLP with LoRA on each of its linear maps. The base matmuls run once per
token; each selected expert only adds its low-rank terms. For a gated (Llama) MLP

    g_e = W_g x + s B_g,e A_g,e x      u_e = W_u x + s B_u,e A_u,e x      h_e = act(g_e) * u_e
    y   = sum_e w_e (W_d h_e + s B_d,e A_d,e h_e) = W_d (sum_e w_e h_e) + sum_e w_e s B_d,e A_d,e h_e

so the down projection also runs once, on the gate-weighted hidden state. GPT-2's MLP is the
same with h_e = act(c_fc x + ...) and c_proj as the down map.

Two ways to evaluate the mixture, with identical results:
- *grouped* (k < E): token slots are sorted by expert and each expert only processes its own
  tokens, so the cost does not grow with the number of experts a device holds; one autograd
  Function with a hand-written backward (`grouped_experts.py`);
- *dense* (k = E, and always under torch.export): every expert on every token with zero gates
  for the unselected ones; static shapes, as ExecuTorch and ONNX need. With k = E the gates are
  the router's full softmax (`Router.dense_gates`: no sort, no scatter) unless routing is being
  recorded, which needs the expert indices. With `stack_experts`
  (set for the ONNX export) the same mixture runs with all experts batched
  (`stacked_experts.py`): fewer, wider kernels, which is what ONNX Runtime needs.
The per-expert hidden states (the only activations that scale with k) are recomputed in the
backward pass instead of being saved: always on the grouped path, and on the dense path when
`recompute_experts` is set (by torch's checkpoint).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from edge_runtime import roles
from edge_runtime.model.config import CoMiGSConfig
from edge_runtime.model.grouped_experts import ExpertGroups, grouped_mixture
from edge_runtime.model.lora import ExpertBank, linear_dims
from edge_runtime.model.router import Router
from edge_runtime.model.stacked_experts import stacked_mixture

# (input linears before the activation, output linear, activation attribute)
_GATED = (("gate_proj", "up_proj"), "down_proj", "act_fn")
_PLAIN = (("c_fc",), "c_proj", "act")


def mlp_layout(base: nn.Module) -> tuple[tuple[str, ...], str, str]:
    """Which kind of MLP `base` is: Llama-style gated (gate/up/down) or GPT-2 (c_fc/c_proj)."""
    for layout in (_GATED, _PLAIN):
        names = (*layout[0], layout[1], layout[2])
        if all(hasattr(base, n) for n in names):
            return layout
    raise TypeError(
        f"unsupported MLP {type(base).__name__}: CoMiGS needs a Llama-style MLP "
        "(gate_proj, up_proj, down_proj, act_fn) or a GPT-2 MLP (c_fc, c_proj, act)."
    )


class CoMiGSMLP(nn.Module):
    """Drop-in replacement for a transformer block's MLP (same input and output)."""

    def __init__(self, base: nn.Module, config: CoMiGSConfig) -> None:
        super().__init__()
        self.in_names, self.out_name, self.act_name = mlp_layout(base)
        self.base = base
        self.config = config
        self.n_experts = config.n_experts
        d_model, d_ff = linear_dims(getattr(base, self.in_names[0]))
        self.d_model, self.d_ff = d_model, d_ff
        banks = {name: (d_model, d_ff) for name in self.in_names} | {self.out_name: (d_ff, d_model)}
        self.experts = nn.ModuleDict({
            name: ExpertBank(d_in, d_out, config.n_generalists, config.n_specialists,
                             config.rank, config.scale)
            for name, (d_in, d_out) in banks.items()
        })
        router = (Router(d_model, config.n_experts, config.k, config.target_shares())
                  if config.has_router else None)
        setattr(self, roles.ROUTER_MODULE, router)
        self.force_dense = False
        self.stack_experts = False  # dense path only: all experts batched (see stacked_experts.py)
        self.aux_loss: torch.Tensor | None = None
        # Summed gate weight per expert while recording (see `record_routing`); None: off.
        self.routing_totals: torch.Tensor | None = None

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        x = hidden.reshape(-1, self.d_model)
        pre = tuple(getattr(self.base, name)(x) for name in self.in_names)  # base runs once
        router: Router | None = getattr(self, roles.ROUTER_MODULE)
        exporting = torch.compiler.is_exporting()
        every_expert = router is not None and router.top_k == self.n_experts >= 2
        if router is None:
            gates, self.aux_loss = None, None
        elif every_expert and self.routing_totals is None:
            gates, self.aux_loss = router.dense_gates(x)
        else:
            weights, experts, self.aux_loss = router(x)
            if self.routing_totals is not None:
                self._record(weights, experts)
            if not (self.force_dense or exporting or every_expert):
                hbar, delta = self._mix_grouped(x, weights, experts, *pre)  # recomputes in its own backward
                return self._output(hbar, delta, hidden)
            gates = self._dense_gates(x, weights, experts)
        if self.config.recompute_experts and self.training and torch.is_grad_enabled() and not exporting:
            hbar, delta = checkpoint(self._mix_dense, x, gates, *pre, use_reentrant=False)
        elif self.stack_experts:
            hbar, delta = self._mix_stacked(x, gates, *pre)
        else:
            hbar, delta = self._mix_dense(x, gates, *pre)
        return self._output(hbar, delta, hidden)

    def _output(self, hbar: torch.Tensor, delta: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        out = getattr(self.base, self.out_name)(hbar) + delta
        dropout = getattr(self.base, "dropout", None)  # GPT-2 applies it after c_proj
        if dropout is not None:
            out = dropout(out)
        return out.reshape(hidden.shape)

    @torch.no_grad()
    def _record(self, weights: torch.Tensor, experts: torch.Tensor) -> None:
        self.routing_totals.index_add_(0, experts.reshape(-1), weights.detach().reshape(-1).to(torch.float64))

    def _hidden(self, x: torch.Tensor, pre: Sequence[torch.Tensor], expert: int) -> torch.Tensor:
        """h_e: the expert's activation, from the shared base pre-activations plus its deltas."""
        adjusted = [self.experts[name].add_delta(p, x, expert) for p, name in zip(pre, self.in_names, strict=True)]
        h = getattr(self.base, self.act_name)(adjusted[0])
        return h * adjusted[1] if len(adjusted) == 2 else h

    def _mix_dense(self, x: torch.Tensor, gates: torch.Tensor | None,
                   *pre: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out_bank = self.experts[self.out_name]
        hbar = delta = None
        for e in range(self.n_experts):
            h = self._hidden(x, pre, e)
            g = None if gates is None else gates[:, e:e + 1]
            d = out_bank.delta(h, e, gate=g)
            if g is None:
                hbar = h if hbar is None else hbar + h
            else:
                hbar = h * g if hbar is None else torch.addcmul(hbar, h, g)
            delta = d if delta is None else delta + d
        return hbar, delta

    def _mix_stacked(self, x: torch.Tensor, gates: torch.Tensor | None,
                     *pre: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return stacked_mixture(
            x, pre, gates,
            [self.experts[name].factor_stacks(x.dtype) for name in self.in_names],
            self.experts[self.out_name].factor_stacks(x.dtype),
            getattr(self.base, self.act_name), self.config.scale)

    def _dense_gates(self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """(N, E) gate weights with zeros for the experts a token did not select."""
        gates = torch.zeros(x.shape[0], self.n_experts, dtype=x.dtype, device=x.device)
        return gates.scatter(1, experts, weights)

    def _mix_grouped(self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor,
                     *pre: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each expert processes only its own token slots (see `grouped_experts`)."""
        return grouped_mixture(
            x, pre, weights, ExpertGroups.from_experts(experts), self.config.n_generalists,
            [self.experts[name].factor_stacks(x.dtype) for name in self.in_names],
            self.experts[self.out_name].factor_stacks(x.dtype),
            getattr(self.base, self.act_name), self.config.scale)


def record_routing(model: nn.Module, enabled: bool = True) -> None:
    """Start (reset) or stop accumulating each layer's gate weight per expert."""
    for module in model.modules():
        if isinstance(module, CoMiGSMLP):
            module.routing_totals = torch.zeros(module.n_experts, dtype=torch.float64) if enabled else None


def generalist_routing_share(model: nn.Module) -> list[float]:
    """Per layer, the share of gate weight that went to generalist experts since `record_routing`.

    A layer without a router sends everything to its single expert: share 1 if that expert is a
    generalist, else 0. This is the quantity of the paper's routing figure.
    """
    shares = []
    for module in model.modules():
        if not isinstance(module, CoMiGSMLP):
            continue
        n_gen = module.config.n_generalists
        totals = module.routing_totals
        if getattr(module, roles.ROUTER_MODULE) is None or totals is None or float(totals.sum()) == 0:
            shares.append(1.0 if n_gen else 0.0)
        else:
            shares.append(float(totals[:n_gen].sum() / totals.sum()))
    return shares
