"""The memory budget planner: how to train within N megabytes of RAM.

A device states a budget; the planner picks the fastest training configuration whose estimated
peak resident memory fits, and refuses with the smallest budget that would work when none does.

Peak RSS during a step = what is resident before it (interpreter, libraries, frozen base weights,
trainable parameters: measured once the model is loaded) + gradients and AdamW state of the
trainable parameters + the growth of one forward+backward. That growth is *measured* by probe
steps at micro-batch 1 and 3 (peak RSS via /proc, Linux): a model of the saved tensors alone
misses gradient buffers, kernel workspaces and the memory the allocator keeps after freeing,
which together were about as large again. It is extrapolated linearly in the micro-batch, with
a safety margin. The estimate assumes the trainer gives freed memory back after every step
(`TrainerConfig.release_memory`), as the probes do; otherwise retained blocks stack up.

Knobs, cheapest first: smaller micro-batches (the step keeps its batch size through gradient
accumulation), a chunked LM-head loss (recomputes only the head), then checkpointing every
decoder layer (recomputes the forward: about a third more compute).

One knob must be chosen before the model is loaded, because loading itself costs memory: the
dtype of the frozen base weights (`choose_base_dtype`). fp32 keeps the base exact; bf16 halves
it (SmolLM2-135M: 540 -> 270 MB) and is what makes a 1 GB device possible. A GGUF file is
dequantised to fp32 while loading, whatever the target dtype, so tight budgets need a model
directory converted once with `comigs model convert`.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from edge_runtime import roles
from edge_runtime.memory import current_rss_bytes, peak_rss_bytes, release_free_memory, reset_peak_rss
from edge_runtime.model.inject import language_model_loss

MB = 1 << 20
LOSS_CHUNK_TOKENS = 64  # logits of 64 tokens: 12 MB for SmolLM2's 49k vocabulary
PROBE_ROOM_FACTOR = 2.0
STEP_MARGIN = 1.25  # on the measured step growth: run-to-run allocator variation
FIXED_MARGIN = 64 * MB  # batches, optimiser bookkeeping, first-step allocations


class BudgetError(ValueError):
    """No configuration trains within the budget; the message names the smallest that does."""


# Headroom kept free of weights when choosing the base dtype: one forward+backward of a small
# micro-batch with the savers on, optimiser state and margins (SmolLM2 at 1 x 128: ~200 MB).
TRAINING_HEADROOM = 256 * MB


def choose_base_dtype(budget_mb: float, n_params: int, gguf: bool, runtime_bytes: int | None = None) -> torch.dtype:
    """fp32 when the base model, its load-time copy and training headroom fit; else bf16.

    `runtime_bytes` is the process's memory before loading (default: its current RSS, right
    after importing torch and transformers). Raises BudgetError when even bf16 cannot be loaded.
    """
    budget = int(budget_mb * MB)
    runtime = current_rss_bytes() if runtime_bytes is None else runtime_bytes
    dequantised = 4 * n_params if gguf else 0  # transformers builds an fp32 state dict from a GGUF file
    fp32_peak = runtime + 4 * n_params + dequantised + TRAINING_HEADROOM
    if fp32_peak <= budget:
        return torch.float32
    bf16_peak = runtime + 2 * n_params + dequantised + TRAINING_HEADROOM
    if bf16_peak <= budget:
        return torch.bfloat16
    hint = (" Loading a GGUF file needs an fp32 copy of every weight: convert it once with `comigs model convert "
            "--model SOURCE --dtype bf16 --out DIR` (on any machine) and pass --model DIR." if gguf else "")
    need = -(-bf16_peak // MB)
    raise BudgetError(
        f"a memory budget of {budget_mb:.0f} MB cannot hold this base model ({n_params:,} parameters) even in "
        f"bf16: about {need} MB are needed (runtime {runtime / MB:.0f} MB, weights {2 * n_params / MB:.0f} MB, "
        f"training headroom {TRAINING_HEADROOM / MB:.0f} MB). Use --budget-mb {need} or more, or a smaller "
        f"model.{hint}")


@dataclasses.dataclass(frozen=True)
class PlanOption:
    micro_batch_size: int
    loss_chunk_tokens: int | None
    activation_checkpointing: bool

    def describe(self) -> str:
        savers = [s for s, on in (("chunked LM-head loss", self.loss_chunk_tokens is not None),
                                  ("layer checkpointing", self.activation_checkpointing)) if on]
        return f"micro-batch {self.micro_batch_size}" + (f" + {' + '.join(savers)}" if savers else "")


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    option: PlanOption
    accumulation: int
    budget_bytes: int
    resident_bytes: int  # before a step: runtime + weights + trainable parameters
    optimizer_bytes: int  # gradients + AdamW moments
    step_bytes: int  # measured growth of one forward+backward at this micro-batch

    @property
    def peak_bytes(self) -> int:
        return int(self.resident_bytes + self.optimizer_bytes + STEP_MARGIN * self.step_bytes + FIXED_MARGIN)

    def components(self) -> str:
        return ", ".join(f"{name} {value / MB:.0f} MB" for name, value in (
            ("resident", self.resident_bytes), ("grads+AdamW", self.optimizer_bytes),
            ("forward+backward", self.step_bytes)))

    def describe(self) -> str:
        return (f"{self.option.describe()}, {self.accumulation} accumulation step(s): estimated peak "
                f"{self.peak_bytes / MB:.0f} MB of {self.budget_bytes / MB:.0f} MB ({self.components()})")


def candidate_options(batch_size: int) -> list[PlanOption]:
    """Fastest first: shrink the micro-batch, then chunk the loss, then checkpoint layers."""
    micros = [m for m in range(batch_size, 0, -1) if batch_size % m == 0]
    options = [PlanOption(micros[0], None, False)]
    options += [PlanOption(m, LOSS_CHUNK_TOKENS, False) for m in micros]
    options += [PlanOption(m, LOSS_CHUNK_TOKENS, True) for m in micros]
    return options


def _probe_step(model: nn.Module, option: PlanOption, micro_batch: int, seq_len: int) -> int:
    """Peak RSS growth (bytes) of one forward+backward at `micro_batch`; gradients dropped after."""
    tokens = torch.zeros(micro_batch, seq_len, dtype=torch.long)
    trainable = [p for _, p in roles.named_parameters_by_role(model, *roles.TRAINABLE_ROLES)]
    was_training = model.training
    model.train()
    if option.activation_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    try:
        release_free_memory()
        reset_peak_rss()
        before = current_rss_bytes()
        loss, _ = language_model_loss(model, tokens, tokens, option.loss_chunk_tokens)
        loss.backward()
        return max(0, peak_rss_bytes() - before)
    finally:
        for p in trainable:
            p.grad = None
        if option.activation_checkpointing:
            model.activation_checkpointing_disable()
        model.train(was_training)
        release_free_memory()


def _step_cost(model: nn.Module, option: PlanOption, seq_len: int) -> tuple[int, int]:
    """(fixed bytes, bytes per sequence) of a step with this option's memory savers, from probes
    at micro-batch 1 and 2 (small, so that probing a tight budget does not itself exceed it)."""
    one = _probe_step(model, option, 1, seq_len)
    two = _probe_step(model, option, 2, seq_len)
    per_sequence = max(0, two - one)
    return max(0, one - per_sequence), per_sequence


def plan_memory(model: nn.Module, budget_mb: float, batch_size: int, seq_len: int,
                resident_bytes: int | None = None) -> MemoryPlan:
    """The fastest option whose estimated peak fits `budget_mb`; BudgetError if none does.

    Probes go from the most frugal configuration towards the fastest, and a configuration is
    only probed while the budget leaves room for it (its probe could otherwise be the step that
    breaks the budget); the fastest configuration that fits is returned. `resident` is measured
    after a warm-up probe: the first step leaves libraries' lazily built state behind (kernels,
    caches), part of every later step's baseline. `resident_bytes` overrides that measurement.
    """
    budget = int(budget_mb * MB)
    options = candidate_options(batch_size)
    _probe_step(model, options[-1], 1, seq_len)  # warm-up: first-touch allocations of the libraries
    resident = current_rss_bytes() if resident_bytes is None else resident_bytes
    trainable = sum(p.numel() for _, p in roles.named_parameters_by_role(model, *roles.TRAINABLE_ROLES))
    optimizer = trainable * 4 * 3  # gradient + two AdamW moments, fp32
    probed: dict[tuple, tuple[int, int]] = {}
    plans: list[MemoryPlan] = []
    for option in reversed(options):  # most frugal first
        key = (option.loss_chunk_tokens, option.activation_checkpointing)
        if key not in probed:
            if plans and not _room_to_probe(plans[-1], budget):
                break
            probed[key] = _step_cost(model, option, seq_len)
        fixed, per_sequence = probed[key]
        plans.append(MemoryPlan(option, batch_size // option.micro_batch_size, budget, resident, optimizer,
                                fixed + per_sequence * option.micro_batch_size))
    fitting = [p for p in plans if p.peak_bytes <= budget]
    if fitting:
        return fitting[-1]  # the last fitting one is the fastest (options run fastest -> most frugal)
    smallest = min(plans, key=lambda p: p.peak_bytes)
    need = -(-smallest.peak_bytes // MB)
    raise BudgetError(
        f"a memory budget of {budget_mb:.0f} MB is too small to train this model: the most frugal plan "
        f"({smallest.option.describe()}) needs about {need} MB ({smallest.components()}). "
        f"Use --budget-mb {need} or more, a shorter --seq-len, or a smaller model.")


def _room_to_probe(last: MemoryPlan, budget: int) -> bool:
    """Probing a less frugal configuration costs up to a few times the last probed step (layer
    checkpointing off keeps every layer's activations); only do it with that much room."""
    return last.peak_bytes + PROBE_ROOM_FACTOR * STEP_MARGIN * last.step_bytes <= budget
