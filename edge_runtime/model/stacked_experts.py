"""The dense mixture with all experts batched: a few wide kernels per layer instead of a dozen tiny
ones per expert. Used for the ONNX export.

Why this exists: ONNX Runtime runs the per-expert loop of `CoMiGSMLP._mix_dense` as ~14 kernels
per expert and layer, most of them rank-r GEMMs (K or N = r = 8) whose cost is dispatch and
memory passes, not arithmetic. In an ORT profile of SmolLM2 1G1S (1 x 128 prefill, 2 threads) the
loop's kernels took ~80 ms of ~400; this form takes ~45 ms, and the whole prefill got ~4 % faster
(both ad hoc, on the 2-core VM). Here, per layer:

- the A factors of every expert of every input map are one GEMM (`x @ [A_gate_e..., A_up_e...]^T`);
- each input map's B factors are one batched matmul over experts, plus the shared base output;
- the down map's A factors are one batched matmul over the gate-weighted hidden states, and its
  B factors one GEMM with K = E*r, which also sums the experts' deltas.

Layout is expert-major, (E, N, d_ff). Token-major would make the gate-weighted sum one matmul,
but its B factors would need a block-diagonal matrix (E^2 work); and ORT's ReduceSum over the
leading axis is slow (~0.7 ms for 2 x 128 x 1536 against ~0.1 ms for a Mul), so the sum over
experts is written as E - 1 adds.

Experts stay separate parameters: the concatenations happen inside the graph (ORT folds them once
at load; with per-session overrides it recomputes them, a few hundred KB per layer), so every
expert is still its own initializer and can be swapped.

Eager PyTorch and the ExecuTorch programs keep the loop: in eager the two forms prefill SmolLM2 in
the same time (ad hoc, 15 interleaved runs each), the loop is what the training and recompute
paths are validated on, and the training program's graph rewrites expect its matmuls.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

Stacks = tuple[torch.Tensor | None, ...]  # ExpertBank.factor_stacks(): (gen A, gen B, spec A, spec B)


def expert_factor(stacks: Stacks, index: int) -> torch.Tensor:
    """All experts' A (`index` 0) or B (`index` 1) factors in expert order: generalists first."""
    parts = [t for t in (stacks[index], stacks[index + 2]) if t is not None]
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def stacked_mixture(x: torch.Tensor, pre: Sequence[torch.Tensor], gates: torch.Tensor | None,
                    in_stacks: Sequence[Stacks], out_stacks: Stacks,
                    act: Callable[[torch.Tensor], torch.Tensor], scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(hbar, delta) of the dense mixture, equal to `CoMiGSMLP._mix_dense` up to rounding.

    x: (N, d) rows; pre: the base outputs of the input maps, (N, d_ff) each; gates: (N, E) gate
    weights (zeros for unselected experts), None for a single expert without a router.
    """
    n = x.shape[0]
    a_in = torch.cat([expert_factor(s, 0) for s in in_stacks])  # (maps*E, r, d)
    n_experts, rank = a_in.shape[0] // len(in_stacks), a_in.shape[1]
    codes = (F.linear(x, a_in.reshape(-1, a_in.shape[-1])) * scale).view(n, -1, rank).transpose(0, 1)
    z = [torch.bmm(codes[i * n_experts:(i + 1) * n_experts], expert_factor(s, 1).transpose(1, 2)) + p
         for i, (s, p) in enumerate(zip(in_stacks, pre, strict=True))]  # (E, N, d_ff) each
    h = act(z[0]) * z[1] if len(z) == 2 else act(z[0])
    if gates is not None:
        h = h * gates.t().unsqueeze(-1)
    hbar = h[0]
    for e in range(1, n_experts):
        hbar = hbar + h[e]
    a_out, b_out = expert_factor(out_stacks, 0), expert_factor(out_stacks, 1)  # (E, r, d_ff), (E, d, r)
    codes_out = torch.bmm(h, a_out.transpose(1, 2)) * scale  # (E, N, r)
    b_flat = b_out.permute(1, 0, 2).reshape(b_out.shape[1], n_experts * rank)  # (d, E*r)
    delta = codes_out.transpose(0, 1).reshape(n, n_experts * rank) @ b_flat.t()
    return hbar, delta
