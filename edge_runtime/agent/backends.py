"""Training backends behind one small interface: eager PyTorch and the exported ExecuTorch program.

A Raspberry Pi or a Jetson trains the eager model (`LocalTrainer`); a phone runs the joint
forward/backward `.pte` that `comigs export` wrote (`ExecuTorchTrainer`). The agent must not care
which: both expose named trainable tensors (the same parameter names, so the roles contract
applies unchanged), one bi-level step at a time, a validation loss, and a picklable state
(optimizers, counters, the data RNGs: the "data cursor").

The ExecuTorch backend reproduces `LocalTrainer`'s schedule exactly (cosine expert LR over all
local steps, a router phase of `router_steps` validation batches every `router_every` expert
steps, batches drawn from the same seeded generators, AdamW with the same settings), so with the
same start and data both backends give the same losses to float rounding
(tests/edge/test_edge_backends.py).
"""

from __future__ import annotations

import abc
import dataclasses
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from edge_runtime import roles
from edge_runtime.data.tokens import TokenSplit
from edge_runtime.training.schedule import cosine_lr
from edge_runtime.training.trainer import LocalTrainer, StepMetrics, TrainerConfig

BACKENDS = ("eager", "executorch")


class BackendError(ValueError):
    """A backend cannot train with these inputs (artifacts, layout, shapes); the message says why."""


class TrainingBackend(abc.ABC):
    """One device's trainable state and its bi-level steps."""

    name: str
    config: TrainerConfig

    @property
    @abc.abstractmethod
    def step(self) -> int:
        """Expert steps done so far (all rounds)."""

    @abc.abstractmethod
    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Copies of every generalist, specialist and router tensor, by parameter name."""

    @abc.abstractmethod
    def load_trainable(self, tensors: Mapping[str, torch.Tensor], *which: roles.Role) -> None:
        """Install exactly the tensors of roles `which` (all checked before any is written)."""

    @abc.abstractmethod
    def run_step(self) -> list[StepMetrics]:
        """One expert step, followed by the router phase when it falls due."""

    @abc.abstractmethod
    def validation_loss(self, split: TokenSplit, max_batches: int) -> float:
        """Mean loss over the first `max_batches` full validation windows (deterministic)."""

    @abc.abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """Optimizer state, counters and data generators."""

    @abc.abstractmethod
    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...

    @abc.abstractmethod
    def reconfigure(self, config: TrainerConfig) -> None:
        """Adopt a new round's config (steps, LRs, router schedule), keeping all state."""

    def generalist_state(self) -> dict[str, torch.Tensor]:
        """The tensors that may leave the device (decided by `roles`, nowhere else)."""
        return {n: t for n, t in self.trainable_state().items() if roles.role_of(n) is roles.Role.GENERALIST}

    def close(self) -> None:  # noqa: B027 - optional hook: most backends hold nothing to release
        """Release runtime resources."""


def _check_roles(expected: Mapping[str, torch.Tensor], tensors: Mapping[str, torch.Tensor],
                 which: tuple[roles.Role, ...]) -> dict[str, torch.Tensor]:
    """The subset of `expected` of roles `which`, after checking `tensors` has exactly it, fitting."""
    wanted = {n: t for n, t in expected.items() if roles.role_of(n) in which}
    missing, unexpected = sorted(set(wanted) - set(tensors)), sorted(set(tensors) - set(wanted))
    if missing or unexpected:
        raise roles.AdapterMismatchError(
            f"{'/'.join(r.value for r in which)} tensors do not match the training program: "
            + (f"missing {len(missing)} (first {missing[0]!r}) " if missing else "")
            + (f"unexpected {len(unexpected)} (first {unexpected[0]!r})" if unexpected else ""))
    for name, target in wanted.items():
        t = tensors[name]
        if tuple(t.shape) != tuple(target.shape):
            raise roles.AdapterMismatchError(f"{name}: shape {tuple(t.shape)} does not fit {tuple(target.shape)}.")
        if not torch.isfinite(t).all():
            raise roles.AdapterMismatchError(f"{name}: contains NaN or Inf; refusing to load it.")
    return wanted


class EagerBackend(TrainingBackend):
    """`LocalTrainer` on the injected PyTorch model (what a Pi or a Jetson runs)."""

    name = "eager"

    def __init__(self, model: nn.Module, config: TrainerConfig, train: TokenSplit, valid: TokenSplit) -> None:
        self.model, self.config = model, config
        self.trainer = LocalTrainer(model, config, train, valid)

    @property
    def step(self) -> int:
        return self.trainer.step

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return roles.state_by_role(self.model, *roles.TRAINABLE_ROLES)

    def generalist_state(self) -> dict[str, torch.Tensor]:
        return roles.generalist_state(self.model)

    def load_trainable(self, tensors: Mapping[str, torch.Tensor], *which: roles.Role) -> None:
        roles.load_state_by_role(self.model, tensors, *(which or roles.TRAINABLE_ROLES))

    def run_step(self) -> list[StepMetrics]:
        out = [self.trainer.expert_step()]
        if self.trainer._router_phase_due():
            out += self.trainer.router_phase()
        return out

    @torch.no_grad()
    def validation_loss(self, split: TokenSplit, max_batches: int) -> float:
        was_training = self.model.training
        self.model.eval()
        total = count = 0.0
        try:
            micro = self.config.micro_batch_size or self.config.batch_size
            for i, (inputs, targets) in enumerate(split.windows(self.config.seq_len, micro)):
                if i >= max_batches:
                    break
                logits = self.model(input_ids=inputs, use_cache=False).logits.float()
                total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                               reduction="sum"))
                count += targets.numel()
        finally:
            self.model.train(was_training)
        return total / max(count, 1)

    def state_dict(self) -> dict[str, Any]:
        return self.trainer.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.trainer.load_state_dict(dict(state))
        self._apply_router_lr()

    def reconfigure(self, config: TrainerConfig) -> None:
        if config == self.config:
            return
        state = self.trainer.state_dict()
        self.config = config
        self.trainer = LocalTrainer(self.model, config, self.trainer.train_split, self.trainer.valid_split)
        self.trainer.load_state_dict(state)
        self._apply_router_lr()

    def _apply_router_lr(self) -> None:
        if self.trainer.router_opt is not None:  # a loaded optimizer state carries the old LR
            for group in self.trainer.router_opt.param_groups:
                group["lr"] = self.config.router_lr


class ExecuTorchBackend(TrainingBackend):
    """The exported training program (`pte-train`) with AdamW over its own parameters (what a phone runs).

    The program's batch and sequence length are fixed at export: `config.micro_batch_size` must be
    the exported batch and `config.seq_len` its sequence length; a larger `batch_size` is reached by
    accumulating gradients over several program calls.
    """

    name = "executorch"

    def __init__(self, artifacts: str | Path, config: TrainerConfig, train: TokenSplit, valid: TokenSplit | None,
                 *, memory_budget_bytes: int | None = None, verify: bool = True) -> None:
        from edge_runtime.artifacts import ExecuTorchTrainer

        self.program = ExecuTorchTrainer(artifacts, "pte-train", verify=verify, memory_budget_bytes=memory_budget_bytes)
        entry = self.program.entry
        self.batch, self.seq_len = int(entry["batch"]), int(entry["seq_len"])
        self.train_split, self.valid_split = train, valid
        self.expert_names = list(self.program.groups.get("experts", []))
        self.router_names = list(self.program.groups.get("router", []))
        if not any(roles.role_of(n) is roles.Role.GENERALIST for n in self.expert_names):
            raise BackendError(f"{artifacts}: the training program was exported with frozen generalists, so this "
                               "device could not contribute to the shared experts; re-export with "
                               "`comigs export --formats pte-train --train-generalists ...`.")
        zeros = torch.zeros(self.batch, self.seq_len, dtype=torch.long)
        self.program.forward_backward(zeros, zeros)  # the program exposes its parameters after a first call
        self.params = self.program.parameters()
        self.config = self._checked(config)
        self.expert_opt = self._adamw(self.expert_names, config.lr, config.weight_decay)
        self.router_opt = (self._adamw(self.router_names, config.router_lr, config.router_weight_decay)
                           if self.router_names else None)
        self._step = 0
        self.router_updates = 0
        self.train_rng = torch.Generator().manual_seed(config.seed)
        self.valid_rng = torch.Generator().manual_seed(config.seed + 1)

    def _checked(self, config: TrainerConfig) -> TrainerConfig:
        micro = config.micro_batch_size or config.batch_size
        if micro != self.batch or config.seq_len != self.seq_len:
            raise BackendError(f"the training program was exported for micro-batches of {self.batch} x "
                               f"{self.seq_len} tokens, not {micro} x {config.seq_len}; use a batch size that "
                               f"is a multiple of {self.batch} or re-export with other --train-batch/--train-seq-len.")
        if self.router_names and config.router_mode == "bilevel" and self.valid_split is None:
            raise BackendError("bi-level training needs a validation split for the router phase.")
        return config

    def _adamw(self, names: list[str], lr: float, weight_decay: float) -> torch.optim.Optimizer:
        return torch.optim.AdamW([self.params[n] for n in names], lr=lr, betas=self.config.betas,
                                 weight_decay=weight_decay, fused=True)

    @property
    def step(self) -> int:
        return self._step

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {name: t.detach().clone() for name, t in self.params.items()}

    def load_trainable(self, tensors: Mapping[str, torch.Tensor], *which: roles.Role) -> None:
        wanted = _check_roles(self.params, tensors, which or roles.TRAINABLE_ROLES)
        with torch.no_grad():
            for name, target in wanted.items():
                target.copy_(tensors[name].to(target.dtype))  # in place: the program reads this memory

    # -- steps: LocalTrainer's schedule ----------------------------------------------------------
    def run_step(self) -> list[StepMetrics]:
        joint = self.config.router_mode == "joint"
        lr = cosine_lr(self._step, self.config.total_steps, self.config.lr, self.config.min_lr)
        for group in self.expert_opt.param_groups:
            group["lr"] = lr
        names = self.expert_names + (self.router_names if joint else [])
        optimizers = [self.expert_opt] + ([self.router_opt] if joint and self.router_opt else [])
        metrics = self._optimizer_step("experts", names, optimizers, self.train_split, self.train_rng, lr)
        self._step += 1
        out = [dataclasses.replace(metrics, step=self._step)]
        if (self.config.router_mode == "bilevel" and self.router_opt is not None and self.config.router_steps > 0
                and self._step % self.config.router_every == 0):
            assert self.valid_split is not None
            for _ in range(self.config.router_steps):
                out.append(self._optimizer_step("router", self.router_names, [self.router_opt], self.valid_split,
                                                self.valid_rng, self.config.router_lr))
                self.router_updates += 1
        return out

    def _optimizer_step(self, phase: str, names: list[str], optimizers: list[torch.optim.Optimizer],
                        split: TokenSplit, rng: torch.Generator, lr: float) -> StepMetrics:
        start = time.perf_counter()
        n_micro = self.config.accumulation
        grads: dict[str, torch.Tensor] = {}
        loss_sum = 0.0
        for _ in range(n_micro):
            inputs, targets = split.sample(self.batch, self.seq_len, rng)
            loss, step_grads = self.program.forward_backward(inputs, targets)
            loss_sum += loss
            for name in names:  # the program reuses its gradient buffers: copy out
                g = step_grads[name] / n_micro
                grads[name] = grads[name] + g if name in grads else g.clone()
        try:
            for name in names:
                self.params[name].grad = grads[name]
            if self.config.grad_clip:
                torch.nn.utils.clip_grad_norm_([self.params[n] for n in names], self.config.grad_clip)
            for optimizer in optimizers:
                optimizer.step()
        finally:
            for name in names:
                self.params[name].grad = None
        mean = loss_sum / n_micro  # the program's loss includes the load-balancing term
        return StepMetrics(phase, self._step, mean, mean, lr, time.perf_counter() - start)  # type: ignore[arg-type]

    def validation_loss(self, split: TokenSplit, max_batches: int) -> float:
        losses = []
        for inputs, targets in split.windows(self.seq_len, self.batch):
            if len(losses) >= max_batches:
                break
            if tuple(inputs.shape) == (self.batch, self.seq_len):
                losses.append(self.program.forward_backward(inputs, targets)[0])
        return sum(losses) / len(losses) if losses else math.nan

    # -- state -----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"step": self._step, "router_updates": self.router_updates,
                "expert_opt": self.expert_opt.state_dict(),
                "router_opt": self.router_opt.state_dict() if self.router_opt else None,
                "train_rng": self.train_rng.get_state(), "valid_rng": self.valid_rng.get_state(),
                "config": self.config.to_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._step = int(state["step"])
        self.router_updates = int(state["router_updates"])
        self.expert_opt.load_state_dict(state["expert_opt"])
        if self.router_opt is not None and state.get("router_opt") is not None:
            self.router_opt.load_state_dict(state["router_opt"])
            for group in self.router_opt.param_groups:
                group["lr"] = self.config.router_lr
        self.train_rng.set_state(state["train_rng"])
        self.valid_rng.set_state(state["valid_rng"])

    def reconfigure(self, config: TrainerConfig) -> None:
        self.config = self._checked(config)
        if self.router_opt is not None:
            for group in self.router_opt.param_groups:
                group["lr"] = config.router_lr

    def close(self) -> None:
        self.program.close()
