"""Grouped-query attention without copying keys and values: the attention the exporters trace.

HF's explicit ("eager") attention serves grouped-query models (SmolLM2: 9 query heads, 3 KV heads)
by `repeat_kv`: every key and value head is expanded to its group of query heads and copied. In
eager PyTorch the copy is cheap; in an ExecuTorch program it is a portable, single-threaded
`expand_copy` per tensor per block (60 in SmolLM2's prefill), and its backward in the training
program is a portable `sum`. Folding the group's query heads into the sequence axis instead,

    q[b, kv * rep + r, t, :]  ->  q[b, kv, r * T + t, :]

makes every query head of a group attend to its one shared key/value head with a single batched
matmul over the KV heads: the same products in the same order, no copies, and one wide matmul per
KV head instead of `rep` narrow ones. The matmuls are 3-D `bmm` over (batch x KV heads), so every
reshape has one dynamic dimension (XNNPACK delegates those, not views with two), and the causal
mask is tiled to the scores' layout once per forward (every layer receives the same mask tensor);
adding it with a broadcast over a 5-D view instead would make torch.export guard on the dynamic
sequence length.

Registered with transformers' attention interfaces as `comigs_grouped` and selected by
`export.prepare.prepare_for_export` for models with fewer KV heads than query heads; models without
grouped heads (GPT-2) keep the explicit implementation, which this one equals for rep = 1.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import nn

NAME = "comigs_grouped"


def grouped_query_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            attention_mask: torch.Tensor | None, scaling: float, dropout: float = 0.0,
                            **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """`eager_attention_forward`'s contract: query (B, H, T, D), key/value (B, KV, S, D), additive
    mask (B, 1, T, S) or None; returns the output (B, T, H, D) and the weights (B, H, T, S)."""
    b, heads, t, d = query.shape
    kv = key.shape[1]
    rep = heads // kv
    q = query.unflatten(1, (kv, rep)).flatten(2, 3).flatten(0, 1)  # (B * KV, rep * T, D)
    scores = torch.bmm(q, key.flatten(0, 1).transpose(1, 2)) * scaling
    if attention_mask is not None:
        scores = scores + _tiled(attention_mask, kv, rep)
    weights = nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = nn.functional.dropout(weights, p=dropout, training=module.training)
    out = torch.bmm(weights, value.flatten(0, 1))
    return _unfold(out, b, kv, rep, t).transpose(1, 2).contiguous(), _unfold(weights, b, kv, rep, t)


def _unfold(x: torch.Tensor, b: int, kv: int, rep: int, t: int) -> torch.Tensor:
    """(B * KV, rep * T, X) -> (B, H, T, X). unflatten / flatten rather than one view: torch.export
    proves these with a dynamic T, and guards on the equivalent view."""
    return x.unflatten(0, (b, kv)).unflatten(2, (rep, t)).flatten(1, 2)


_last_tiled: tuple[weakref.ref[torch.Tensor], int, int, torch.Tensor] | None = None


def _tiled(mask: torch.Tensor, kv: int, rep: int) -> torch.Tensor:
    """(B, 1, T, S) -> (B * KV, rep * T, S), the scores' layout, reused while the layers of one
    forward pass the same mask. The cache refers to the mask weakly and is dropped with it, so it
    neither keeps a mask alive nor outlives the forward. Built once, the additions in the layers
    need no broadcasting and no view with two dynamic dimensions, which XNNPACK cannot take."""
    global _last_tiled
    cached = _last_tiled
    if cached is not None and cached[0]() is mask and cached[1:3] == (kv, rep):
        return cached[3]
    tiled = torch.cat([mask] * rep, dim=2) if rep > 1 else mask
    tiled = torch.cat([tiled] * kv, dim=1) if kv > 1 else tiled
    tiled = tiled.flatten(0, 1)
    _last_tiled = (weakref.ref(mask, _forget), kv, rep, tiled)
    return tiled


def _forget(ref: weakref.ref[torch.Tensor]) -> None:
    global _last_tiled
    if _last_tiled is not None and _last_tiled[0] is ref:
        _last_tiled = None


def register() -> str:
    """Make `comigs_grouped` a valid `attn_implementation` (idempotent); returns its name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(NAME, grouped_query_attention)
    AttentionMaskInterface.register(NAME, eager_mask)
    return NAME


def has_grouped_heads(model: nn.Module) -> bool:
    """True when the model's attention shares KV heads between query heads (GQA / MQA)."""
    config: Any = getattr(model, "config", None)
    heads = getattr(config, "num_attention_heads", None)
    kv = getattr(config, "num_key_value_heads", None)
    return isinstance(heads, int) and isinstance(kv, int) and 0 < kv < heads
