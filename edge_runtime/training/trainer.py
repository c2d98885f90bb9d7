"""The local CoMiGS trainer: alternating (bi-level) optimisation of experts and router.

Expert phase: one optimiser step of all trainable LoRA experts on *train* batches, router
frozen. Router phase: every `router_every` expert steps, `router_steps` steps of the router
alone on *validation* batches, experts frozen. Before and after each phase every gradient is
dropped (set to None), and only the phase's own parameters require grad, so nothing computed
in one phase can reach the other phase's optimiser (the reference implementation leaks ~30
train gradients into the router's first step and 10 validation gradients into the experts).

Variants: `router_mode="joint"` trains the router with the experts on train batches and has
no router phase (the pFedMoE ablation); a model with one expert has no router at all (plain
LoRA: FedAvg, Local).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import nn

from edge_runtime import roles
from edge_runtime.data.tokens import TokenSplit
from edge_runtime.memory import release_free_memory
from edge_runtime.model.config import ConfigError
from edge_runtime.model.inject import language_model_loss
from edge_runtime.training.schedule import cosine_lr

RouterMode = Literal["bilevel", "joint"]


@dataclasses.dataclass(frozen=True)
class TrainerConfig:
    """Hyper-parameters of local training; defaults are the paper's (DESIGN.md §1)."""

    batch_size: int = 64
    micro_batch_size: int | None = None  # None: no gradient accumulation
    seq_len: int = 128
    lr: float = 2e-3
    min_lr: float = 2e-4  # cosine decay to lr / 10
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.95)
    router_lr: float = 2e-3  # constant
    router_weight_decay: float = 0.01
    router_every: int = 30
    router_steps: int = 10
    router_mode: RouterMode = "bilevel"
    total_steps: int = 200  # span of the cosine schedule: all local steps of all rounds
    grad_clip: float | None = None
    seed: int = 0
    # Memory savers chosen by the budget planner: recompute each decoder layer in backward, and
    # compute the LM-head loss over chunks of this many tokens.
    activation_checkpointing: bool = False
    loss_chunk_tokens: int | None = None
    release_memory: bool = False  # give freed memory back to the OS after every step (malloc_trim)

    def __post_init__(self) -> None:
        micro = self.micro_batch_size or self.batch_size
        if self.batch_size <= 0 or micro <= 0 or self.batch_size % micro:
            raise ConfigError(f"batch_size ({self.batch_size}) must be a positive multiple of "
                              f"micro_batch_size ({micro}).")
        if self.seq_len <= 0:
            raise ConfigError(f"seq_len must be positive, got {self.seq_len}.")
        if self.router_mode not in ("bilevel", "joint"):
            raise ConfigError(f"router_mode must be 'bilevel' or 'joint', got {self.router_mode!r}.")
        if self.router_every <= 0 or self.router_steps < 0:
            raise ConfigError("router_every must be > 0 and router_steps >= 0.")
        if not (self.lr > 0 and self.router_lr > 0 and 0 <= self.min_lr <= self.lr):
            raise ConfigError("need lr > 0, router_lr > 0 and 0 <= min_lr <= lr.")

    @property
    def accumulation(self) -> int:
        return self.batch_size // (self.micro_batch_size or self.batch_size)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class StepMetrics:
    phase: Literal["experts", "router"]
    step: int  # expert steps done so far (router steps report the expert step they follow)
    loss: float  # training objective (CE + lb_weight * balance loss)
    ce: float
    lr: float
    seconds: float


class LocalTrainer:
    """Runs local steps on one device; its state (optimisers, counters, data RNG) persists
    across rounds and can be saved with `state_dict()`."""

    def __init__(self, model: nn.Module, config: TrainerConfig, train: TokenSplit,
                 valid: TokenSplit | None = None) -> None:
        self.model, self.config, self.train_split, self.valid_split = model, config, train, valid
        self.expert_params = [p for _, p in roles.named_parameters_by_role(
            model, roles.Role.GENERALIST, roles.Role.SPECIALIST)]
        self.router_params = [p for _, p in roles.named_parameters_by_role(model, roles.Role.ROUTER)]
        if not self.expert_params:
            raise ConfigError("the model has no LoRA experts to train; inject CoMiGS experts first.")
        if self.router_params and config.router_mode == "bilevel" and valid is None:
            raise ConfigError("bi-level training needs a validation split for the router phase "
                              "(or use router_mode='joint').")
        # fused: one kernel per step over all tensors, no full-size temporaries (faster, and
        # the optimiser step never raises peak memory on a small device)
        self.expert_opt = torch.optim.AdamW(self.expert_params, lr=config.lr, betas=config.betas,
                                            weight_decay=config.weight_decay, fused=True)
        self.router_opt = (torch.optim.AdamW(self.router_params, lr=config.router_lr, betas=config.betas,
                                             weight_decay=config.router_weight_decay, fused=True)
                           if self.router_params else None)
        if config.activation_checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        self.step = 0
        self.router_updates = 0
        self.train_rng = torch.Generator().manual_seed(config.seed)
        self.valid_rng = torch.Generator().manual_seed(config.seed + 1)

    # -- phases ---------------------------------------------------------------------------
    def train(self, n_steps: int, callback: Callable[[StepMetrics], None] | None = None) -> list[StepMetrics]:
        """`n_steps` expert steps, with the router phases that fall due among them."""
        history = []
        for _ in range(n_steps):
            history.append(self.expert_step())
            if callback:
                callback(history[-1])
            if self._router_phase_due():
                for metrics in self.router_phase():
                    history.append(metrics)
                    if callback:
                        callback(metrics)
        return history

    def expert_step(self) -> StepMetrics:
        joint = self.config.router_mode == "joint"
        trainable = self.expert_params + (self.router_params if joint else [])
        lr = cosine_lr(self.step, self.config.total_steps, self.config.lr, self.config.min_lr)
        for group in self.expert_opt.param_groups:
            group["lr"] = lr
        optimizers = [self.expert_opt] + ([self.router_opt] if joint and self.router_opt else [])
        metrics = self._optimizer_step("experts", trainable, optimizers, self.train_split, self.train_rng, lr)
        self.step += 1
        return dataclasses.replace(metrics, step=self.step)

    def router_phase(self) -> list[StepMetrics]:
        """`router_steps` router-only steps on validation batches."""
        assert self.router_opt is not None and self.valid_split is not None
        out = []
        for _ in range(self.config.router_steps):
            out.append(self._optimizer_step("router", self.router_params, [self.router_opt],
                                            self.valid_split, self.valid_rng, self.config.router_lr))
            self.router_updates += 1
        return out

    def _router_phase_due(self) -> bool:
        return (self.config.router_mode == "bilevel" and self.router_opt is not None
                and self.config.router_steps > 0 and self.step % self.config.router_every == 0)

    def _optimizer_step(self, phase: Literal["experts", "router"], trainable: list[nn.Parameter],
                        optimizers: list[torch.optim.Optimizer], split: TokenSplit,
                        rng: torch.Generator, lr: float) -> StepMetrics:
        start = time.perf_counter()
        self._enter_phase(trainable)
        self.model.train()
        micro = self.config.micro_batch_size or self.config.batch_size
        n_micro = self.config.accumulation
        loss_sum = ce_sum = 0.0
        try:
            for _ in range(n_micro):
                inputs, targets = split.sample(micro, self.config.seq_len, rng)
                loss, ce = language_model_loss(self.model, inputs, targets, self.config.loss_chunk_tokens)
                (loss / n_micro).backward()
                loss_sum += float(loss.detach())
                ce_sum += float(ce)
                del loss, ce
                if self.config.release_memory:
                    release_free_memory()  # between micro-batches too: freed activations must not pile up
            if self.config.grad_clip:
                torch.nn.utils.clip_grad_norm_(trainable, self.config.grad_clip)
            for optimizer in optimizers:
                optimizer.step()
        finally:
            self._drop_gradients()
            if self.config.release_memory:
                release_free_memory()
        return StepMetrics(phase, self.step, loss_sum / n_micro, ce_sum / n_micro, lr,
                           time.perf_counter() - start)

    def _enter_phase(self, trainable: list[nn.Parameter]) -> None:
        """Only this phase's parameters require grad; no gradient is left from before."""
        self._drop_gradients()
        ids = {id(p) for p in trainable}
        for p in self.expert_params + self.router_params:
            p.requires_grad_(id(p) in ids)

    def _drop_gradients(self) -> None:
        for p in self.expert_params + self.router_params:
            p.grad = None

    # -- persistence ----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "router_updates": self.router_updates,
            "expert_opt": self.expert_opt.state_dict(),
            "router_opt": self.router_opt.state_dict() if self.router_opt else None,
            "train_rng": self.train_rng.get_state(),
            "valid_rng": self.valid_rng.get_state(),
            "config": self.config.to_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.router_updates = int(state["router_updates"])
        self.expert_opt.load_state_dict(state["expert_opt"])
        if self.router_opt is not None and state.get("router_opt") is not None:
            self.router_opt.load_state_dict(state["router_opt"])
        self.train_rng.set_state(state["train_rng"])
        self.valid_rng.set_state(state["valid_rng"])
