"""Build a ready-to-train CoMiGS model from a model source, an expert layout and saved adapters."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from edge_runtime import roles
from edge_runtime.model.adapters import load_adapters, read_adapter_config
from edge_runtime.model.config import CoMiGSConfig
from edge_runtime.model.inject import inject_comigs
from edge_runtime.model.loading import base_model_skeleton, load_base_model


def build_comigs_model(source: str | Path, config: CoMiGSConfig | None = None,
                       adapters: str | Path | None = None, attn_implementation: str = "sdpa",
                       with_tokenizer: bool = True, dtype: torch.dtype = torch.float32) -> tuple[nn.Module, Any]:
    """(injected model, tokenizer). With `adapters` and no `config`, the adapters' own layout is used."""
    if config is None:
        config = (CoMiGSConfig.from_dict(read_adapter_config(adapters)["comigs"]) if adapters
                  else CoMiGSConfig())
    model, tokenizer = load_base_model(source, attn_implementation=attn_implementation,
                                       with_tokenizer=with_tokenizer, dtype=dtype)
    inject_comigs(model, config)
    if adapters:
        load_adapters(model, adapters)
    return model, tokenizer


def generalist_shapes(source: str | Path, config: CoMiGSConfig) -> dict[str, tuple[int, ...]]:
    """Name and shape of every tensor a device with layout `config` on the base model at `source` sends
    to the coordinator (the manifest `comigs sync init` is given), decided by the model code itself and
    the naming contract, without loading a weight: benchmarks size realistic deltas with it."""
    model = base_model_skeleton(source)
    with torch.device("meta"):
        inject_comigs(model, config)
    return {name: tuple(p.shape) for name, p in roles.named_parameters_by_role(model, roles.Role.GENERALIST)}
