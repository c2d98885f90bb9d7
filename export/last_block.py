"""The last block computes only the rows whose logits were asked for.

An inference program returns logits at `logit_positions` (`prepare.InferenceModule`); a generation
prefill asks for one position of T. HF's `logits_to_keep` selects those rows at the LM head, but
the last block's output feeds nothing else, so everything it does per row is wasted on the others:
the query projection, the attention rows, the output projection and the whole MLP with its experts
and router. Only its keys and values need every row. Selecting the rows inside the last block
skips ~85 % of that block's work: 1/L of the prefill (SmolLM2: ~3 % of ExecuTorch's and ONNX
Runtime's prefill, ad hoc). The selected rows are computed by the same operations as before, so
the logits are those of the whole model at those rows (the parity tests compare with HF's own
forward).

Llama-family decoder layers (Llama, Qwen2, Mistral: pre-norm, `q/k/v/o_proj`, rotary embeddings)
are pruned. GPT-2's model forward reshapes the final hidden states to the input's length
(`GPT2Model`: `view(-1, T, d)`), so fewer rows cannot leave its last block; it keeps HF's selection
at the head, as does any layer this module does not recognise.
"""

from __future__ import annotations

import contextlib
import functools
import sys
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from edge_runtime.model.inject import decoder_layers

_LAYER_PARTS = ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp")
_ATTENTION_PARTS = ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "scaling", "config")


def _family(layer: nn.Module, name: str) -> Callable[..., Any] | None:
    """A function of the layer's HF modelling file (`rotate_half`, `eager_attention_forward`)."""
    return getattr(sys.modules.get(type(layer).__module__), name, None)


def prunable(layer: nn.Module) -> bool:
    """True for a Llama-family decoder layer whose forward `_forward_at` reproduces."""
    attention = getattr(layer, "self_attn", None)
    return (all(hasattr(layer, p) for p in _LAYER_PARTS) and attention is not None
            and all(hasattr(attention, p) for p in _ATTENTION_PARTS)
            and all(_family(layer, f) is not None for f in ("rotate_half", "eager_attention_forward")))


def _rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
            rotate_half: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """HF's `apply_rotary_pos_emb` for one tensor: x (B, heads, T, D), cos/sin (B, T, D)."""
    return x * cos.unsqueeze(1) + rotate_half(x) * sin.unsqueeze(1)


def _forward_at(layer: nn.Module, positions: torch.Tensor, hidden_states: torch.Tensor,
                attention_mask: torch.Tensor | None = None,
                position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
                **kwargs: Any) -> torch.Tensor:
    """The decoder layer's forward, returning only the rows at `positions` (B, P, d)."""
    if attention_mask is None or position_embeddings is None or kwargs.get("past_key_values") is not None:
        # no explicit causal mask to select rows of, no rotary inputs or a KV cache: run it whole
        out = type(layer).forward(layer, hidden_states, attention_mask=attention_mask,
                                  position_embeddings=position_embeddings, **kwargs)
        return out.index_select(1, positions)
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    attention = layer.self_attn
    rotate_half = _family(layer, "rotate_half")
    b, t = hidden_states.shape[:2]
    p = positions.shape[0]
    normed = layer.input_layernorm(hidden_states)
    query = attention.q_proj(normed.index_select(1, positions)).view(b, p, -1, attention.head_dim).transpose(1, 2)
    key = attention.k_proj(normed).view(b, t, -1, attention.head_dim).transpose(1, 2)
    value = attention.v_proj(normed).view(b, t, -1, attention.head_dim).transpose(1, 2)
    cos, sin = position_embeddings
    query = _rotary(query, cos.index_select(1, positions), sin.index_select(1, positions), rotate_half)
    key = _rotary(key, cos, sin, rotate_half)
    interface = ALL_ATTENTION_FUNCTIONS.get_interface(attention.config._attn_implementation,
                                                      _family(layer, "eager_attention_forward"))
    out, _ = interface(attention, query, key, value, attention_mask.index_select(2, positions),
                       dropout=0.0, scaling=attention.scaling)
    hidden = hidden_states.index_select(1, positions) + attention.o_proj(out.reshape(b, p, -1))
    return hidden + layer.mlp(layer.post_attention_layernorm(hidden))


@contextlib.contextmanager
def last_block_at(model: nn.Module, positions: torch.Tensor) -> Iterator[bool]:
    """Inside the block, `model`'s last decoder layer returns only the rows at `positions`, so the
    model's output has P rows in that order. Yields whether it does (False: the layer is not one
    `prunable` recognises, and the caller must select the rows itself)."""
    layer = decoder_layers(model)[-1]
    if not prunable(layer):
        yield False
        return
    layer.forward = functools.partial(_forward_at, layer, positions)
    try:
        yield True
    finally:
        del layer.forward
