"""Put a CoMiGS model into the one form every exporter can trace, and wrap it with a plain signature.

The model has two ways to mix experts (DESIGN.md §1): a grouped, data-dependent path for
eager training and a dense static path. Exporters need the static one, and HF's sdpa attention
breaks the joint forward/backward export, so before tracing we force the dense path on every
MoE layer, switch attention to an explicit implementation (`export.grouped_attention` for
grouped-query models, HF's "eager" otherwise) and put the model in eval mode (dropout is 0
anyway; eval keeps HF from taking training-only branches).

Program parameter names are the wrapper's: `model.` + the model's own parameter name. The
manifest, adapters and the roles contract use the model's own names; `canonical_name` and
`PROGRAM_PREFIX` convert between the two.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edge_runtime.model.config import CoMiGSConfig
from edge_runtime.model.inject import LossModule, comigs_config, moe_layers
from export import grouped_attention
from export.last_block import last_block_at

PROGRAM_PREFIX = "model."


def canonical_name(program_name: str) -> str:
    """`model.model.layers.0...` (program FQN) -> `model.layers.0...` (model / adapter name)."""
    if not program_name.startswith(PROGRAM_PREFIX):
        raise ValueError(f"{program_name!r} is not a parameter of an exported CoMiGS program")
    return program_name[len(PROGRAM_PREFIX):]


class InferenceModule(nn.Module):
    """`forward(input_ids[batch, T], logit_positions[P]) -> logits[batch, P, vocab]`: the signature of
    every inference artifact.

    The caller names the sequence positions it wants logits for, because the LM head is the largest
    matmul of a small model (vocab x hidden: a fifth of SmolLM2-135M's prefill FLOPs at T = 128) and
    most callers need one row of it: a generation prefill asks for the last position only, scoring
    (perplexity) for all of them. It is HF's own `logits_to_keep` (which `generate` sets to the last
    position), passed as an index tensor so one program serves both. Where the model allows it,
    the rows are selected inside the last block rather than at the head (`export.last_block`).
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, logit_positions: torch.Tensor) -> torch.Tensor:
        with last_block_at(self.model, logit_positions) as selected:
            keep = 0 if selected else logit_positions  # HF: 0 keeps every row the blocks returned
            return self.model(input_ids=input_ids, use_cache=False, logits_to_keep=keep).logits


def inference_example(batch: int, seq: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Example `(input_ids, logit_positions)` to trace `InferenceModule` with. One position fewer
    than tokens: equal example sizes would tie the two dynamic dimensions together."""
    return torch.zeros(batch, seq, dtype=torch.long), torch.arange(1, seq)


def training_module(model: nn.Module) -> nn.Module:
    """`forward(input_ids, targets) -> (loss, logits)` with the loss as output 0 (what ExecuTorch's
    training export differentiates); the loss includes the load-balancing term."""
    return LossModule(model)


def prepare_for_export(model: nn.Module) -> CoMiGSConfig:
    """Dense expert mixing, explicit attention, eval mode. Returns the model's CoMiGS config.

    Raises ValueError when the model has no CoMiGS experts.
    """
    config = comigs_config(model)
    for layer in moe_layers(model):
        layer.force_dense = True
    wanted = grouped_attention.register() if grouped_attention.has_grouped_heads(model) else "eager"
    setter = getattr(model, "set_attn_implementation", None)
    current = getattr(getattr(model, "config", None), "_attn_implementation", None)
    if current != wanted:
        if setter is None:
            raise ValueError(f"cannot switch {type(model).__name__} to explicit attention for export "
                             f"(attention implementation {current!r}); load it with attn_implementation='eager'.")
        setter(wanted)
    model.eval()
    return config


@contextlib.contextmanager
def requires_grad_only(model: nn.Module, names: set[str]) -> Iterator[None]:
    """Only `names` require grad inside the block (what the training export differentiates);
    the previous flags are restored afterwards."""
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    try:
        for n, p in model.named_parameters():
            p.requires_grad_(n in names)
        yield
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(before[n])


@contextlib.contextmanager
def stack_experts(model: nn.Module) -> Iterator[None]:
    """Inside the block every MoE layer evaluates its dense mixture with all experts batched
    (`edge_runtime.model.stacked_experts`): the form ONNX Runtime runs fastest. The ExecuTorch
    programs are traced outside it, on the per-expert loop."""
    layers = list(moe_layers(model))
    before = [layer.stack_experts for layer in layers]
    try:
        for layer in layers:
            layer.stack_experts = True
        yield
    finally:
        for layer, flag in zip(layers, before, strict=True):
            layer.stack_experts = flag


@contextlib.contextmanager
def quiet_export_warnings() -> Iterator[None]:
    """Silence one known, harmless torch.export warning: each MoE layer stores its load-balancing
    loss as a plain attribute during forward (`aux_loss`), which torch.export reports as "tensor
    attributes assigned during export". The value is only read later in the same forward (by the
    training loss), so the traced graph is correct; the parity checks prove it."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"The tensor attributes .*aux_loss.* were assigned during export")
        yield


def load_export_model(source: str | Path, config: CoMiGSConfig | None,
                      adapters: str | Path | None) -> nn.Module:
    """Base model from `source` with CoMiGS experts (from `adapters` when given), ready to export."""
    from edge_runtime.model.factory import build_comigs_model

    model, _ = build_comigs_model(source, config, adapters=adapters, attn_implementation="eager",
                                  with_tokenizer=False)
    prepare_for_export(model)
    return model


def model_max_positions(model: nn.Module) -> int | None:
    cfg: Any = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions"):
        value = getattr(cfg, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None
