"""Tiny random models and data built in the tests: no weights, no network."""

from __future__ import annotations

import numpy as np
import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)
from transformers.utils import logging as hf_logging

from edge_runtime.model.config import CoMiGSConfig
from edge_runtime.model.inject import inject_comigs

hf_logging.set_verbosity_error()
VOCAB = 96


def tiny_base(arch: str = "llama", seed: int = 0, layers: int = 2) -> torch.nn.Module:
    torch.manual_seed(seed)
    if arch == "llama":
        cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                          tie_word_embeddings=True, initializer_range=0.2)
        model = LlamaForCausalLM(cfg)
    elif arch == "qwen2":
        cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                          initializer_range=0.2)
        model = Qwen2ForCausalLM(cfg)
    elif arch == "gpt2":
        cfg = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=layers, n_head=4, n_positions=256,
                         bos_token_id=0, eos_token_id=0, initializer_range=0.2)
        model = GPT2LMHeadModel(cfg)
    else:
        raise ValueError(arch)
    return model.eval()


def tiny_comigs(arch: str = "llama", seed: int = 0, **config) -> torch.nn.Module:
    return inject_comigs(tiny_base(arch, seed), CoMiGSConfig(**config))


def randomize_experts(model: torch.nn.Module, seed: int = 1, std: float = 0.05) -> None:
    """Give every LoRA B a random value, as after training, so experts differ."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("_B"):
                p.copy_(torch.randn(p.shape, generator=g) * std)


def synthetic_language(n_tokens: int, seed: int = 0, vocab: int = VOCAB) -> np.ndarray:
    """A learnable 'language': each token picks its successor from two fixed candidates."""
    rng = np.random.default_rng(seed)
    table = np.random.default_rng(1234).integers(0, vocab, size=(vocab, 2))
    out = np.empty(n_tokens, dtype=np.int64)
    out[0] = 0
    choices = rng.integers(0, 2, size=n_tokens)
    for i in range(1, n_tokens):
        out[i] = table[out[i - 1], choices[i]]
    return out
