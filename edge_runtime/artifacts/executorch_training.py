"""On-device CoMiGS training with the exported joint forward/backward `.pte`.

    trainer = ExecuTorchTrainer("artifacts/")                     # verifies hashes, budget, identity
    loss = trainer.step("experts", train_ids, train_targets)      # AdamW on generalists/specialists
    loss = trainer.step("router", valid_ids, valid_targets)       # AdamW on the routers
    swap_experts("artifacts/", trainer.trained_state())           # persist into every artifact

ExecuTorch ships only SGD; the program returns its parameters as tensors that alias its own
memory, so a Python `torch.optim.AdamW` over them updates the weights the next step uses
(DESIGN.md §4: matches eager AdamW). Bi-level training uses one method and two optimizers over
disjoint groups (the manifest's `optimizer_groups`): every step computes all gradients, and a
phase applies only its own group's, so nothing leaks between the phases; gradients never
accumulate across calls (each call returns fresh ones).
"""

from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch

from edge_runtime.artifacts.errors import ArtifactInputError
from edge_runtime.artifacts.executorch_open import check_identity, open_checked, patched_data_file
from edge_runtime.artifacts.executorch_runtime import TrainingProgram
from edge_runtime.artifacts.inputs import check_token_ids
from edge_runtime.artifacts.manifest import KIND_ET_TRAINING

Phase = Literal["experts", "router"]
_PREFIX = "model."


@dataclasses.dataclass(frozen=True)
class OptimizerSettings:
    """AdamW settings per phase; the defaults are the paper's (DESIGN.md §1), as in LocalTrainer."""

    lr: float = 2e-3
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.95)
    router_lr: float = 2e-3
    router_weight_decay: float = 0.01


class ExecuTorchTrainer:
    """A verified, loaded training program plus one AdamW per phase over its parameters."""

    def __init__(self, directory: str | Path, artifact: str = "pte-train", *,
                 experts: Mapping[str, Any] | None = None, verify: bool = True,
                 memory_budget_bytes: int | None = None, optimizer: OptimizerSettings | None = None) -> None:
        self.manifest, self.entry = open_checked(directory, artifact, KIND_ET_TRAINING, verify, memory_budget_bytes)
        self.artifact = artifact
        self.settings = optimizer or OptimizerSettings()
        self._workdir: tempfile.TemporaryDirectory | None = None
        data_path = self.manifest.path(artifact, "data")
        if experts:
            self._workdir = tempfile.TemporaryDirectory(prefix="comigs-experts-")
            data_path = patched_data_file(self.manifest, artifact, experts, self._workdir)
        program = TrainingProgram(self.manifest.path(artifact, "program"), data_path)
        check_identity(self.manifest, artifact, program.method_names, lambda name: program.run_method(name)[0])
        self._program: TrainingProgram | None = program
        self._method = self.entry.get("method", "forward")
        self.groups: dict[str, list[str]] = {k: list(v) for k, v in self.entry["optimizer_groups"].items()}
        self.vocab_size = int(self.manifest.data["base_model"]["vocab_size"])
        self._params: dict[str, torch.Tensor] | None = None
        self._optimizers: dict[str, torch.optim.Optimizer] = {}
        self.steps = {"experts": 0, "router": 0}

    # -- one forward/backward -----------------------------------------------------------------
    def forward_backward(self, input_ids: torch.Tensor, targets: torch.Tensor
                         ) -> tuple[float, dict[str, torch.Tensor]]:
        """(loss, gradient of every trainable tensor by parameter name); no weight changes."""
        shape = dict(batch=self.entry["batch"], seq_min=self.entry["seq_len"], seq_max=self.entry["seq_len"],
                     vocab_size=self.vocab_size)
        ids = check_token_ids(input_ids, what=f"{self.artifact} input_ids", **shape)
        tgt = check_token_ids(targets, what=f"{self.artifact} targets", **shape)
        if self._program is None:
            raise RuntimeError(f"{self.artifact}: the trainer is closed.")
        out = self._program.forward_backward(self._method, (ids, tgt))
        if self._params is None:
            self._params = {name.removeprefix(_PREFIX): t for name, t in out.parameters.items()}
        grads = {name.removeprefix(_PREFIX): g for name, g in out.gradients.items()}
        return out.loss, grads

    # -- optimisation -------------------------------------------------------------------------
    def step(self, phase: Phase, input_ids: torch.Tensor, targets: torch.Tensor) -> float:
        """One optimiser step of `phase`'s parameter group; returns the loss before the step."""
        if phase not in self.groups:
            raise ArtifactInputError(f"unknown phase {phase!r}; use one of {sorted(self.groups)}.")
        names = self.groups[phase]
        if not names:
            raise ArtifactInputError(f"{self.artifact} has no trainable {phase} tensors (exported without them).")
        loss, grads = self.forward_backward(input_ids, targets)
        params = self.parameters()
        optimizer = self._optimizer(phase)
        try:
            for name in names:
                params[name].grad = grads[name]
            optimizer.step()
        finally:
            for name in names:
                params[name].grad = None
        self.steps[phase] += 1
        return loss

    def _optimizer(self, phase: Phase) -> torch.optim.Optimizer:
        if phase not in self._optimizers:
            params = self.parameters()
            s = self.settings
            lr, wd = (s.router_lr, s.router_weight_decay) if phase == "router" else (s.lr, s.weight_decay)
            self._optimizers[phase] = torch.optim.AdamW([params[n] for n in self.groups[phase]], lr=lr,
                                                        betas=s.betas, weight_decay=wd)
        return self._optimizers[phase]

    def set_lr(self, phase: Phase, lr: float) -> None:
        """Change a phase's learning rate (e.g. the experts' cosine schedule)."""
        for group in self._optimizer(phase).param_groups:
            group["lr"] = lr

    # -- state --------------------------------------------------------------------------------
    def parameters(self) -> dict[str, torch.Tensor]:
        """Trainable tensors by parameter name, aliasing the program's memory (available after the
        first forward_backward or step)."""
        if self._params is None:
            raise RuntimeError("the program exposes its parameters after the first forward_backward/step.")
        return self._params

    def trained_state(self) -> dict[str, torch.Tensor]:
        """Copies of the trainable tensors, e.g. for `swap_experts(directory, ...)` or the sync client."""
        return {name: t.detach().clone() for name, t in self.parameters().items()}

    def optimizer_state_dict(self) -> dict[str, Any]:
        return {"steps": dict(self.steps),
                "optimizers": {phase: opt.state_dict() for phase, opt in self._optimizers.items()}}

    def load_optimizer_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore optimiser state (needs a first forward_backward so the parameters exist)."""
        for phase, opt_state in state["optimizers"].items():
            self._optimizer(phase).load_state_dict(opt_state)
        self.steps.update(state.get("steps", {}))

    def close(self) -> None:
        self._optimizers.clear()
        self._params = None
        self._program = None
        if self._workdir is not None:
            self._workdir.cleanup()
            self._workdir = None

    def __enter__(self) -> ExecuTorchTrainer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
