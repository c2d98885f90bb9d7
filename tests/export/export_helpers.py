"""Helpers of the export tests: tiny models (the suite's own builders), exports, eager references."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edge_runtime import roles

from tests.builders import VOCAB, randomize_experts, tiny_comigs

EXPERTS_SEED = 11  # the experts exported by the session fixtures
MAX_SEQ_LEN = 64
TRAIN_SHAPE = (2, 16)
TRAIN_LOSS_CHUNK = 40  # the 96-token vocabulary in three uneven LM-head chunks (40, 40, 16)


@dataclasses.dataclass
class Exported:
    """A session-wide export of one tiny architecture and how to rebuild its eager twin."""

    arch: str
    directory: Path
    train_backend: str
    train_generalists: bool
    manifest: Any

    def eager(self) -> nn.Module:
        """A fresh eager model with exactly the exported experts (default, non-export code path)."""
        return eager_model(self.arch, identical_tensors=self.arch == "llama")


def eager_model(arch: str, experts_seed: int = EXPERTS_SEED, identical_tensors: bool = False) -> nn.Module:
    """Tiny 1G1S model with random experts and routers (so every swap is visible in the logits).

    identical_tensors: every generalist B stays all-zero (as at init) and all layers share one
    router value, so the export must keep byte-identical tensors separately replaceable.
    """
    model = tiny_comigs(arch, seed=0, n_generalists=1, n_specialists=1)
    randomize_experts(model, seed=experts_seed)
    g = torch.Generator().manual_seed(experts_seed + 100)
    router = None
    with torch.no_grad():
        for name, p in model.named_parameters():
            role = roles.role_of(name)
            if role is roles.Role.ROUTER:
                if router is None or not identical_tensors:
                    router = torch.randn(p.shape, generator=g) * 0.5
                p.copy_(router)
            elif identical_tensors and role is roles.Role.GENERALIST and name.endswith("_B"):
                p.zero_()
    return model


# The session exports: arch -> (training backend, trainable generalists). GPT-2 gets the shipped
# XNNPACK training program (frozen generalists stay pluggable constants in it), Llama the portable
# one with trainable generalists (--train-generalists); this also balances the two export workers.
SESSION_EXPORTS = {"llama": ("portable", True), "gpt2": ("xnnpack", False)}


def export_tiny(arch: str, directory: Path) -> Any:
    """Export the tiny `arch` model of the session fixtures to every format."""
    from export.pipeline import ExportOptions, export_artifacts

    train_backend, train_generalists = SESSION_EXPORTS[arch]
    options = ExportOptions(max_seq_len=MAX_SEQ_LEN, onnx_max_batch=4, train_batch=TRAIN_SHAPE[0],
                            train_seq_len=TRAIN_SHAPE[1], train_backend=train_backend,
                            train_generalists=train_generalists, train_loss_chunk=TRAIN_LOSS_CHUNK)
    return export_artifacts(eager_model(arch, identical_tensors=arch == "llama"), directory, options, source="tests")


def eager_logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def token_ids(shape: tuple[int, int], seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


# `python -m tests.export.export_helpers ARCH DIR`: the session fixtures run the two exports in parallel
def run_joint(ep: Any, *user_inputs: torch.Tensor) -> Any:
    """Call a joint forward/backward graph directly (ExportedProgram.module() cannot unflatten its
    outputs): lifted weights first, in signature order, then the user inputs."""
    from torch.export.graph_signature import InputKind

    inputs, user = [], iter(user_inputs)
    for spec in ep.graph_signature.input_specs:
        if spec.kind == InputKind.USER_INPUT:
            inputs.append(next(user))
        elif spec.kind == InputKind.CONSTANT_TENSOR:
            inputs.append(ep.constants[spec.target])
        else:
            inputs.append(ep.state_dict[spec.target] if spec.target in ep.state_dict else ep.constants[spec.target])
    return ep.graph_module(*inputs)


if __name__ == "__main__":
    import sys
    import warnings

    warnings.simplefilter("ignore")
    export_tiny(sys.argv[1], Path(sys.argv[2]))
