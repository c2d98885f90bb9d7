"""N devices in one process: the same trainer and the same aggregation code as the coordinator.

The frozen base model is loaded once and shared by every device's model (only LoRA experts,
routers and optimiser state are per device), so a 4-device SmolLM2 simulation costs one copy
of the base weights. Each round every device trains `local_steps` expert steps (with the
router phases that fall due), then — for methods that share generalists — the coordinator's
aggregation strategy averages the generalist *deltas*, weighted by each device's number of
training tokens (`fedavg`) or uniformly, and every device continues from the new generalist.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from edge_runtime import roles
from edge_runtime.data.tokens import DataError, TokenSplit, load_splits
from edge_runtime.evaluation import perplexity
from edge_runtime.model.inject import inject_comigs
from edge_runtime.model.moe_mlp import generalist_routing_share, record_routing
from edge_runtime.simulation.methods import Method
from edge_runtime.training.trainer import LocalTrainer, TrainerConfig
from sync_service.aggregation import make_aggregator


@dataclasses.dataclass(frozen=True)
class DeviceData:
    name: str
    train: TokenSplit
    valid: TokenSplit
    test: TokenSplit


def load_scenario(directory: str | Path) -> list[DeviceData]:
    """The devices of a prepared scenario (`comigs data prepare`: index order, hashes verified), or
    else every subdirectory of `directory` holding train/valid/test.npy, sorted by name."""
    directory = Path(directory)
    if not directory.is_dir():
        raise DataError(f"scenario directory {directory} does not exist; prepare one with "
                        "`comigs data prepare --scenario NAME --out DIR`.")
    if (directory / "scenario.json").is_file():
        from edge_runtime.data.scenarios import load_scenario as load_prepared

        return [DeviceData(d.name, **d.splits()) for d in load_prepared(directory).devices]
    device_dirs = sorted(p for p in directory.iterdir() if (p / "train.npy").is_file())
    if not device_dirs:
        raise DataError(f"{directory} holds no device directories with train.npy/valid.npy/test.npy.")
    return [DeviceData(p.name, **load_splits(p)) for p in device_dirs]


@dataclasses.dataclass(frozen=True)
class SimulationConfig:
    rounds: int = 20
    local_steps: int = 10
    trainer: TrainerConfig = TrainerConfig()
    strategy: str = "fedavg"
    eval_every: int = 0  # evaluate every N rounds (0: only before and after)
    eval_tokens: int | None = None  # cap on test tokens for per-round curves (final eval uses all)
    seed: int = 0


@dataclasses.dataclass
class MethodResult:
    method: str
    devices: list[str]
    test_perplexity: list[float]
    curve: list[tuple[int, list[float]]]  # (round, per-device perplexity on the capped test split)
    routing_share: list[list[float]]  # per device, per layer: gate weight share of the generalists
    bytes_up_per_round: int  # generalist bytes one device sends per round (fp32), 0 if nothing is shared

    @property
    def mean(self) -> float:
        return float(np.mean(self.test_perplexity))


def share_frozen_copy(base: nn.Module) -> nn.Module:
    """A structural copy of `base` whose parameters and buffers are the same tensor objects."""
    memo = {id(t): t for t in [*base.parameters(), *base.buffers()]}
    return copy.deepcopy(base, memo)


def pooled(devices: Sequence[DeviceData]) -> DeviceData:
    """One device holding everybody's train and valid data (the centralized upper bound)."""
    cat = lambda splits: TokenSplit(np.concatenate([np.asarray(s.tokens) for s in splits]))  # noqa: E731
    return DeviceData("pooled", cat([d.train for d in devices]), cat([d.valid for d in devices]),
                      devices[0].test)


def _capped(split: TokenSplit, tokens: int | None) -> TokenSplit:
    return split if tokens is None or len(split) <= tokens else TokenSplit(split.tokens[:tokens], split.name)


class Federation:
    """One method on one scenario: the devices' models and trainers, and the round loop."""

    def __init__(self, base: nn.Module, method: Method, devices: Sequence[DeviceData], config: SimulationConfig,
                 experts_per_device: Sequence[int] | None = None) -> None:
        if experts_per_device is not None and len(experts_per_device) != len(devices):
            raise ValueError(f"--experts lists {len(experts_per_device)} devices but the scenario has "
                             f"{len(devices)}.")
        self.method, self.config, self.eval_devices = method, config, list(devices)
        self.train_devices = [pooled(devices)] if method.pooled else list(devices)
        total_steps = config.rounds * config.local_steps
        self.models, self.trainers = [], []
        for i, data in enumerate(self.train_devices):
            n_experts = None if experts_per_device is None or method.pooled else experts_per_device[i]
            model = inject_comigs(share_frozen_copy(base), method.config(n_experts))
            trainer_config = dataclasses.replace(config.trainer, total_steps=total_steps,
                                                 router_mode=method.router_mode, seed=config.seed + i)
            self.models.append(model)
            self.trainers.append(LocalTrainer(model, trainer_config, data.train, data.valid))
        self._synchronise_initial_generalist()

    def _synchronise_initial_generalist(self) -> None:
        """All devices start from one generalist, as if downloaded from the coordinator."""
        if self.method.shares_generalists:
            state = roles.generalist_state(self.models[0])
            for model in self.models[1:]:
                roles.load_generalist(model, state)

    def run_round(self) -> None:
        before = [roles.generalist_state(m) for m in self.models]
        for trainer in self.trainers:
            trainer.train(self.config.local_steps)
        if self.method.shares_generalists:
            self._aggregate(before)

    def _aggregate(self, before: list[dict[str, torch.Tensor]]) -> None:
        manifest = {name: (tuple(t.shape), "float32") for name, t in before[0].items()}
        aggregator = make_aggregator(self.config.strategy, manifest)
        for model, start, data in zip(self.models, before, self.train_devices, strict=True):
            after = roles.generalist_state(model)
            aggregator.add({n: (after[n] - start[n]).numpy() for n in start}, num_samples=len(data.train))
        mean_delta = aggregator.result()
        published = {n: before[0][n] + torch.from_numpy(mean_delta[n]) for n in mean_delta}
        for model in self.models:
            roles.load_generalist(model, published)

    def evaluate(self, max_tokens: int | None = None, routing: bool = False
                 ) -> tuple[list[float], list[list[float]]]:
        """Per-device test perplexity (and routing shares) of each device's own model."""
        results, shares = [], []
        for i, data in enumerate(self.eval_devices):
            model = self.models[0 if self.method.pooled else i]
            record_routing(model, routing)
            seq_len = self.config.trainer.seq_len
            results.append(perplexity(model, _capped(data.test, max_tokens), seq_len=seq_len).perplexity)
            shares.append(generalist_routing_share(model) if routing else [])
            record_routing(model, False)
        return results, shares

    def bytes_up_per_round(self) -> int:
        if not self.method.shares_generalists:
            return 0
        return sum(t.numel() * 4 for t in roles.generalist_state(self.models[0]).values())

    def run(self, on_round: Callable[[int], None] | None = None) -> MethodResult:
        curve = []
        if self.config.eval_every:
            curve.append((0, self.evaluate(self.config.eval_tokens)[0]))
        for r in range(1, self.config.rounds + 1):
            self.run_round()
            if self.config.eval_every and r % self.config.eval_every == 0:
                curve.append((r, self.evaluate(self.config.eval_tokens)[0]))
            if on_round:
                on_round(r)
        final, shares = self.evaluate(routing=True)
        return MethodResult(self.method.name, [d.name for d in self.eval_devices], final, curve, shares,
                            self.bytes_up_per_round())


def pretrained_perplexity(base: nn.Module, devices: Sequence[DeviceData], seq_len: int) -> list[float]:
    return [perplexity(base, d.test, seq_len=seq_len).perplexity for d in devices]
