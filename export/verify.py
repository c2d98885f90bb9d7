"""Self-check of freshly exported artifacts, through the same loaders a device uses.

Every artifact is run twice and compared with the eager model:
1. as written (real experts): the program computes what the model computes;
2. with a different set of random experts swapped in (a patched `.ptd` copy / ONNX initializer
   overrides): the program *follows* its pluggable tensors. A tensor that got embedded in the
   program (constant-folded, packed into a delegate blob) keeps its export-time placeholder and
   fails this check, and so does a wrong name -> key map.
The eager outputs with the two expert sets must differ by more than the tolerance, otherwise the
second check would prove nothing. Training programs compare the loss and every gradient.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edge_runtime.artifacts.manifest import KIND_ET_INFERENCE, KIND_ET_TRAINING, KIND_ONNX
from export.errors import ExportVerificationError
from export.pluggable import values_installed
from export.prepare import InferenceModule, requires_grad_only, training_module

PROBE_SEQ = 8


@dataclasses.dataclass(frozen=True)
class Tolerance:
    """Pass when max |program - eager| <= atol + rtol * max |eager|."""

    atol: float = 1e-3
    rtol: float = 1e-4

    def limit(self, reference: torch.Tensor) -> float:
        return self.atol + self.rtol * float(reference.abs().max())


def _probe_ids(shape: tuple[int, int], vocab: int, seed: int) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


def _eager_logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return InferenceModule(model)(ids, torch.arange(ids.shape[1]))


def _eager_loss_and_grads(model: nn.Module, ids: torch.Tensor, targets: torch.Tensor,
                          trainable: set[str]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    params = dict(model.named_parameters())
    with requires_grad_only(model, trainable):
        loss, _ = training_module(model)(ids, targets)
        grads = torch.autograd.grad(loss, [params[n] for n in sorted(trainable)])
    return loss.detach(), dict(zip(sorted(trainable), grads, strict=True))


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


def _check_inference(staging: Path, name: str, entry: Mapping[str, Any], model: nn.Module,
                     random_experts: Mapping[str, torch.Tensor], tol: Tolerance, seed: int) -> dict[str, Any]:
    from edge_runtime.artifacts.executorch_inference import ExecuTorchInference
    from edge_runtime.artifacts.onnx_inference import OnnxInference

    vocab = model.config.vocab_size
    if entry["kind"] == KIND_ONNX:
        batch = min(2, entry["dims"]["batch"]["max"])
        seq = min(PROBE_SEQ, entry["dims"]["seq"]["max"])

        def load(experts: Mapping[str, torch.Tensor] | None) -> Any:
            return OnnxInference(staging, name, experts=experts, verify=False)
    else:
        batch, seq = entry["batch"], min(PROBE_SEQ, entry["dims"]["seq"]["max"])

        def load(experts: Mapping[str, torch.Tensor] | None) -> Any:
            return ExecuTorchInference(staging, name, experts=experts, verify=False)
    ids = _probe_ids((batch, seq), vocab, seed)
    reference = _eager_logits(model, ids)
    with values_installed(model, random_experts):
        swapped_reference = _eager_logits(model, ids)
    some = [seq - 1, 0]  # a subset, out of order: the program selects positions, not a prefix
    with load(None) as program:
        diff = max(_max_diff(program.logits(ids), reference), _max_diff(program.logits(ids, some), reference[:, some]))
    with load(random_experts) as program:
        swapped_diff = _max_diff(program.logits(ids), swapped_reference)
    return {"probe_shape": [batch, seq], "max_abs_diff": diff, "swapped_max_abs_diff": swapped_diff,
            "limit": tol.limit(reference), "swap_effect": _max_diff(reference, swapped_reference)}


def _check_training(staging: Path, name: str, entry: Mapping[str, Any], model: nn.Module,
                    random_experts: Mapping[str, torch.Tensor], tol: Tolerance, seed: int) -> dict[str, Any]:
    from edge_runtime.artifacts.executorch_training import ExecuTorchTrainer

    shape = (entry["batch"], entry["seq_len"])
    ids = _probe_ids(shape, model.config.vocab_size, seed)
    targets = _probe_ids(shape, model.config.vocab_size, seed + 1)
    trainable = set(entry["trainable"])
    report: dict[str, Any] = {"probe_shape": list(shape)}
    for label, experts in (("", None), ("swapped_", random_experts)):
        with values_installed(model, experts or {}):
            loss, grads = _eager_loss_and_grads(model, ids, targets, trainable)
        with ExecuTorchTrainer(staging, name, experts=experts, verify=False) as trainer:
            et_loss, et_grads = trainer.forward_backward(ids, targets)
        if set(et_grads) != trainable:
            raise ExportVerificationError(f"{name}: the program returns gradients for {sorted(et_grads)[:3]}..., "
                                          f"expected exactly the {len(trainable)} trainable tensors.")
        report[f"{label}loss_abs_diff"] = abs(et_loss - float(loss))
        report[f"{label}grad_max_abs_diff"] = max(_max_diff(et_grads[n], grads[n]) for n in trainable)
        report[f"{label}grad_limit"] = max(tol.limit(g) for g in grads.values())
        report[f"{label}loss_limit"] = tol.limit(loss)
    return report


def verify_artifacts(staging: Path, artifacts: Mapping[str, Mapping[str, Any]], model: nn.Module,
                     random_experts: Mapping[str, torch.Tensor], tol: Tolerance, seed: int) -> dict[str, Any]:
    """Run every artifact in `staging` (whose manifest must already be written) against the eager model."""
    reports: dict[str, Any] = {}
    failures = []
    for name, entry in artifacts.items():
        if entry["kind"] == KIND_ET_TRAINING:
            report = _check_training(staging, name, entry, model, random_experts, tol, seed)
            ok = all(report[f"{p}loss_abs_diff"] <= report[f"{p}loss_limit"]
                     and report[f"{p}grad_max_abs_diff"] <= report[f"{p}grad_limit"] for p in ("", "swapped_"))
        elif entry["kind"] in (KIND_ET_INFERENCE, KIND_ONNX):
            report = _check_inference(staging, name, entry, model, random_experts, tol, seed)
            ok = report["max_abs_diff"] <= report["limit"] and report["swapped_max_abs_diff"] <= report["limit"]
            if report["swap_effect"] <= report["limit"]:
                raise ExportVerificationError(f"{name}: random experts barely change the eager logits "
                                              f"({report['swap_effect']:.2e}); the swap check would prove nothing.")
        else:
            raise ExportVerificationError(f"{name}: unknown artifact kind {entry['kind']!r}")
        report["passed"] = ok
        reports[name] = report
        if not ok:
            failures.append(f"{name}: {report}")
    if failures:
        raise ExportVerificationError("exported artifacts do not reproduce the eager model (nothing was written):\n  "
                                      + "\n  ".join(failures))
    return reports
