"""Turn a Hugging Face causal LM into a CoMiGS model, in place, and compute its training loss."""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from edge_runtime import roles
from edge_runtime.model.chunked_loss import chunked_cross_entropy
from edge_runtime.model.config import CoMiGSConfig
from edge_runtime.model.lora import SharedLoRALinear
from edge_runtime.model.moe_mlp import CoMiGSMLP

# model_type -> (path to the decoder layers, MLP attribute, attention attribute, attention
# projections that get the optional shared LoRA: the inputs of attention, like GPT-2's c_attn).
SUPPORTED_ARCHITECTURES: dict[str, tuple[str, str, str, tuple[str, ...]]] = {
    "llama": ("model.layers", "mlp", "self_attn", ("q_proj", "k_proj", "v_proj")),
    "qwen2": ("model.layers", "mlp", "self_attn", ("q_proj", "k_proj", "v_proj")),
    "mistral": ("model.layers", "mlp", "self_attn", ("q_proj", "k_proj", "v_proj")),
    "gpt2": ("transformer.h", "mlp", "attn", ("c_attn",)),
}
CONFIG_ATTR = "comigs_config"


class UnsupportedModelError(ValueError):
    """The base model's architecture has no CoMiGS injection recipe."""


def _architecture(model: nn.Module) -> tuple[str, str, str, tuple[str, ...]]:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedModelError(
            f"unsupported architecture {model_type!r}: CoMiGS can inject experts into "
            f"{', '.join(sorted(SUPPORTED_ARCHITECTURES))} causal LMs. Use one of those "
            "(e.g. SmolLM2, Llama, Qwen2, GPT-2) or add a recipe to SUPPORTED_ARCHITECTURES."
        )
    return SUPPORTED_ARCHITECTURES[model_type]


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    path = _architecture(model)[0]
    return model.get_submodule(path)


def _disable_dropout(model: nn.Module) -> None:
    """Dropout 0 everywhere: LoRA dropout is 0 in CoMiGS and the frozen base must be
    deterministic so the injected model equals the base model in train mode too."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    config = getattr(model, "config", None)
    for key in ("attention_dropout", "attn_pdrop", "resid_pdrop", "embd_pdrop", "hidden_dropout"):
        if config is not None and hasattr(config, key):
            setattr(config, key, 0.0)


def inject_comigs(model: nn.Module, config: CoMiGSConfig) -> nn.Module:
    """Freeze `model` and give every block's MLP the experts and router of `config`.

    Returns the same (modified) model; its logits equal the base model's until trained.
    """
    if hasattr(model, CONFIG_ATTR):
        raise ValueError("model already has CoMiGS experts; load a fresh base model to inject again.")
    _, mlp_attr, attn_attr, attn_targets = _architecture(model)
    model.requires_grad_(False)
    _disable_dropout(model)
    for layer in decoder_layers(model):
        setattr(layer, mlp_attr, CoMiGSMLP(getattr(layer, mlp_attr), config))
        if config.attention_lora:
            attention = getattr(layer, attn_attr)
            for name in attn_targets:
                setattr(attention, name, SharedLoRALinear(getattr(attention, name), config.rank, config.scale))
    setattr(model, CONFIG_ATTR, config)
    for _, param in roles.named_parameters_by_role(model, *roles.TRAINABLE_ROLES):
        param.requires_grad_(True)
    return model


def comigs_config(model: nn.Module) -> CoMiGSConfig:
    config = getattr(model, CONFIG_ATTR, None)
    if config is None:
        raise ValueError("this model has no CoMiGS experts; call inject_comigs(model, config) first.")
    return config


def moe_layers(model: nn.Module) -> Iterator[CoMiGSMLP]:
    for module in model.modules():
        if isinstance(module, CoMiGSMLP):
            yield module


def balance_loss(model: nn.Module) -> torch.Tensor | None:
    """Mean over layers of the last forward's load-balancing losses (None without routers).

    The mean, not the sum, so `lb_weight` means the same for a 12- and a 30-layer model.
    """
    losses = [m.aux_loss for m in moe_layers(model) if m.aux_loss is not None]
    return torch.stack(losses).mean() if losses else None


def loss_from_logits(model: nn.Module, logits: torch.Tensor,
                     targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(training loss, cross-entropy): mean next-token CE plus `lb_weight` x balance loss.

    `targets` are already shifted (targets[t] is the token after input t); logits are upcast
    to fp32 for the loss.
    """
    ce = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))
    return with_balance_loss(model, ce)


def with_balance_loss(model: nn.Module, ce: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    config = comigs_config(model)
    aux = balance_loss(model)
    if aux is None or config.lb_weight == 0:
        return ce, ce.detach()
    return ce + config.lb_weight * aux, ce.detach()


def language_model_loss(model: nn.Module, input_ids: torch.Tensor, targets: torch.Tensor,
                        loss_chunk_tokens: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(training loss, cross-entropy) of one batch; with `loss_chunk_tokens` the LM head runs in
    checkpointed chunks so the full logits tensor never exists (see chunked_loss)."""
    if loss_chunk_tokens is None:
        logits = model(input_ids=input_ids, use_cache=False).logits
        return loss_from_logits(model, logits, targets)
    hidden = model.base_model(input_ids=input_ids, use_cache=False).last_hidden_state
    ce = chunked_cross_entropy(hidden, model.get_output_embeddings(), targets, loss_chunk_tokens)
    return with_balance_loss(model, ce)


class LossModule(nn.Module):
    """`forward(input_ids, targets) -> (loss, logits)`: loss as output 0, as ExecuTorch's
    training export wants."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.model(input_ids=input_ids, use_cache=False).logits
        loss, _ = loss_from_logits(self.model, logits, targets)
        return loss, logits.detach()
